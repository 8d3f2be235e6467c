"""Records that never say something false (issue 22): a `running` record whose process died is settled `killed` by
whoever reads it next; sweeps and runs never write into another run's dir; manifests are always JSON; a full disk
is one OutputError line with a true final status and no empty leftovers."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
from conftest import REPO, read_manifest, run_cli_in_process

import qloader
from qloader.core.errors import OutputError, RunDirInUseError
from qloader.core.files import write_json_atomic
from qloader.core.names import STAGE_NAMES
from qloader.core.processes import process_identity
from qloader.runs.manifest import manifest_schema

SCHEMA = manifest_schema()
SLOW = ["model=tiny-llama", "model.hidden_size=1024", "model.intermediate_size=2816", "model.num_hidden_layers=4"]
"""A tiny-llama whose 4-bit load takes seconds, so a process can be killed in its load stage."""


def strict_json(path: Path):
    """The file as JSON, refusing what Python's json accepts but JSON does not (NaN, Infinity)."""

    def refuse(constant: str):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def dead_identity() -> dict:
    """The identity of a process that has ended (its pid and start time, as a manifest records them)."""
    process = subprocess.Popen(["sleep", "60"])
    identity = process_identity(process.pid)
    process.kill()
    process.wait()
    return identity


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict:
    """A real manifest of a finished tiny-llama run, to turn into records of runs that died."""
    run_dir = tmp_path_factory.mktemp("recorded") / "run"
    return qloader.load(["model=tiny-llama", "quant=none"], run_dir=run_dir).manifest


def write_running(run_dir: Path, recorded: dict, owner: dict, stage: str = "load") -> Path:
    """A `running` record as a process that died in `stage` leaves it."""
    data = {**recorded, "status": "running", "finished_at": None, "error": None, "owner": owner}
    data.update(running_stage=stage, pid=owner["pid"], run_dir=str(run_dir))
    write_json_atomic(run_dir / "manifest.json", data)
    return run_dir / "manifest.json"


def assert_settled_killed(path: Path, stage: str | None) -> dict:
    manifest = strict_json(path)
    assert manifest["status"] == "killed" and manifest["finished_at"] is not None, manifest["status"]
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["error"]["type"] == "ProcessDied" and manifest["error"]["stage"] == stage, manifest["error"]
    assert manifest["error"]["message"].startswith("process died: pid "), manifest["error"]["message"]
    assert manifest["running_stage"] is None
    return manifest


# ---------------------------------------------------------------- a record whose process died


def read_with(reader: str, run_dir: Path, capsys) -> None:
    """Read the record in `run_dir` as `reader` does: a sweep summary (qloader-report), replay, the next run."""
    if reader == "qloader-report":
        from qloader.runs import report

        report.main([str(run_dir.parent)])
    elif reader == "replay":
        from qloader.runs import replay

        replay.main([str(run_dir / "manifest.json"), "--check-only"])
    elif reader == "next run (API)":
        with pytest.raises(RunDirInUseError):
            qloader.load(["model=tiny-llama", "quant=none"], run_dir=run_dir)
    else:
        result = run_cli_in_process("model=tiny-llama", "quant=none", run_dir=run_dir)
        assert result.returncode == 1 and "RunDirInUseError" in result.stderr, result.stderr
    capsys.readouterr()


@pytest.mark.parametrize("reader", ["qloader-report", "replay", "next run (API)", "next run (CLI)"])
def test_a_record_whose_process_died_is_settled_killed_by_its_next_reader(recorded, tmp_path, reader, capsys) -> None:
    """Before: a run killed by SIGKILL or the OOM killer said `running` forever, whoever read it."""
    run_dir = tmp_path / "sweep" / "0"
    path = write_running(run_dir, recorded, dead_identity(), stage="load")
    read_with(reader, run_dir, capsys)
    manifest = assert_settled_killed(path, "load")
    assert "in its load stage" in manifest["error"]["message"]
    if reader == "qloader-report":
        table = pd.read_csv(tmp_path / "sweep" / "summary.csv")
        assert list(table["status"]) == ["killed"] and table.loc[0, "error"].startswith("ProcessDied: process died")


