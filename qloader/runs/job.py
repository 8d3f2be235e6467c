"""`python -m qloader.runs.job RUN_DIR`: run one sweep job's load in a fresh process.

Hydra's launchers run jobs inside one process (basic) or in reused workers (joblib), so a job's
peak memory would leak into the next. Each job instead re-runs its composed config, which Hydra
saved in `RUN_DIR/.hydra/`, in a process of its own: its memory figures are its own.

A job process ends with its sweep: if the process that launched it (a joblib worker) or the sweep itself
(`QLOADER_SWEEP_OWNER`) ends, the job stops as SIGTERM stops it, recording `killed`; it never records
`succeeded` once its sweep is gone.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from qloader.core.cluster import restart_count
from qloader.core.errors import RunKilled
from qloader.core.interrupts import exit_code, signal_name, stop_this_process
from qloader.core.processes import is_alive

FORWARD_AFTER_S = 1.0
"""A Ctrl-C reaches the job's process too; only one still running after this gets the signal passed on."""
RECORD_GRACE_S = 60.0
"""How long an interrupted job may take to record `killed` before it is stopped outright."""
SWEEP_OWNER_ENV = "QLOADER_SWEEP_OWNER"
"""The sweep process's identity (`qloader.core.processes.process_identity`, JSON), passed to its job processes."""
WATCH_EVERY_S = 0.5


def run_in_fresh_process(run_dir: Path, sweep_owner: dict | None = None, resume: bool = False) -> subprocess.Popen:
    """Run the job saved in `run_dir/.hydra/` in a child process, and wait for it (its `returncode`, 0: succeeded).

    If the sweep is interrupted (Ctrl-C, SIGTERM), the child ends with the same signal, records
    `killed`, and is waited for before the interrupt goes on.
    """
    env = {**os.environ, SWEEP_OWNER_ENV: json.dumps(sweep_owner)} if sweep_owner else None
    args = ["--resume"] if resume else []
    child = subprocess.Popen([sys.executable, "-m", "qloader.runs.job", str(run_dir), *args], env=env)
    try:
        child.wait()
        return child
    except KeyboardInterrupt as interrupt:
        stop_job(child, signal.Signals[signal_name(interrupt)])
        raise
    except BaseException:  # submitit's own SIGUSR2 handling in a SLURM job: the time limit is near (or requeue)
        stop_job(child, signal.SIGTERM)  # the job got the cluster's signal too: it is recording `killed`
        raise


