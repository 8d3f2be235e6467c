"""`hydra/launcher=slurm` (Hydra's submitit launcher): what qloader adds so a sweep on SLURM runs and ends honestly.

- GPUs are asked for only when the device map puts weights on CUDA (`${qloader.gpus:...}` in
  conf/hydra/launcher/slurm.yaml), or when the user sets `hydra.launcher.gpus_per_node`;
- job states come from `squeue` where the cluster keeps no accounting (`sacct` fails there, and submitit would
  wait forever on a job that ended without a result);
- submitit's polling and warnings go to the sweep's `.qloader/launcher.log`, not the terminal;
- sbatch refusing the jobs (a partition that does not exist, gres the cluster lacks) is one line in sbatch's words.

A job the cluster stops (time limit, `scancel`, preemption) records `killed` with that cause itself
(`qloader.core.cluster`) and returns its status to submitit, so the sweep waits for every job and its summary
has every row.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

POLL_S = 10.0
"""How often job states are read from the cluster while jobs run (their result files are checked every second)."""
LAUNCHER_LOG = "launcher.log"
SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def is_slurm_sweep(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.launcher._target_") == SUBMITIT_SLURM


def prepare_sweep(sweep_dir: Path) -> None:
    """In the sweep's process, before submitit submits: its log to the sweep dir, its state watcher on squeue
    where sacct has nothing to read."""
    from submitit.slurm.slurm import SlurmJob

    log = _log_to(sweep_dir / ".qloader" / LAUNCHER_LOG)
    SlurmJob.watcher = _watcher()(delay_s=POLL_S)
    if not isinstance(sys.stderr, _SbatchWordsToLog):
        sys.stderr = _SbatchWordsToLog(sys.stderr, log)


class _SbatchWordsToLog:
    """This process's stderr, where submitit prints sbatch's error output before it raises with the same words:
    those go to the launcher log (the sweep's one line quotes them); everything else passes through."""

    def __init__(self, stream, log: logging.Logger) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        if text.lstrip().startswith("sbatch:"):
            self._log.error("%s", text.strip())
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _watcher():
    from submitit.slurm.slurm import SlurmInfoWatcher

    class ClusterStateWatcher(SlurmInfoWatcher):
        """submitit's job-state watcher, reading `squeue --states=all` where `sacct` has no accounting."""

        def _make_command(self) -> list[str] | None:
            command = super()._make_command()
            if command is None or not sacct_missing():
                return command
            ids = ",".join(arg for flag, arg in zip(command, command[1:], strict=False) if flag == "-j")
            return ["squeue", "--noheader", "--states=all", "--array", "-o", "%i|%T|%N", "-j", ids]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            if not sacct_missing():
                return super().read_info(string)
            return super().read_info("JobID|State|NodeList\n" + squeue_lines(string))

    return ClusterStateWatcher


def squeue_lines(output: bytes | str) -> str:
    """squeue's `%i|%T|%N` lines as sacct would print them: a pending array's `12_[0-3%4]` range without the
    `%4` throttle submitit's reader does not know."""
    text = output.decode() if isinstance(output, bytes) else output
    return "\n".join(line.split("%", 1)[0] + ("]" + line.split("]", 1)[1] if "%" in line and "]" in line else "")
                     for line in text.splitlines())  # fmt: skip


_sacct_missing: bool | None = None


def sacct_missing() -> bool:
    """Does this cluster keep no accounting for `sacct` to read (asked once per process)?"""
    global _sacct_missing
    if _sacct_missing is None:
        try:
            probe = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=30)
            _sacct_missing = probe.returncode != 0 or "disabled" in probe.stderr
        except (OSError, subprocess.SubprocessError):
            _sacct_missing = shutil.which("squeue") is not None
    return _sacct_missing


def gpus_for(device_map: DictConfig | dict | None) -> int | None:
    """`${qloader.gpus:${device_map}}`: 1 GPU per node when the device map puts weights on CUDA, else None (none
    asked): a `cuda` strategy, a budget for a GPU (`max_memory.0=...`), or modules placed on one."""
    device_map = device_map or {}
    if str(device_map.get("strategy")).rsplit(".", 1)[-1] == "cuda":
        return 1
    budgets = device_map.get("max_memory") or {}
    if any(str(key).isdigit() and value is not None for key, value in budgets.items()):
        return 1
    placed = (device_map.get("modules") or {}).values()
    return 1 if any(str(v).isdigit() or str(v).startswith("cuda") for v in placed) else None


def register_resolver() -> None:
    if not OmegaConf.has_resolver("qloader.gpus"):
        OmegaConf.register_new_resolver("qloader.gpus", gpus_for)


def sbatch_refusal(error: BaseException) -> str | None:
    """sbatch's own words when it refused the sweep's jobs (submitit's FailedJobError at submission), else None."""
    if type(error).__name__ != "FailedJobError":
        return None
    words = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [w for w in words if w.startswith("sbatch:")] or words[-1:]
    return (
        f"sbatch refused the sweep's jobs ({' '.join(said)}); set hydra.launcher.partition / gpus_per_node / "
        "cpus_per_task / mem_gb to what the cluster has (sinfo -o '%P %c %m %G')"
    )


def _log_to(path: Path) -> logging.Logger:
    """submitit's records (its polling, `Bypassing sacct error`) to the sweep's launcher log, not the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    for name in ("submitit", "hydra_plugins.hydra_submitit_launcher.submitit_launcher"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logging.getLogger("submitit")
