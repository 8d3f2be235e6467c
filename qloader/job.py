"""`python -m qloader.job RUN_DIR`: run one sweep job's load in a fresh process.

Hydra's launchers run jobs inside one process (basic) or in reused workers (joblib), so a job's
peak memory would leak into the next. Each job instead re-runs its composed config, which Hydra
saved in `RUN_DIR/.hydra/`, in a process of its own: its memory figures are its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf


def run_in_fresh_process(run_dir: Path) -> int:
    """Run the job saved in `run_dir/.hydra/` in a child process; its exit code (0: succeeded).

    If the sweep itself is interrupted, the child is stopped with SIGTERM and records `killed`.
    """
    child = subprocess.Popen([sys.executable, "-m", "qloader.job", str(run_dir)])
    try:
        return child.wait()
    except BaseException:
        child.terminate()
        child.wait()
        raise


def main(run_dir: Path) -> int:
    from qloader import pipeline
    from qloader.cli import exit_on_failure
    from qloader.config import GROUPS

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    overrides = list(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    runtime = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime
    choices = {group: runtime.choices.get(group) for group in GROUPS}
    with exit_on_failure(run_dir / "manifest.json"):
        pipeline.run(cfg, run_dir, overrides, choices=choices)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