def test_a_record_whose_process_lives_or_ran_elsewhere_is_left_running(recorded, tmp_path, capsys) -> None:
    alive = write_running(tmp_path / "sweep" / "0", recorded, process_identity())
    elsewhere = write_running(tmp_path / "sweep" / "1", recorded, {**dead_identity(), "host": "another-host"})
    read_with("qloader-report", tmp_path / "sweep" / "0", capsys)
    assert strict_json(alive)["status"] == strict_json(elsewhere)["status"] == "running"


def test_a_run_records_its_owner_and_the_stage_it_is_in(tmp_path, monkeypatch) -> None:
    """What a later reader needs: the owner's pid and start time, and the stage written before it runs."""
    from qloader.runs.manifest import RunManifest

    seen = []
    enter = RunManifest.enter_stage

    def watch(self, name: str) -> None:
        enter(self, name)
        seen.append((name, strict_json(self.path)["running_stage"]))

    monkeypatch.setattr(RunManifest, "enter_stage", watch)
    result = qloader.load(["model=tiny-llama", "quant=none"], run_dir=tmp_path)
    assert [name for name, _ in seen] == [stage["name"] for stage in result.manifest["stages"]]
    assert all(name == on_disk for name, on_disk in seen)
    owner = read_manifest(tmp_path)["owner"]
    assert owner == {**process_identity(), "pid": os.getpid()} and owner["start_ticks"] is not None


# ---------------------------------------------------------------- runs and sweeps never write into another's dir


def test_a_refused_run_leaves_the_other_runs_hydra_record_alone(tmp_path) -> None:
    """Before: the refused run's Hydra had already written its own config over the earlier run's `.hydra/`."""
    first = run_cli_in_process("model=tiny-llama", "quant=none", "summary=false", run_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()}
    manifest_before = (tmp_path / "manifest.json").read_bytes()
    second = run_cli_in_process("model=tiny-llama", "quant=bnb-nf4", run_dir=tmp_path)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"qloader: error: RunDirInUseError: run dir '{tmp_path}' already holds a manifest.json, the record of another "
        "run; choose a new run dir (hydra.run.dir=..., or run_dir=... in qloader.load): a manifest is never overwritten"
    ]
    assert {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()} == before
    assert (tmp_path / "manifest.json").read_bytes() == manifest_before


def test_a_run_dir_claimed_by_a_run_started_at_the_same_time_is_refused(tmp_path) -> None:
    """Two runs into one dir at once: the first makes `.hydra/` (exclusively), the second is refused before it
    writes anything. Before: both ran, each writing its `.hydra/` over the other's."""
    (tmp_path / ".hydra").mkdir()
    result = run_cli_in_process("model=tiny-llama", "quant=none", run_dir=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"qloader: error: RunDirInUseError: run dir '{tmp_path}' already holds .hydra/, the record of another run; "
        "choose a new run dir (hydra.run.dir=..., or run_dir=... in qloader.load): a manifest is never overwritten"
    ]
    assert [p.name for p in tmp_path.iterdir()] == [".hydra"] and not any((tmp_path / ".hydra").iterdir())


