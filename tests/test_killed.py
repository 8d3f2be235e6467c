"""Runs that die: a killed run says so, a SIGKILLed one leaves valid JSON, an unwritable output is one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, read_manifest, run_cli
from damage import copy_checkpoint, tree_state

import qloader
from qloader.core.errors import OutputError


def start_cli(*overrides: str, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qloader", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_output(process: subprocess.Popen, text: bytes, timeout: float = 120) -> None:
    """Read the child's stderr until `text` appears (the load stage's progress bar, say)."""
    seen, deadline = b"", time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline and process.poll() is None, seen.decode(errors="replace")
        seen += os.read(process.stderr.fileno(), 4096)


@pytest.mark.smollm2
@pytest.mark.parametrize(
    "sig, code, error_type", [(signal.SIGTERM, 143, "RunKilled"), (signal.SIGINT, 130, "KeyboardInterrupt")]
)
@pytest.mark.slow  # a real process of its own (signals, umask, import side effects): make test-slow
def test_signal_during_load_records_killed_with_the_stage(smollm2_checkpoint, tmp_path, sig, code, error_type) -> None:
    process = start_cli("model=smollm2-135m", "quant=bnb-nf4", "device_map=cpu", run_dir=tmp_path)
    wait_for_output(process, b"load 0/")  # the load stage's progress bar: quantizing SmolLM2 takes seconds
    process.send_signal(sig)
    stderr = process.communicate(timeout=60)[1].decode()
    assert process.returncode == code, stderr
    assert f"qloader: killed by {signal.Signals(sig).name}" in stderr and "Traceback" not in stderr
    manifest = read_manifest(tmp_path)
    assert manifest["status"] == "killed" and manifest["finished_at"] is not None
    assert manifest["error"]["type"] == error_type and manifest["error"]["stage"] == "load"
    assert [s["name"] for s in manifest["stages"]][-1] == "load" and manifest["model"] is None


@pytest.mark.slow
def test_sigkill_at_any_point_leaves_valid_json(tmp_path) -> None:
    """Kill a run at several points: the manifest is absent, or complete JSON (`running`, or the final record)."""
    start = time.monotonic()
    full = run_cli("model=tiny-llama", "quant=bnb-nf4", run_dir=tmp_path / "full")
    assert full.returncode == 0, full.stderr
    duration = time.monotonic() - start
    statuses = set()
    for i, fraction in enumerate((0.3, 0.5, 0.7, 0.8, 0.9, 0.95)):
        run_dir = tmp_path / f"kill-{i}"
        process = start_cli("model=tiny-llama", "quant=bnb-nf4", run_dir=run_dir)
        time.sleep(duration * fraction)
        process.kill()
        process.communicate()
        manifest = run_dir / "manifest.json"
        if manifest.exists():
            data = json.loads(manifest.read_text())  # never torn
            assert data["status"] in ("running", "succeeded"), data["status"]
            statuses.add(data["status"])
    assert "running" in statuses  # at least one kill landed mid-run


def test_unwritable_run_dir_is_one_clear_line(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli("model=tiny-llama", run_dir=blocker / "run")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"qloader: error: OutputError: run dir '{blocker / 'run'}' cannot be created: '{blocker}' is not a directory"
    )
    with pytest.raises(OutputError, match="cannot write the run manifest"):
        qloader.load(["model=tiny-llama"], run_dir=blocker / "api")


def test_disk_full_while_writing_the_manifest(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    """The writes fail (ENOSPC): a clear error, a manifest that says `failed` (rewritten over its own blocks, which
    need no new space), never `running`; the checkpoint is untouched."""
    from qloader.runs import manifest as manifest_module

    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "checkpoint")
    before = tree_state(folder)
    writes = []

    def fsync(fd: int) -> None:
        writes.append(fd)
        if len(writes) > 1:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(manifest_module.os, "fsync", fsync)
    run_dir = tmp_path / "run"
    with pytest.raises(OutputError, match="cannot write the run manifest .*: No space left on device"):
        qloader.load(["model=local", f"model.path={folder}", "quant=bnb-nf4"], run_dir=run_dir)
    manifest = read_manifest(run_dir)
    assert manifest["status"] == "failed" and manifest["error"]["type"] == "OutputError"
    assert {p.name for p in run_dir.iterdir()} - {"qloader.log"} == {"manifest.json"}  # no temp file left behind
    assert tree_state(folder) == before


@pytest.mark.slow  # a real process of its own (signals, umask, import side effects): make test-slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_repeated_signal_does_not_cut_the_record_short(tmp_path, sig) -> None:
    """Ctrl-C pressed twice (or a signal passed on by a sweep after the terminal's): one line, a `killed` record."""
    slow = ["model=tiny-llama", "model.hidden_size=1024", "model.intermediate_size=2816", "model.num_hidden_layers=4"]
    process = start_cli(*slow, "quant=bnb-nf4", run_dir=tmp_path)
    wait_for_output(process, b"load 0/")
    process.send_signal(sig)
    process.send_signal(sig)
    stderr = process.communicate(timeout=120)[1].decode()
    name = signal.Signals(sig).name
    assert process.returncode == 128 + sig, stderr
    assert stderr.count(f"qloader: killed by {name}") == 1 and "Traceback" not in stderr, stderr
    manifest = read_manifest(tmp_path)
    assert manifest["status"] == "killed" and manifest["stages"][-1]["status"] == "killed"
