"""Sweeps: each job loads in a fresh process; when the sweep ends, one summary of all jobs.

An interrupted sweep (Ctrl-C, SIGTERM, a launcher tearing its workers down) still ends with a final
status in every job's manifest, and with `summary.*` for the jobs that finished, the interrupted
ones as `killed` rows. So does a sweep whose launcher fails (a joblib worker killed).

A sweep claims its sweep dir before Hydra writes into it (`.qloader/`, made exclusively): a dir that holds
another sweep's or run's records is refused, so no job writes over another's `.hydra/` or manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qloader.core.cluster import TIMEOUT_SIGNAL, slurm_job_id, stop_cause
from qloader.core.interrupts import exit_code, install_for_process, signal_name, signals_as_interrupt

JOB_EXIT_GRACE_S = 60.0
"""How long an interrupted sweep waits for a job process that is still recording its end."""
SWEEP_RECORDS = ".qloader"
"""The sweep's own folder in its sweep dir: `sweep.json` (the sweep's process; the folder is made exclusively,
so one sweep per dir) and `job-<num>.json` for a job refused before it could write a manifest of its own."""
JOB_DIR_KEYS = ("hydra.job.num", "hydra.job.id")
"""A `hydra.sweep.subdir` naming neither could give two jobs one dir."""
RECORDS = ((SWEEP_RECORDS, ""), ("multirun.yaml", ""), ("manifest.json", ""), (".hydra", "/"))
RECORDS += (("*/manifest.json", ""), ("*/.hydra", "/"))


def claim_sweep_dir(config: DictConfig) -> None:
    """Before Hydra writes into the sweep dir: refuse a dir that holds another sweep's (or run's) records and a
    subdir that could give two jobs one dir, then claim the dir for this sweep (RunDirInUseError, ConfigError)."""
    from qloader.core.errors import ConfigError, RunDirInUseError
    from qloader.core.files import existing_ancestor, remove_empty_folders

    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
    if not any(key in str(subdir) for key in JOB_DIR_KEYS):
        raise ConfigError(
            [
                f"hydra.sweep.subdir '{subdir}' names neither ${{hydra.job.num}} nor ${{hydra.job.id}}, so two jobs "
                "could share one dir and Hydra would write one's .hydra/ over the other's; keep ${hydra.job.num} "
                "in it (its default: hydra.sweep.subdir='${hydra.job.num}')"
            ]
        )
    sweep_dir = Path(config.hydra.sweep.dir)
    if (config.get("sweep") or {}).get("resume"):
        _reclaim_sweep_dir(sweep_dir, config)
        return
    fix = ("choose a new sweep dir (hydra.sweep.dir=NEW): a record is never overwritten; or sweep.resume=true to "
           "run the jobs of an ended sweep that did not succeed")  # fmt: skip
    if found := _records_in(sweep_dir):
        raise RunDirInUseError(f"sweep dir '{sweep_dir}' already holds another sweep's jobs ({found}); {fix}")
    kept = existing_ancestor(sweep_dir.absolute())
    try:
        (sweep_dir / SWEEP_RECORDS).mkdir(parents=True)
    except FileExistsError:
        raise RunDirInUseError(f"sweep dir '{sweep_dir}' was claimed by another sweep started at once; {fix}") from None
    except OSError as e:
        remove_empty_folders(sweep_dir.absolute(), kept)
        _cannot_write(sweep_dir, e)
    _record_sweep_owner(sweep_dir, kept, config)


def _reclaim_sweep_dir(sweep_dir: Path, config: DictConfig) -> None:
    """`sweep.resume=true`: the dir must hold an ended sweep (or nothing yet); this sweep becomes its owner, the
    earlier owners kept in `sweep.json`'s `earlier` list."""
    from qloader.core.errors import ConfigError, RunDirInUseError
    from qloader.core.files import write_json_atomic
    from qloader.core.processes import is_alive, process_identity

    record_path = sweep_dir / SWEEP_RECORDS / "sweep.json"
    if not record_path.is_file():
        if _records_in(sweep_dir):
            raise ConfigError([f"sweep.resume=true: sweep dir '{sweep_dir}' holds no sweep record "
                               f"({SWEEP_RECORDS}/sweep.json); resume a dir a qloader sweep wrote, or sweep into a new "
                               "one"])  # fmt: skip
        (sweep_dir / SWEEP_RECORDS).mkdir(parents=True, exist_ok=True)
        record: dict = {}
    else:
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as e:
            why = f"sweep.resume=true: {record_path} cannot be read ({e}); sweep into a new dir"
            raise ConfigError([why]) from None
    if is_alive(record.get("owner")):
        raise RunDirInUseError(
            f"sweep dir '{sweep_dir}' belongs to a sweep that is still running (pid {record['owner']['pid']}); wait "
            "for it to end before resuming it"
        )
    earlier = [*record.get("earlier", []), {k: v for k, v in record.items() if k != "earlier"}] if record else []
    new = {"owner": process_identity(), "overrides": list(config.hydra.overrides.task), "status": "running",
           "earlier": earlier}  # fmt: skip
    write_json_atomic(record_path, new)


