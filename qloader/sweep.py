"""Sweeps: each job loads in a fresh process; when the sweep ends, one summary of all jobs."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def run_job(run_dir: Path, job_num: int, overrides: list[str]) -> str:
    """One sweep job: a line as it starts and ends, its load in a child process; returns its status."""
    import json

    from qloader.job import run_in_fresh_process

    label = f"#{job_num} {' '.join(overrides)}"
    print(f"qloader: job {label}: started", flush=True)
    start = time.perf_counter()
    run_in_fresh_process(run_dir)
    manifest = run_dir / "manifest.json"
    status = json.loads(manifest.read_text())["status"] if manifest.is_file() else "missing"
    print(f"qloader: job {label}: {status} in {time.perf_counter() - start:.1f} s", flush=True)
    return status


class SweepSummary(Callback):
    """Writes summary.csv / .md / .png when a multirun ends; a failed job makes the sweep exit 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from qloader.report import markdown, write_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        print(f"\nqloader: sweep summary ({sweep_dir}/summary.md)\n" + markdown(rows), flush=True)
        failed = [f"#{r['job']} ({r['overrides']})" for r in rows if r["status"] != "succeeded"]
        if failed:
            print(f"qloader: {len(failed)} of {len(rows)} jobs failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)