def used_sweep_dir(tmp_path: Path, recorded: dict) -> Path:
    """A sweep dir as an earlier sweep left it: job 0 with its `.hydra/` and manifest."""
    from omegaconf import OmegaConf

    from qloader.config.compose import compose

    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0" / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose(["model=tiny-llama", "quant=none"]), sweep_dir / "0" / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(["model=tiny-llama", "quant=none"]), sweep_dir / "0" / ".hydra" / "overrides.yaml")
    write_json_atomic(sweep_dir / "0" / "manifest.json", recorded)
    return sweep_dir


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_sweep_into_a_used_sweep_dir_is_refused_before_any_job(recorded, tmp_path) -> None:
    """Before: the job was refused with RunDirInUseError, yet the sweep printed `succeeded`, summed up the old job's
    row, exited 0, and the old job's `.hydra/` no longer matched its manifest."""
    sweep_dir = used_sweep_dir(tmp_path, recorded)
    before = tree(sweep_dir)
    result = run_cli_in_process(
        "-m", "model=tiny-llama", "quant=bnb-nf4", f"hydra.sweep.dir={sweep_dir}", run_dir=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"qloader: error: RunDirInUseError: sweep dir '{sweep_dir}' already holds another sweep's jobs "
        "(0/manifest.json, 0/.hydra/); choose a new sweep dir (hydra.sweep.dir=NEW): a record is never overwritten; "
        "or sweep.resume=true to run the jobs of an ended sweep that did not succeed"
    ]
    assert "job #0" not in result.stdout
    assert tree(sweep_dir) == before  # no multirun.yaml, no summary, the old job untouched


def test_a_sweep_subdir_that_can_give_two_jobs_one_dir_is_refused(tmp_path) -> None:
    """With `hydra.sweep.subdir=same`, Hydra wrote the second job's `.hydra/` over the first's."""
    sweep_dir = tmp_path / "sweep"
    result = run_cli_in_process(
        "-m", "model=tiny-llama", "quant=none,bnb-nf4", f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=same",
        run_dir=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith("qloader: error: ConfigError: hydra.sweep.subdir 'same' names neither ${hydra.job.num}")
    assert line.endswith("keep ${hydra.job.num} in it (its default: hydra.sweep.subdir='${hydra.job.num}')")
    assert "\n" not in line and not sweep_dir.exists()


# ---------------------------------------------------------------- manifests are JSON


def test_nan_and_inf_are_written_as_null(tmp_path) -> None:
    path = tmp_path / "record.json"
    write_json_atomic(path, {"a": float("nan"), "b": [1.0, float("inf"), {"c": float("-inf")}], "d": (2.5,)})
    assert strict_json(path) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2.5]}


def test_a_nan_probe_result_leaves_a_json_manifest(tmp_path, monkeypatch) -> None:
    """Before: a probe whose reference held NaN wrote a literal `NaN` into manifest.json, which is not JSON."""
    from qloader.runs import pipeline

    def probe(ctx):
        nan = float("nan")
        return ctx.next(probe={"perplexity": nan, "reference_perplexity": float("inf"), "mean_kl": nan})

    stages_for = pipeline.stages_for
    monkeypatch.setattr(pipeline, "stages_for", lambda cfg: [*stages_for(cfg), ("probe", probe)])
    result = qloader.load(["model=tiny-llama", "quant=none"], run_dir=tmp_path)
    manifest = strict_json(tmp_path / "manifest.json")
    assert manifest["status"] == "succeeded" and result.manifest["status"] == "succeeded"
    assert {key: manifest["probe"][key] for key in ("perplexity", "reference_perplexity", "mean_kl")} == dict.fromkeys(
        ("perplexity", "reference_perplexity", "mean_kl")
    )


# ---------------------------------------------------------------- full disks


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def save_config_on_a_full_disk(monkeypatch) -> None:
    """Hydra's `_save_config` on a full disk: the file is created, its content cannot be written."""
    import hydra.core.utils

    def save(cfg, filename: str, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / filename).touch()
        enospc()

    monkeypatch.setattr(hydra.core.utils, "_save_config", save)


def test_a_run_dir_on_a_full_disk_is_one_line_and_a_failed_manifest(tmp_path, monkeypatch) -> None:
    """Hydra cannot write `.hydra/`, but a manifest fits: one OutputError line, a `failed` manifest, nothing empty.
    Before: Hydra's `_save_config` traceback, no manifest and a 0-byte config.yaml."""
    save_config_on_a_full_disk(monkeypatch)
    run_dir = tmp_path / "run"
    result = run_cli_in_process("model=tiny-llama", "quant=none", run_dir=run_dir)
    assert result.returncode == 1
    error = (
        f"OutputError: run dir '{run_dir}' cannot be written: No space left on device; free some space or choose "
        "another run dir (hydra.run.dir=...)"
    )
    assert result.stderr.strip().splitlines() == [
        f"qloader: error: {error}",
        f"qloader: manifest (failed): {run_dir / 'manifest.json'}",
    ]
    manifest = strict_json(run_dir / "manifest.json")
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["status"] == "failed" and f"{manifest['error']['type']}: {manifest['error']['message']}" == error
    assert [p.name for p in run_dir.iterdir()] == ["manifest.json"]  # no .hydra/ with empty files, no empty log