def _records_in(sweep_dir: Path) -> str | None:
    """The first records of other runs that `sweep_dir` holds, named for the message; None if it holds none."""
    found = [f"{p.relative_to(sweep_dir)}{end}" for pattern, end in RECORDS for p in sorted(sweep_dir.glob(pattern))]
    return None if not found else ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")


def _record_sweep_owner(sweep_dir: Path, kept: Path, config: DictConfig) -> None:
    """`.qloader/sweep.json`: the sweep's process, which its jobs watch; on a full disk the claim is undone."""
    from qloader.core.files import remove_empty_folders, write_json_atomic
    from qloader.core.processes import process_identity

    record = {"owner": process_identity(), "overrides": list(config.hydra.overrides.task), "status": "running"}
    try:
        write_json_atomic(sweep_dir / SWEEP_RECORDS / "sweep.json", record, exclusive=True)
    except OSError as e:
        remove_empty_folders((sweep_dir / SWEEP_RECORDS).absolute(), kept)
        _cannot_write(sweep_dir, e)


def _cannot_write(sweep_dir: Path, error: OSError) -> NoReturn:
    from qloader.core.errors import OutputError

    why = error.strerror or error
    raise OutputError(f"sweep dir '{sweep_dir}' cannot be written: {why}; free some space or choose another "
                      "sweep dir (hydra.sweep.dir=NEW)") from error  # fmt: skip


def sweep_owner(sweep_dir: Path | None) -> dict | None:
    """The sweep process recorded in `sweep_dir` (None if it recorded none), for its job processes to watch."""
    try:
        record = json.loads((Path(sweep_dir) / SWEEP_RECORDS / "sweep.json").read_text())
    except (TypeError, OSError, ValueError):
        return None
    return record.get("owner") if isinstance(record, dict) and isinstance(record.get("owner"), dict) else None


def record_sweep_end(sweep_dir: Path | None, status: str, error: str | None = None) -> None:
    """`.qloader/sweep.json` gets the sweep's end: `succeeded`, `failed` (a job did not succeed, or the launcher
    failed: `error`) or `killed`; never left `running`."""
    from datetime import datetime, timezone

    from qloader.core.files import write_json_atomic

    path = Path(sweep_dir or "") / SWEEP_RECORDS / "sweep.json"
    try:
        record = json.loads(path.read_text())
        record.update(status=status, finished_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                      error=error)  # fmt: skip
        write_json_atomic(path, record)
    except (OSError, ValueError, AttributeError):  # no record to end (a sweep refused before it claimed its dir)
        pass


def _status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return "missing"


def run_job(
    run_dir: Path, job_num: int, overrides: list[str], sweep_dir: Path | None = None, resume: bool = False
) -> str:
    """One sweep job: a line as it starts and ends, its load in a child process; returns its status. `resume`: a
    job that already succeeded in `run_dir` with the same config and inputs is not run again."""
    from qloader.runs.job import run_in_fresh_process

    label = f"#{job_num} {' '.join(overrides)}"
    if SweepSummary.active_sweep_dir is None and threading.current_thread() is threading.main_thread():
        # a launcher's worker process (joblib): a Ctrl-C between jobs is the sweep process's to handle
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"qloader: job {label}: started", flush=True)
    start = time.perf_counter()
    try:
        # In a SLURM job the cluster's SIGTERM (time limit, scancel) reaches the job's process too, which records
        # it; this process leaves it to submitit, which ignores it and hands the job's status back as its result.
        with signals_as_interrupt() if slurm_job_id() is None else contextlib.nullcontext():
            child = run_in_fresh_process(run_dir, sweep_owner(sweep_dir), resume=resume)
    except KeyboardInterrupt as interrupt:
        _settle_job(run_dir, *_interrupted(signal_name(interrupt)))
        print(f"qloader: job {label}: {_status(run_dir)} in {time.perf_counter() - start:.1f} s", flush=True)
        raise
    except Exception as stop:  # submitit in a SLURM job: its time limit is near and it will not be requeued
        if slurm_job_id() is None:
            raise
        cause = stop_cause(TIMEOUT_SIGNAL)
        _settle_job(run_dir, "RunKilled", f"the cluster stopped the job ({' '.join(str(stop).split())[:200]})",
                    cause[0] if cause else None)  # fmt: skip
        print(f"qloader: job {label}: {_status(run_dir)} in {time.perf_counter() - start:.1f} s", flush=True)
        return _status(run_dir)
    status = _job_outcome(run_dir, job_num, overrides, child, sweep_dir)
    print(f"qloader: job {label}: {status} in {time.perf_counter() - start:.1f} s", flush=True)
    return status


