"""Sweeps on a real SLURM cluster (`bash .ci/slurm start` runs a single-node one here; `make test-slurm`).

A job that must still be loading when the cluster stops it holds its load stage on a file (tests/gated_method.py),
so no test depends on how fast this machine is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

pytestmark = pytest.mark.slurm
TESTS = Path(__file__).parent
TINY = ["model=tiny-llama", "device_map=cpu"]
GATED = "quant._target_=null,gated_method.RtnInt8Config"
"""Job 0 unquantized; job 1 the gated method, held in its load stage until its gate file exists."""


def _cluster() -> str | None:
    """Why there is no cluster to test on (None: a node is up)."""
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"no SLURM here ({type(e).__name__}): start one with `bash .ci/slurm start`"
    if not {"idle", "mix", "alloc"} & set(states.split()):
        return f"no SLURM node is up (sinfo: {states.strip() or 'nothing'}): start one with `bash .ci/slurm start`"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Skipped without a cluster, except in CI (`CI=true`), which starts the one these tests need."""
    if (why := _cluster()) is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)


def env_with(gate: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    if gate is not None:
        env["QLOADER_TEST_GATE"] = str(gate)
    return env


def slurm_sweep(*overrides: str, sweep_dir: Path, gate: Path | None = None, wait: bool = True):
    args = [sys.executable, "-m", "qloader", "-m", "hydra/launcher=slurm", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    if not wait:
        return subprocess.Popen(args, cwd=REPO, env=env_with(gate), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
    return subprocess.run(args, cwd=REPO, env=env_with(gate), capture_output=True, text=True, timeout=600)


def manifest(sweep_dir: Path, job: int, name: str = "manifest.json") -> dict:
    return json.loads((sweep_dir / str(job) / name).read_text())


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the sweep ended before {what}:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def stage_of(sweep_dir: Path, job: int) -> str | None:
    try:
        data = manifest(sweep_dir, job)
    except (OSError, ValueError):
        return None
    return data.get("running_stage") if data.get("status") == "running" else data.get("status")


def slurm_job_of(sweep_dir: Path, job: int) -> str:
    """The SLURM id of the sweep's job `job` (submitit's folder for it holds `<id>_submitted.pkl`)."""
    found = sorted(sweep_dir.glob(f".submitit/*_{job}/*_{job}_submitted.pkl"))
    assert found, f"no submitit record of job {job} in {sweep_dir / '.submitit'}"
    return found[0].name.removesuffix("_submitted.pkl")


def test_two_method_sweep_runs_with_the_launchers_defaults(tmp_path) -> None:
    """Before: every job asked for a GPU, 8 CPUs and 64 GB (sbatch: Invalid generic resource), and submitit's
    `Bypassing sacct error` lines filled the terminal."""
    result = slurm_sweep(*TINY, "quant=none,bnb-nf4", sweep_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "summary.csv")
    assert list(table["status"]) == ["succeeded", "succeeded"]
    assert table.loc[1, "compression"] > 1.0
    assert "Bypassing" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert "#1 : model=tiny-llama device_map=cpu quant=bnb-nf4" in (tmp_path / ".qloader" / "launcher.log").read_text()
    script = next(tmp_path.glob(".submitit/*/*_submission.sh")).read_text()
    assert "--cpus-per-task=1" in script and "gpu" not in script.lower() and "--mem" not in script
    assert json.loads((tmp_path / ".qloader" / "sweep.json").read_text())["status"] == "succeeded"
    for job in (0, 1):  # each job's own record: it ran under SLURM, in a process of its own
        assert manifest(tmp_path, job)["status"] == "succeeded"


def test_a_partition_the_cluster_lacks_is_one_line_and_a_failed_sweep_record(tmp_path) -> None:
    result = slurm_sweep(*TINY, "quant=none", "hydra.launcher.partition=no-such-partition", sweep_dir=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "sbatch refused the sweep's jobs (sbatch: error: " in lines[0] and "partition" in lines[0].lower()
    assert "hydra.launcher.partition" in lines[0]
    record = json.loads((tmp_path / ".qloader" / "sweep.json").read_text())
    assert record["status"] == "failed" and "sbatch" in record["error"]


def test_a_cancelled_job_is_killed_in_its_stage_and_resume_reruns_only_it(tmp_path) -> None:
    gate, sweep_dir = tmp_path / "gate", tmp_path / "sweep"
    process = slurm_sweep(*TINY, GATED, sweep_dir=sweep_dir, gate=gate, wait=False)
    wait_until(lambda: stage_of(sweep_dir, 1) == "load" and stage_of(sweep_dir, 0) == "succeeded", process,
               "job 1 to be held in its load stage")  # fmt: skip
    subprocess.run(["scancel", slurm_job_of(sweep_dir, 1)], check=True)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    assert "1 of 2 jobs did not succeed: #1" in err and "killed" in err
    killed = manifest(sweep_dir, 1)
    assert killed["status"] == "killed" and killed["error"]["stage"] == "load"
    assert killed["error"]["cause"] == "cancelled" and "SLURM stopped job" in killed["error"]["message"]
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert list(table["status"]) == ["succeeded", "killed"]  # every row, the killed job's too

    first_job0 = (sweep_dir / "0" / "manifest.json").read_text()
    gate.touch()  # the rerun of job 1 is not held
    resumed = slurm_sweep(*TINY, GATED, "sweep.resume=true", sweep_dir=sweep_dir, gate=gate)
    assert resumed.returncode == 0, resumed.stderr
    assert (sweep_dir / "0" / "manifest.json").read_text() == first_job0  # skipped: it succeeded with these inputs
    assert not (sweep_dir / "0" / "manifest.attempt-1.json").exists()
    rerun = manifest(sweep_dir, 1)
    assert rerun["status"] == "succeeded" and rerun["previous_attempt"] == "manifest.attempt-1.json"
    assert manifest(sweep_dir, 1, "manifest.attempt-1.json") == killed  # the earlier record, kept as it was
    assert list(pd.read_csv(sweep_dir / "summary.csv")["status"]) == ["succeeded", "succeeded"]
    record = json.loads((sweep_dir / ".qloader" / "sweep.json").read_text())
    assert record["status"] == "succeeded" and [e["status"] for e in record["earlier"]] == ["failed"]


TIME_LIMIT = ("hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=45")


def test_a_job_past_its_time_limit_is_killed_with_that_cause(tmp_path) -> None:
    """Before: `UncompletedJobError: Job not requeued because: timed-out too many times.`, no summary, and the
    job's manifest left `running`. SLURM warns a job (SIGUSR2) `signal_delay_s` before its time limit, on the
    controller's next check: a limit of 2 minutes with a 45 s delay warns it about 75 s after it starts, once it
    is in its load stage (a 1-minute limit under the default 120 s delay warned it at once, before a job whose
    imports were slow had begun)."""
    gate = tmp_path / "gate"  # never opened: the job cannot finish in time
    job = "quant._target_=gated_method.RtnInt8Config"
    result = slurm_sweep(*TINY, job, *TIME_LIMIT, sweep_dir=tmp_path / "sweep", gate=gate)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "1 of 1 jobs did not succeed: #0" in result.stderr
    killed = manifest(tmp_path / "sweep", 0)
    assert killed["status"] == "killed" and killed["error"]["cause"] == "time limit"
    assert killed["error"]["stage"] is not None and "time limit 00:02:00" in killed["error"]["message"]
    assert list(pd.read_csv(tmp_path / "sweep" / "summary.csv")["status"]) == ["killed"]


def test_a_requeued_job_writes_a_new_record_pointing_to_the_first(tmp_path) -> None:
    """hydra.launcher.max_num_timeout=1: the timed-out job is requeued once through submitit's checkpointing;
    its second attempt times out too, and each attempt has its own record."""
    gate, sweep_dir = tmp_path / "gate", tmp_path / "sweep"
    job = "quant._target_=gated_method.RtnInt8Config"
    result = slurm_sweep(*TINY, job, *TIME_LIMIT, "hydra.launcher.max_num_timeout=1",
                         sweep_dir=sweep_dir, gate=gate)  # fmt: skip
    assert result.returncode == 1 and "1 of 1 jobs did not succeed: #0" in result.stderr, result.stderr
    first, second = manifest(sweep_dir, 0, "manifest.attempt-1.json"), manifest(sweep_dir, 0)
    assert first["status"] == second["status"] == "killed"
    assert first["error"]["cause"] == second["error"]["cause"] == "time limit"
    assert second["previous_attempt"] == "manifest.attempt-1.json" and first["previous_attempt"] is None
    assert second["started_at"] > first["finished_at"]