def test_a_run_dir_on_a_disk_where_nothing_fits_leaves_nothing(tmp_path, monkeypatch) -> None:
    from qloader.core import files

    save_config_on_a_full_disk(monkeypatch)
    monkeypatch.setattr(files.os, "fsync", enospc)
    disk = tmp_path / "disk"
    disk.mkdir()
    result = run_cli_in_process("model=tiny-llama", "quant=none", run_dir=disk / "outputs" / "run")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"qloader: error: OutputError: run dir '{disk / 'outputs' / 'run'}' cannot be written: No space left on "
        "device; free some space or choose another run dir (hydra.run.dir=...)"
    ]
    assert list(disk.iterdir()) == []  # not even the folders Hydra made


def test_a_sweep_dir_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    from qloader.core import files

    monkeypatch.setattr(files.os, "fsync", enospc)
    sweep_dir = tmp_path / "multirun" / "sweep"
    result = run_cli_in_process(
        "-m", "model=tiny-llama", "quant=none", f"hydra.sweep.dir={sweep_dir}", run_dir=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"qloader: error: OutputError: sweep dir '{sweep_dir}' cannot be written: No space left on device; free some "
        "space or choose another sweep dir (hydra.sweep.dir=NEW)"
    ]
    assert not (tmp_path / "multirun").exists()  # not even the folders the claim made


def final_write_on_a_full_disk(monkeypatch) -> None:
    """The disk fills up at the end of the run: a temp file holding a final record cannot be flushed; the
    manifest's own blocks can still be rewritten."""
    from qloader.core import files

    fsync = os.fsync

    def full(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.name.startswith(".manifest.json.") and b'"status": "running"' not in path.read_bytes():
            enospc()
        fsync(fd)

    monkeypatch.setattr(files.os, "fsync", full)


def test_disk_full_at_the_final_manifest_write_leaves_a_true_status(tmp_path, monkeypatch) -> None:
    """Before: the terminal said `manifest (failed)` while the file said `running`."""
    final_write_on_a_full_disk(monkeypatch)
    result = run_cli_in_process("model=tiny-llama", "quant=none", run_dir=tmp_path)
    path = tmp_path / "manifest.json"
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-2:] == [
        f"qloader: error: OutputError: cannot write the run manifest {path}: No space left on device",
        f"qloader: manifest (failed): {path}",
    ]
    manifest = strict_json(path)
    assert manifest["status"] == "failed" and manifest["finished_at"] is not None
    message = f"cannot write the run manifest {path}: No space left on device"
    assert manifest["error"] == {"type": "OutputError", "message": message, "stage": None}
    assert manifest["running_stage"] is None and manifest["overrides"] == ["model=tiny-llama", "quant=none"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "manifest.json", "qloader.log"]  # no temp file