def _job_outcome(run_dir: Path, job_num: int, overrides: list[str], child, sweep_dir: Path | None) -> str:
    """The ended job's status: its own manifest's (a `running` one its process left is settled `killed`); a job
    refused because its dir held another run's manifest is `failed`, recorded in the sweep's records."""
    from qloader.runs.manifest import record_killed_job, settle_if_orphaned

    try:
        data = settle_if_orphaned(run_dir / "manifest.json")
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and data.get("pid") == child.pid:
        return str(data.get("status"))
    if data is None and child.returncode < 0:  # a signal ended it before it wrote its record
        message = f"process died: the job's process ended by signal {-child.returncode} before it wrote its record"
        return record_killed_job(run_dir, "ProcessDied", message)
    if not isinstance(data, dict) or child.returncode == 0:
        return _status(run_dir)
    message = (
        f"job dir '{run_dir}' already holds a manifest.json, the record of another run (pid {data.get('pid')}); "
        "this job did not run: sweep into a new sweep dir (hydra.sweep.dir=NEW)"
    )
    _record_refused_job(sweep_dir, run_dir, job_num, overrides, message)
    return "failed"


def _record_refused_job(
    sweep_dir: Path | None, run_dir: Path, job_num: int, overrides: list[str], message: str
) -> None:
    """`.qloader/job-<num>.json`: the row of a job that has no manifest of its own, for the summary."""
    from qloader.core.files import write_json_atomic

    if sweep_dir is None:
        return
    try:
        job_dir = str(Path(run_dir).absolute().relative_to(Path(sweep_dir).absolute()))
    except ValueError:
        job_dir = str(run_dir)
    record = {
        "job": job_num, "job_dir": job_dir, "overrides": overrides, "status": "failed",
        "error": {"type": "RunDirInUseError", "message": message},
    }  # fmt: skip
    with contextlib.suppress(OSError):
        write_json_atomic(Path(sweep_dir) / SWEEP_RECORDS / f"job-{job_num}.json", record)