def stop_job(child: subprocess.Popen, sig: signal.Signals) -> None:
    """The interrupted sweep's job: the same signal (unless it already ended), time to record it, then SIGKILL."""
    try:
        child.wait(timeout=FORWARD_AFTER_S)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(sig)
    try:
        child.wait(timeout=RECORD_GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def main(run_dir: Path, resume: bool = False) -> int:
    from qloader.config.compose import GROUPS
    from qloader.core.exits import exit_on_failure
    from qloader.runs import pipeline

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    overrides = list(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    runtime = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime
    choices = {group: runtime.choices.get(group) for group in GROUPS}
    cfg = _typed(cfg, choices)
    watch = SweepWatch.start()
    with exit_on_failure(run_dir / "manifest.json"):
        previous = None
        if (run_dir / "manifest.json").exists() and (resume or restart_count() > 0):
            earlier = _settled_earlier_attempt(run_dir)
            why_rerun = "requeued by SLURM" if restart_count() > 0 else _why_rerun(earlier, cfg)
            if why_rerun is None:
                print(f"qloader: job {run_dir.name}: skipped, it succeeded with this config and these inputs "
                      f"({run_dir / 'manifest.json'})", flush=True)  # fmt: skip
                return 0
            previous = keep_earlier_attempt(run_dir)
            print(f"qloader: job {run_dir.name}: runs again ({why_rerun}); its earlier record: {previous}", flush=True)
        pipeline.run(cfg, run_dir, overrides, choices=choices, before_success=watch.check, previous_attempt=previous)
    return 0


def _settled_earlier_attempt(run_dir: Path) -> dict:
    """The job's earlier record, with a final status: one left `running` by a process that has ended (or ran on
    another node of the cluster, before a requeue) is recorded `killed` first."""
    from qloader.runs.manifest import record_killed_job, settle_if_orphaned

    data = settle_if_orphaned(run_dir / "manifest.json")
    if isinstance(data, dict) and data.get("status") == "running" and is_alive(data.get("owner")) is not True:
        record_killed_job(run_dir, "RunKilled", "its process ended without recording its end; the job runs again",
                          "preempted" if restart_count() > 0 else None)  # fmt: skip
        data = json.loads((run_dir / "manifest.json").read_text())
    if not isinstance(data, dict) or data.get("status") == "running":
        from qloader.core.errors import RunDirInUseError

        raise RunDirInUseError(
            f"job dir '{run_dir}' holds a record of a run that is still running (pid {data.get('pid')}); wait "
            "for it to end, or resume into a new sweep dir (hydra.sweep.dir=NEW)"
        )
    return data


def _why_rerun(earlier: dict, cfg) -> str | None:
    """Why a resumed sweep runs this job again (None: it succeeded with the same config and input hashes)."""
    from qloader.checkpoint.reader import default_hash_cache, inspect_checkpoint
    from qloader.checkpoint.sources import checkpoint_folder
    from qloader.runs.manifest import config_hash, resolved_config

    if earlier.get("status") != "succeeded":
        return f"it ended {earlier.get('status')} before"
    before, now = dict(earlier.get("config") or {}), resolved_config(cfg)
    for config in (before, now):
        config.pop("sweep", None)  # `sweep.resume` itself is not the job's config
    if config_hash(before) != config_hash(now):
        return "its config differs from the one that succeeded"
    try:
        checkpoint = inspect_checkpoint(
            checkpoint_folder(cfg.model), hashes=default_hash_cache(trust=not cfg.model.get("verify_hashes", False)),
            hash_files=True, allow_pickle=cfg.model.allow_pickle,
        )  # fmt: skip
    except Exception as e:  # the run itself reports what is wrong with its inputs
        return f"its inputs cannot be read as before ({type(e).__name__})"
    files = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in checkpoint.files]
    if files != (earlier.get("checkpoint") or {}).get("files"):
        return "its input files differ from the ones it loaded"
    return None


def keep_earlier_attempt(run_dir: Path) -> str:
    """Move the job's earlier record aside, never over another: `manifest.attempt-N.json`; its name."""
    for n in itertools.count(1):
        kept = run_dir / f"manifest.attempt-{n}.json"
        try:
            os.link(run_dir / "manifest.json", kept)  # fails if `kept` exists: no record is written over
        except FileExistsError:
            continue
        os.unlink(run_dir / "manifest.json")
        return kept.name
    raise AssertionError("unreachable")


class SweepWatch:
    """Ends this job when the sweep that started it is gone: its launching process (ppid changed) or the sweep
    process named in `QLOADER_SWEEP_OWNER` (a joblib worker outlives a SIGKILLed sweep while it waits for us)."""

    def __init__(self, sweep_owner: object) -> None:
        self.parent = os.getppid()
        self.sweep_owner = sweep_owner

    @classmethod
    def start(cls) -> SweepWatch:
        try:
            owner = json.loads(os.environ.get(SWEEP_OWNER_ENV) or "null")
        except ValueError:
            owner = None
        watch = cls(owner)
        threading.Thread(target=watch._poll, name="qloader-sweep-watch", daemon=True).start()
        return watch

    def gone(self) -> str | None:
        """Why this job has no sweep any more; None while it has one."""
        if os.getppid() != self.parent:
            return f"the process that launched this job (pid {self.parent}) ended; the job stopped with it"
        if is_alive(self.sweep_owner) is False:
            return f"its sweep (pid {self.sweep_owner['pid']}) ended; the job stopped with it"
        return None

    def check(self) -> None:
        """Called before `succeeded` is recorded: a job whose sweep has gone is recorded `killed` instead."""
        if why := self.gone():
            raise RunKilled("SIGTERM", why)

    def _poll(self) -> None:
        while (why := self.gone()) is None:
            time.sleep(WATCH_EVERY_S)
        stop_this_process(why)


def _typed(cfg, choices: dict):
    """The saved config typed by the schemas, as the launcher composed it: `resolve` then refuses a key no
    schema declares (`+quant.typo=`) in a sweep job too. An option from another config dir stays untyped."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from qloader.config.compose import typed_config

    try:
        return typed_config(cfg, choices)
    except (HydraException, OmegaConfBaseException):
        return cfg


if __name__ == "__main__":
    try:
        sys.exit(main(Path(sys.argv[1]), resume="--resume" in sys.argv[2:]))
    except KeyboardInterrupt as interrupt:  # before the run began: the sweep records the job as killed
        print(f"qloader: killed by {signal_name(interrupt)} before the job began", file=sys.stderr)
        sys.exit(exit_code(interrupt))
