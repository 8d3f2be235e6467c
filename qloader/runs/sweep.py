"""Sweeps: each job loads in a fresh process; when the sweep ends, one summary of all jobs.

An interrupted sweep (Ctrl-C, SIGTERM, a launcher tearing its workers down) still ends with a final
status in every job's manifest, and with `summary.*` for the jobs that finished, the interrupted
ones as `killed` rows.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qloader.core.interrupts import exit_code, install_for_process, signal_name, signals_as_interrupt

JOB_EXIT_GRACE_S = 60.0
"""How long an interrupted sweep waits for a job process that is still recording its end."""


def _status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return "missing"


def run_job(run_dir: Path, job_num: int, overrides: list[str]) -> str:
    """One sweep job: a line as it starts and ends, its load in a child process; returns its status."""
    from qloader.runs.job import run_in_fresh_process

    label = f"#{job_num} {' '.join(overrides)}"
    if SweepSummary.active_sweep_dir is None and threading.current_thread() is threading.main_thread():
        # a launcher's worker process (joblib): a Ctrl-C between jobs is the sweep process's to handle
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"qloader: job {label}: started", flush=True)
    start = time.perf_counter()
    try:
        with signals_as_interrupt():
            run_in_fresh_process(run_dir)
    except KeyboardInterrupt as interrupt:
        _settle_job(run_dir, signal_name(interrupt))
        print(f"qloader: job {label}: {_status(run_dir)} in {time.perf_counter() - start:.1f} s", flush=True)
        raise
    status = _status(run_dir)
    print(f"qloader: job {label}: {status} in {time.perf_counter() - start:.1f} s", flush=True)
    return status


class SweepSummary(Callback):
    """Writes summary.csv / .md / .png when a multirun ends; a failed job makes the sweep exit 1."""

    active_sweep_dir: Path | None = None
    """The sweep this process is running, for `end_interrupted_sweep`."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.active_sweep_dir = Path(config.hydra.sweep.dir)
        install_for_process()  # SIGTERM too ends the sweep through `end_interrupted_sweep`

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from qloader.runs.report import markdown, write_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        print(f"\nqloader: sweep summary ({sweep_dir}/summary.md)\n" + markdown(rows), flush=True)
        failed = [f"#{r['job']} ({r['overrides']})" for r in rows if r["status"] != "succeeded"]
        if failed:
            print(f"qloader: {len(failed)} of {len(rows)} jobs failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)


def end_interrupted_sweep(interrupt: KeyboardInterrupt) -> int:
    """After Ctrl-C or SIGTERM outside a single run: settle every job, write the summary, one line; the exit code."""
    from qloader.runs.report import markdown, write_summary

    name, sweep_dir = signal_name(interrupt), SweepSummary.active_sweep_dir
    if sweep_dir is None or not sweep_dir.is_dir():
        print(f"qloader: interrupted by {name} before any run began", file=sys.stderr)
        return exit_code(interrupt)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the sweep is ending: a repeated Ctrl-C must not cut this short
        signal.signal(sig, signal.SIG_IGN)
    job_dirs = {p.parent for p in sweep_dir.glob("*/.hydra")} | {p.parent for p in sweep_dir.glob("*/manifest.json")}
    for job_dir in sorted(job_dirs):
        _settle_job(job_dir, name)
    rows = write_summary(sweep_dir)
    print(f"\nqloader: sweep summary ({sweep_dir}/summary.md)\n" + markdown(rows), flush=True)
    done = sum(r["status"] == "succeeded" for r in rows)
    killed = [f"#{r['job']}" for r in rows if r["status"] == "killed"]
    print(
        f"qloader: sweep interrupted by {name}: {done} of {len(rows)} started jobs succeeded"
        f"{', killed: ' + ' '.join(killed) if killed else ''}; summary {sweep_dir}/summary.md",
        file=sys.stderr,
    )
    return exit_code(interrupt)


def _settle_job(job_dir: Path, name: str) -> None:
    """Wait for the job's own process to record its end; if it cannot, record `killed` for it."""
    from qloader.runs.manifest import record_killed_job

    pid = _running_pid(job_dir)
    deadline = time.monotonic() + JOB_EXIT_GRACE_S
    while pid is not None and _is_job_process(pid, job_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
        pid = _running_pid(job_dir)
    if pid is not None and _is_job_process(pid, job_dir):
        os.kill(pid, 9)  # it did not record its end in time: stop it, and record it here
    record_killed_job(
        job_dir,
        "RunKilled" if name != "SIGINT" else "KeyboardInterrupt",
        f"the sweep was interrupted by {name} while this job ran; its process ended without recording it",
    )


def _running_pid(job_dir: Path) -> int | None:
    """The pid a `running` manifest names (None: finished, or never started)."""
    try:
        data = json.loads((job_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("status") != "running" or not isinstance(data.get("pid"), int):
        return None
    return data["pid"]


def _is_job_process(pid: int, job_dir: Path) -> bool:
    """Is `pid` alive and still this job's `python -m qloader.runs.job JOB_DIR` (pids are reused)?"""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cwd = Path(f"/proc/{pid}/cwd").resolve()
    except (OSError, IndexError):
        return False
    return state != "Z" and "qloader.runs.job" in args and (cwd / args[-1]).resolve() == job_dir.resolve()