class SweepSummary(Callback):
    """Writes summary.csv / .md / .png when a multirun ends; a failed job makes the sweep exit 1."""

    active_sweep_dir: Path | None = None
    """The sweep this process is running, for `end_interrupted_sweep`."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.active_sweep_dir = None  # a single run after a sweep in this process (tests, notebooks)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.active_sweep_dir = Path(config.hydra.sweep.dir)
        install_for_process()  # SIGTERM too ends the sweep through `end_interrupted_sweep`
        from qloader.runs import slurm

        if slurm.is_slurm_sweep(config):
            slurm.prepare_sweep(SweepSummary.active_sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = _summary(sweep_dir)
        failed = [f"#{r['job']} ({r['overrides']}: {r['status']})" for r in rows if r["status"] != "succeeded"]
        if failed:
            message = f"{len(failed)} of {len(rows)} jobs did not succeed: {', '.join(failed)}"
            record_sweep_end(sweep_dir, "failed", message)
            print(f"qloader: {message}", file=sys.stderr)
            sys.exit(1)
        record_sweep_end(sweep_dir, "succeeded")


def end_interrupted_sweep(interrupt: KeyboardInterrupt) -> int:
    """After Ctrl-C or SIGTERM outside a single run: settle every job, write the summary, one line; the exit code."""
    name, sweep_dir = signal_name(interrupt), SweepSummary.active_sweep_dir
    if sweep_dir is None or not sweep_dir.is_dir():
        print(f"qloader: interrupted by {name} before any run began", file=sys.stderr)
        return exit_code(interrupt)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the sweep is ending: a repeated Ctrl-C must not cut this short
        signal.signal(sig, signal.SIG_IGN)
    rows = _settle_all(sweep_dir, *_interrupted(name))
    record_sweep_end(sweep_dir, "killed", f"interrupted by {name}")
    done = sum(r["status"] == "succeeded" for r in rows)
    killed = [f"#{r['job']}" for r in rows if r["status"] == "killed"]
    print(
        f"qloader: sweep interrupted by {name}: {done} of {len(rows)} started jobs succeeded"
        f"{', killed: ' + ' '.join(killed) if killed else ''}; summary {sweep_dir}/summary.md",
        file=sys.stderr,
    )
    return exit_code(interrupt)


def end_broken_sweep(error: Exception) -> int:
    """The launcher failed mid-sweep (joblib's TerminatedWorkerError when a worker was killed, sbatch refusing the
    jobs): every job settled, the summary written, one line naming the error and the jobs that did not succeed;
    the exit code (1)."""
    from qloader.runs.report import job_dirs
    from qloader.runs.slurm import sbatch_refusal

    why = sbatch_refusal(error) or f"{type(error).__name__}: {' '.join(str(error).split())}"
    why = why if len(why) <= 400 else why[:399] + "…"
    sweep_dir = SweepSummary.active_sweep_dir
    if sweep_dir is None or not sweep_dir.is_dir():
        print(f"qloader: error: the sweep failed before any job began ({why})", file=sys.stderr)
        return 1
    if not job_dirs(sweep_dir):  # refused before any job was launched (sbatch): no table of no rows
        record_sweep_end(sweep_dir, "failed", why)
        print(f"qloader: error: the sweep failed before any job began: {why}", file=sys.stderr)
        return 1
    rows = _settle_all(sweep_dir, "RunKilled", f"the sweep's launcher failed while this job ran ({why})")
    record_sweep_end(sweep_dir, "failed", why)
    done = sum(r["status"] == "succeeded" for r in rows)
    others = [f"#{r['job']} ({r['status']})" for r in rows if r["status"] != "succeeded"]
    print(
        f"qloader: error: the sweep's launcher failed ({why}); {done} of {len(rows)} started jobs succeeded"
        f"{', not succeeded: ' + ' '.join(others) if others else ''}; summary {sweep_dir}/summary.md",
        file=sys.stderr,
    )
    return 1


def _interrupted(name: str) -> tuple[str, str]:
    """The error type and message recorded for a job the sweep's `name` signal interrupted."""
    error_type = "RunKilled" if name != "SIGINT" else "KeyboardInterrupt"
    return error_type, f"the sweep was interrupted by {name} while this job ran; its process ended without recording it"


def _settle_all(sweep_dir: Path, error_type: str, message: str) -> list[dict]:
    """Every job of the ending sweep with a final status, then the summary; its rows."""
    job_dirs = {p.parent for p in sweep_dir.glob("*/.hydra")} | {p.parent for p in sweep_dir.glob("*/manifest.json")}
    for job_dir in sorted(job_dirs):
        _settle_job(job_dir, error_type, message)
    return _summary(sweep_dir)


def _summary(sweep_dir: Path) -> list[dict]:
    """Write summary.* and print the table; a summary that cannot be written is one line, the table still printed."""
    from qloader.runs.report import collect, markdown, write_summary

    try:
        rows = write_summary(sweep_dir)
    except OSError as e:
        rows = collect(sweep_dir)
        print(f"qloader: error: OutputError: cannot write the sweep summary in {sweep_dir}: {e.strerror or e}",
              file=sys.stderr)  # fmt: skip
    print(f"\nqloader: sweep summary ({sweep_dir}/summary.md)\n" + markdown(rows), flush=True)
    return rows


def _settle_job(job_dir: Path, error_type: str, message: str, cause: str | None = None) -> None:
    """Wait for the job's own process to record its end; if it cannot, record `killed` for it."""
    from qloader.runs.manifest import record_killed_job

    pid = _running_pid(job_dir)
    deadline = time.monotonic() + JOB_EXIT_GRACE_S
    while pid is not None and _is_job_process(pid, job_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
        pid = _running_pid(job_dir)
    if pid is not None and _is_job_process(pid, job_dir):
        os.kill(pid, 9)  # it did not record its end in time: stop it, and record it here
    record_killed_job(job_dir, error_type, message, cause)


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
