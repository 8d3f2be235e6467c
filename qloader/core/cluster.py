"""Is this process a SLURM job, and why is the cluster stopping it: a `killed` record names the cluster's cause.

SLURM ends a job with SIGTERM (then SIGKILL) at its time limit, on `scancel`, on preemption and on node failure,
and sends the signal a job asked for (`--signal`, submitit's SIGUSR2) shortly before its time limit or at
preemption. The signal alone does not say which: the controller does (`scontrol show job`).
"""

from __future__ import annotations

import os
import shutil
import subprocess

STATE_CAUSES = {
    "TIMEOUT": "time limit",
    "DEADLINE": "time limit",
    "CANCELLED": "cancelled",
    "PREEMPTED": "preempted",
    "NODE_FAIL": "node failure",
    "BOOT_FAIL": "node failure",
    "OUT_OF_MEMORY": "out of memory",
}
"""A job state (sacct, squeue, scontrol) that ends a job from outside → the cause a `killed` record names."""
REASON_CAUSES = {"TimeLimit": "time limit", "Preempted": "preempted", "NodeDown": "node failure"}
"""scontrol's `Reason=` while the job is still COMPLETING → the cause."""
TIMEOUT_SIGNAL = "SIGUSR2"
"""The signal submitit asks SLURM to send before the time limit (`--signal=USR2@signal_delay_s`)."""
QUERY_TIMEOUT_S = 5.0


def slurm_job_id() -> str | None:
    """This process's SLURM job id (`123` or, for an array task, `123_4`); None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def restart_count() -> int:
    """How many times SLURM has requeued this job (0 on its first run, and outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job -o JOB` as `{field: value}`; {} when the controller cannot be asked."""
    if shutil.which("scontrol") is None:
        return {}
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=QUERY_TIMEOUT_S
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    line = out.splitlines()[0] if out.strip() else ""
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


def _seconds(value: str | None) -> int | None:
    """SLURM's `[D-]HH:MM:SS` (or MM:SS) as seconds; None for UNLIMITED or a value it cannot read."""
    if not value or not value[0].isdigit():
        return None
    days, _, clock = value.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
        return seconds + int(days or 0) * 86400
    except ValueError:
        return None


def cause_of(state: str | None, reason: str | None = None) -> str | None:
    """The cause a job state (and scontrol's reason) names; None for a state that is not an outside stop."""
    state = (state or "").split()[0].rstrip("+") if state else ""
    return STATE_CAUSES.get(state) or REASON_CAUSES.get(reason or "")


def stop_cause(signal_name: str) -> tuple[str, str] | None:
    """Why the cluster sent this SLURM job `signal_name`, as (cause, the words for the record); None outside
    SLURM. The controller's state decides (TIMEOUT, CANCELLED, ...); a SIGUSR2 while the job still runs is the
    warning before the time limit when the job is near it (submitit's rule: past 80 % of it, or within ten
    minutes of it), else preemption."""
    job_id = slurm_job_id()
    if job_id is None:
        return None
    fields = job_fields(job_id)
    cause = cause_of(fields.get("JobState"), fields.get("Reason"))
    if cause is None and fields.get("JobState") == "COMPLETING" and fields.get("Reason") in (None, "None"):
        cause = "cancelled"  # scancel: the controller is ending the job with no reason of its own (a time limit,
        # preemption and node failure each name theirs); its final state, CANCELLED, shows only once it has ended
    if cause is None and signal_name == TIMEOUT_SIGNAL:
        run, limit = _seconds(fields.get("RunTime")), _seconds(fields.get("TimeLimit"))
        near = run is not None and limit is not None and run >= min(0.8 * limit, limit - 600)
        cause = "time limit" if near else "preempted"
    if cause is None:
        return None
    limit = f", time limit {fields['TimeLimit']}" if cause == "time limit" and fields.get("TimeLimit") else ""
    return cause, f"SLURM stopped job {job_id} ({cause}{limit}) with {signal_name}"