def test_nothing_fits_at_the_final_write_then_no_manifest_line(tmp_path, monkeypatch) -> None:
    """Where not even the manifest's own blocks can be rewritten, the terminal does not point at a `running` file."""
    from qloader.runs import manifest

    final_write_on_a_full_disk(monkeypatch)
    monkeypatch.setattr(manifest, "rewrite_json_in_place", enospc, raising=False)
    result = run_cli_in_process("model=tiny-llama", "quant=none", run_dir=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("qloader: error: OutputError: cannot write the run")
    assert "manifest (failed)" not in result.stderr and read_manifest(tmp_path)["status"] == "running"


def test_rewrite_in_place_keeps_the_file_size_and_refuses_what_does_not_fit(tmp_path) -> None:
    from qloader.core.files import rewrite_json_in_place

    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"status": "running", "config": {"x": "y" * 100}})
    size = path.stat().st_size
    rewrite_json_in_place(path, {"status": "failed", "config": {"x": "y" * 100}})
    assert path.stat().st_size == size and strict_json(path)["status"] == "failed"
    with pytest.raises(OSError) as refused:
        rewrite_json_in_place(path, {"status": "failed", "config": {"x": "y" * 1000}})
    assert refused.value.errno == errno.ENOSPC and strict_json(path)["status"] == "failed"


def test_api_disk_full_at_the_final_write_raises_with_a_failed_record(tmp_path, monkeypatch) -> None:
    final_write_on_a_full_disk(monkeypatch)
    with pytest.raises(OutputError, match="cannot write the run manifest .*: No space left on device"):
        qloader.load(["model=tiny-llama", "quant=none"], run_dir=tmp_path)
    assert strict_json(tmp_path / "manifest.json")["status"] == "failed"


# ---------------------------------------------------------------- processes killed for real (slow)


def start_cli(*overrides: str, run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qloader", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_for(condition, process: subprocess.Popen | None = None, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def running_stage(run_dir: Path) -> str | None:
    try:
        data = json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data.get("running_stage") if data.get("status") == "running" else None


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["resolve", "load", "save"], ids=["cache-build", "load", "save"])
def test_sigkill_in_a_stage_is_settled_killed_in_that_stage(tmp_path, stage, capsys) -> None:
    """Before: a run killed in its cache build, load or save said `running` with `stages: []` forever."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    quant = "quant=bnb-nf4" if stage == "load" else "quant=none"
    extra = ["save.enabled=true", f"save.dir={tmp_path / 'saved'}"] if stage == "save" else []
    process = start_cli(*SLOW, quant, *extra, run_dir=run_dir, env={"QLOADER_CACHE": str(cache)})
    if stage == "resolve":  # the checkpoint is being built into the fresh cache
        wait_for(lambda: running_stage(run_dir) == "resolve" and any(cache.glob("**/.build-tiny-llama-*/")), process,
                 what="the cache build")  # fmt: skip
    else:
        wait_for(lambda: running_stage(run_dir) == stage, process, what=f"the {stage} stage")
    process.kill()
    process.wait()
    assert strict_json(run_dir / "manifest.json")["status"] == "running"  # what SIGKILL leaves
    read_with("next run (CLI)", run_dir, capsys)
    manifest = assert_settled_killed(run_dir / "manifest.json", stage)
    order = [*STAGE_NAMES, "save"]
    assert [s["name"] for s in manifest["stages"]] == order[: order.index(stage)]  # the stages it finished


def start_sweep(*overrides: str, sweep_dir: Path, new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qloader", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=os.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=new_session,
    )  # fmt: skip


def sweep(*overrides: str, sweep_dir: Path) -> subprocess.CompletedProcess:
    process = start_sweep(*overrides, sweep_dir=sweep_dir)
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.slow
def test_a_second_sweep_into_a_used_sweep_dir_is_refused(tmp_path) -> None:
    sweep_dir = tmp_path / "sweep"
    first = sweep("model=tiny-llama", "quant=none", sweep_dir=sweep_dir)
    assert first.returncode == 0, first.stderr
    before = tree(sweep_dir)
    second = sweep("model=tiny-llama", "quant=bnb-nf4", sweep_dir=sweep_dir)
    assert second.returncode == 1 and "job #0" not in second.stdout
    assert second.stderr.strip().splitlines() == [
        f"qloader: error: RunDirInUseError: sweep dir '{sweep_dir}' already holds another sweep's jobs (.qloader, "
        "multirun.yaml, 0/manifest.json and 1 more); choose a new sweep dir (hydra.sweep.dir=NEW): a record is never "
        "overwritten; or sweep.resume=true to run the jobs of an ended sweep that did not succeed"
    ]
    assert tree(sweep_dir) == before


@pytest.mark.slow
def test_two_sweeps_started_into_one_dir_at_once_do_not_both_run(tmp_path) -> None:
    """Before: each job read the other sweep's `.hydra/config.yaml`; both exited 0 and two loads never ran."""
    sweep_dir = tmp_path / "sweep"
    processes = [start_sweep("model=tiny-llama", f"quant={q}", sweep_dir=sweep_dir) for q in ("bnb-nf4", "bnb-fp4")]
    results = [(p.returncode, out, err) for p in processes for out, err in [p.communicate(timeout=600)]]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, _, err in results if code == 1)
    assert refused.strip().startswith(f"qloader: error: RunDirInUseError: sweep dir '{sweep_dir}'"), refused
    assert len(refused.strip().splitlines()) == 1
    from omegaconf import OmegaConf

    manifest = read_manifest(sweep_dir / "0")  # the job's record and its `.hydra/` are one run's
    assert manifest["status"] == "succeeded"
    assert manifest["overrides"] == list(OmegaConf.load(sweep_dir / "0" / ".hydra" / "overrides.yaml"))
    assert not (sweep_dir / "1").exists()


