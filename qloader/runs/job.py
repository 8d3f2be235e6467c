"""`python -m qloader.runs.job RUN_DIR`: run one sweep job's load in a fresh process.

Hydra's launchers run jobs inside one process (basic) or in reused workers (joblib), so a job's
peak memory would leak into the next. Each job instead re-runs its composed config, which Hydra
saved in `RUN_DIR/.hydra/`, in a process of its own: its memory figures are its own.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from qloader.core.interrupts import exit_code, signal_name

FORWARD_AFTER_S = 1.0
"""A Ctrl-C reaches the job's process too; only one still running after this gets the signal passed on."""
RECORD_GRACE_S = 60.0
"""How long an interrupted job may take to record `killed` before it is stopped outright."""


def run_in_fresh_process(run_dir: Path) -> int:
    """Run the job saved in `run_dir/.hydra/` in a child process; its exit code (0: succeeded).

    If the sweep is interrupted (Ctrl-C, SIGTERM), the child ends with the same signal, records
    `killed`, and is waited for before the interrupt goes on.
    """
    child = subprocess.Popen([sys.executable, "-m", "qloader.runs.job", str(run_dir)])
    try:
        return child.wait()
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
    with exit_on_failure(run_dir / "manifest.json"):
        pipeline.run(cfg, run_dir, overrides, choices=choices)
    return 0


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
