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
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

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


def run_in_fresh_process(run_dir: Path, sweep_owner: dict | None = None) -> subprocess.Popen:
    """Run the job saved in `run_dir/.hydra/` in a child process, and wait for it (its `returncode`, 0: succeeded).

    If the sweep is interrupted (Ctrl-C, SIGTERM), the child ends with the same signal, records
    `killed`, and is waited for before the interrupt goes on.
    """
    env = {**os.environ, SWEEP_OWNER_ENV: json.dumps(sweep_owner)} if sweep_owner else None
    child = subprocess.Popen([sys.executable, "-m", "qloader.runs.job", str(run_dir)], env=env)
    try:
        child.wait()
        return child
    except KeyboardInterrupt as interrupt:
        stop_job(child, signal.Signals[signal_name(interrupt)])
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


def main(run_dir: Path) -> int:
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
        pipeline.run(cfg, run_dir, overrides, choices=choices, before_success=watch.check)
    return 0


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
        sys.exit(main(Path(sys.argv[1])))
    except KeyboardInterrupt as interrupt:  # before the run began: the sweep records the job as killed
        print(f"qloader: killed by {signal_name(interrupt)} before the job began", file=sys.stderr)
        sys.exit(exit_code(interrupt))