@pytest.mark.slow
def test_a_job_refused_by_run_dir_in_use_is_a_failed_row(recorded, tmp_path, capsys) -> None:
    """Before: the refused job's status was read from the other run's manifest (`succeeded`) and the sweep exited 0."""
    from omegaconf import OmegaConf

    from qloader.runs.sweep import SWEEP_RECORDS, SweepSummary, run_job

    sweep_dir = used_sweep_dir(tmp_path, recorded)  # job 0's dir holds another run's manifest
    (sweep_dir / SWEEP_RECORDS).mkdir()
    hydra = {"hydra": {"runtime": {"choices": {"model": "tiny-llama", "quant": "none"}}}}
    OmegaConf.save(OmegaConf.create(hydra), sweep_dir / "0" / ".hydra" / "hydra.yaml")
    other = (sweep_dir / "0" / "manifest.json").read_bytes()
    assert run_job(sweep_dir / "0", 0, ["model=tiny-llama", "quant=none"], sweep_dir) == "failed"
    assert "qloader: job #0 model=tiny-llama quant=none: failed in" in capsys.readouterr().out
    with pytest.raises(SystemExit) as ended:
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    assert ended.value.code == 1
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert list(table["job"]) == [0] and list(table["status"]) == ["failed"]
    assert table.loc[0, "error"].startswith(f"RunDirInUseError: job dir '{sweep_dir / '0'}' already holds a manifest")
    assert (sweep_dir / "0" / "manifest.json").read_bytes() == other


def job_pid(job_dir: Path) -> int:
    return read_manifest(job_dir)["pid"]


@pytest.mark.slow
def test_a_sigkilled_sweep_job_is_a_killed_row(tmp_path) -> None:
    """Before: its row said `running` with total 0."""
    sweep_dir = tmp_path / "sweep"
    process = start_sweep(*SLOW, "quant=bnb-nf4,none", sweep_dir=sweep_dir)
    wait_for(lambda: running_stage(sweep_dir / "0") == "load", process, what="job 0's load")
    os.kill(job_pid(sweep_dir / "0"), signal.SIGKILL)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 1, err
    assert f"qloader: job #0 {' '.join(SLOW)} quant=bnb-nf4: killed in" in out
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert list(table["status"]) == ["killed", "succeeded"]
    assert table.loc[0, "error"].startswith("ProcessDied: process died: pid ")
    assert_settled_killed(sweep_dir / "0" / "manifest.json", "load")


JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


@pytest.mark.slow
def test_a_killed_joblib_worker_still_ends_the_sweep_with_a_summary(tmp_path) -> None:
    """Before: a `TerminatedWorkerError` traceback and no summary."""
    sweep_dir = tmp_path / "sweep"
    process = start_sweep(*JOBLIB, *SLOW, "quant=bnb-nf4,bnb-int8", sweep_dir=sweep_dir)
    wait_for(lambda: running_stage(sweep_dir / "0") == "load", process, what="job 0's load")
    worker = int(Path(f"/proc/{job_pid(sweep_dir / '0')}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(worker, signal.SIGKILL)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 1, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qloader: error: the sweep's launcher failed (TerminatedWorkerError: "), last
    assert "#0 (killed)" in last and last.endswith(f"summary {sweep_dir}/summary.md"), last
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert table.loc[0, "status"] == "killed" and set(table["status"]) <= {"killed", "succeeded"}
    for job in table["job"]:
        manifest = strict_json(sweep_dir / str(job) / "manifest.json")
        jsonschema.validate(manifest, SCHEMA)
        assert manifest["status"] in ("killed", "succeeded") and manifest["running_stage"] is None


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], JOBLIB], ids=["basic", "joblib"])
def test_an_orphaned_job_never_records_succeeded(tmp_path, launcher) -> None:
    """Before: after the sweep was SIGKILLed, its job went on and recorded `succeeded` for a sweep that no longer
    existed. Now the job watches its sweep, stops and records `killed` in the stage it was in."""
    sweep_dir = tmp_path / "sweep"
    # a session of its own: joblib's idle workers outlive the sweep holding its pipes, so they are ended with
    # their group afterwards rather than waited for (they exit only after an idle timeout of minutes)
    process = start_sweep(*launcher, *SLOW, "quant=bnb-nf4", sweep_dir=sweep_dir, new_session=True)
    try:
        wait_for(lambda: running_stage(sweep_dir / "0") == "load", process, what="job 0's load")
        process.kill()
        process.wait()
        wait_for(lambda: running_stage(sweep_dir / "0") is None, timeout=300, what="the job to end")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    manifest = strict_json(sweep_dir / "0" / "manifest.json")
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["status"] == "killed", manifest["status"]
    assert manifest["error"]["type"] == "RunKilled" and manifest["error"]["message"].endswith(
        "ended; the job stopped with it"
    )
    assert manifest["error"]["stage"] in ("load", "postprocess")


@pytest.mark.slow
def test_a_run_dir_past_the_file_size_limit_is_one_line_and_leaves_nothing(tmp_path) -> None:
    """A real write failure (RLIMIT_FSIZE 0: every write to a file fails with EFBIG) while Hydra saves `.hydra/`.
    Before: Hydra's `_save_config` traceback and a 0-byte config.yaml."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    disk = tmp_path / "disk"
    disk.mkdir()
    run_dir = disk / "run"
    result = subprocess.run(
        [sys.executable, "-m", "qloader", "model=tiny-llama", "quant=none", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=300, preexec_fn=limit,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"qloader: error: OutputError: run dir '{run_dir}' cannot be written: File too large; free some space or "
        "choose another run dir (hydra.run.dir=...)"
    ]
    assert list(disk.iterdir()) == []


def test_an_interrupt_a_library_turned_into_its_own_error_is_recorded_killed() -> None:
    """Before: a Ctrl-C that landed inside a torch copy surfaced as `ValueError: could not determine the shape of
    object type 'torch.storage.UntypedStorage'`, and the sweep job was recorded `failed` with a LoadError."""
    import os
    import signal

    from qloader.core.interrupts import as_interrupt, signals_as_interrupt

    with signals_as_interrupt():
        assert isinstance(as_interrupt(ValueError("x")), ValueError)  # no signal: an error is an error
        try:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                raise ValueError("could not determine the shape of object type 'UntypedStorage'") from None
        except ValueError as error:
            ended = as_interrupt(error)
    assert isinstance(ended, KeyboardInterrupt)
    assert str(ended).startswith("interrupted by SIGINT (ValueError surfaced: could not determine the shape")
    with signals_as_interrupt():  # the next run starts with no signal received
        assert isinstance(as_interrupt(ValueError("x")), ValueError)
