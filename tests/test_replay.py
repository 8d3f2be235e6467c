"""Reproducible runs: weights fingerprint, cached input hashes, replay, experiments, pinned hashes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, read_manifest, run_cli_in_process

import qloader
from qloader.config.compose import compose
from qloader.measure.fingerprint import weights_fingerprint
from qloader.runs.manifest import config_hash, resolved_config
from qloader.runs.replay import experiment_yaml


def replay_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m qloader replay ...` in a process: replay is a light entry point (torch loads only for a load), so
    its refusals and --check-only cost a fraction of a second; a full replay comes only in the slow tests."""
    return subprocess.run(
        [sys.executable, "-m", "qloader", "replay", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ,
        timeout=300,
    )


@pytest.fixture
def local_copy(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of tiny-llama, free to change or delete."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def test_fingerprint_is_stable_and_sees_one_flipped_bit(tmp_path) -> None:
    first = qloader.load(["model=tiny-llama", "quant=bnb-nf4"], run_dir=tmp_path / "a")
    second = qloader.load(["model=tiny-llama", "quant=bnb-nf4"], run_dir=tmp_path / "b")
    fingerprint = first.manifest["weights_fingerprint"]
    assert fingerprint == second.manifest["weights_fingerprint"] == weights_fingerprint(first.model)
    other = qloader.load(["model=tiny-llama", "quant=bnb-fp4"], run_dir=tmp_path / "c")
    assert other.manifest["weights_fingerprint"] != fingerprint

    packed = first.model.model.layers[1].mlp.down_proj.weight
    packed.data.view(-1)[7] ^= 1  # one bit of one packed 4-bit weight
    assert weights_fingerprint(first.model) != fingerprint
    packed.data.view(-1)[7] ^= 1
    assert weights_fingerprint(first.model) == fingerprint
    absmax = second.model.model.layers[0].self_attn.q_proj.weight.quant_state.absmax  # a quant-state tensor
    absmax.view(-1)[0] ^= 1
    assert weights_fingerprint(second.model) != fingerprint


def test_input_hashes_are_cached_outside_the_checkpoint(local_copy, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QLOADER_CACHE", str(tmp_path / "cache"))
    before = {p.name: p.stat().st_mtime_ns for p in local_copy.iterdir()}
    overrides = ["model=local", f"model.path={local_copy}", "quant=none"]
    first = qloader.load(overrides, run_dir=tmp_path / "1").manifest["checkpoint"]
    second = qloader.load(overrides, run_dir=tmp_path / "2").manifest["checkpoint"]
    assert first["hashed_files"] == len(first["files"]) == 10 and second["hashed_files"] == 0
    assert first["files"] == second["files"] and second["hash_seconds"] >= 0
    os.utime(local_copy / "config.json")  # a touched file is hashed again
    assert qloader.load(overrides, run_dir=tmp_path / "3").manifest["checkpoint"]["hashed_files"] == 1
    assert (tmp_path / "cache" / "sha256-cache.json").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in local_copy.iterdir()} == {
        **before,
        "config.json": (local_copy / "config.json").stat().st_mtime_ns,
    }


@pytest.mark.slow
def test_replay_reproduces_the_run(tmp_path) -> None:
    assert run_cli_in_process("model=tiny-llama", "quant=bnb-nf4", run_dir=tmp_path / "orig").returncode == 0
    result = replay_cli(tmp_path / "orig" / "manifest.json", "--run-dir", tmp_path / "replay")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert lines["weights_fingerprint"].endswith("equal") and lines["config_hash"].endswith("equal")
    new = read_manifest(tmp_path / "replay")
    old = read_manifest(tmp_path / "orig")
    assert new["replay_of"] == str((tmp_path / "orig" / "manifest.json").resolve())
    assert new["config"] == old["config"] and new["weights_fingerprint"] == old["weights_fingerprint"]


@pytest.mark.slow
def test_replay_uses_the_recorded_config_not_todays_defaults(tmp_path) -> None:
    assert run_cli_in_process("model=tiny-llama", "quant=bnb-int8", run_dir=tmp_path / "orig").returncode == 0
    manifest = read_manifest(tmp_path / "orig")
    manifest["config"]["quant"]["llm_int8_threshold"] = 5.0  # as if conf/ had since changed
    manifest["config_hash"] = config_hash(manifest["config"])
    (tmp_path / "orig" / "manifest.json").write_text(json.dumps(manifest))
    replay_cli(tmp_path / "orig" / "manifest.json", "--run-dir", tmp_path / "replay")
    assert read_manifest(tmp_path / "replay")["config"]["quant"]["llm_int8_threshold"] == 5.0


@pytest.mark.slow
def test_changed_shard_is_named_and_fails_the_replay(local_copy, tmp_path) -> None:
    assert run_cli_in_process("model=local", f"model.path={local_copy}", run_dir=tmp_path / "orig").returncode == 0
    shard = local_copy / "model-00003-of-00007.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's data; the file stays valid safetensors
    shard.write_bytes(bytes(data))
    result = replay_cli(tmp_path / "orig" / "manifest.json", "--run-dir", tmp_path / "replay")
    assert result.returncode == 1
    assert "replay differs: checkpoint file model-00003-of-00007.safetensors, weights_fingerprint" in result.stderr
    check = replay_cli(tmp_path / "orig" / "manifest.json", "--check-only")
    assert check.returncode == 1 and "checkpoint file model-00003-of-00007.safetensors" in check.stderr


def test_check_only_names_a_library_version_drift(tmp_path) -> None:
    assert run_cli_in_process("model=tiny-llama", run_dir=tmp_path / "orig").returncode == 0
    manifest = read_manifest(tmp_path / "orig")
    current = manifest["versions"]["bitsandbytes"]
    manifest["versions"]["bitsandbytes"] = "0.49.0"
    (tmp_path / "orig" / "manifest.json").write_text(json.dumps(manifest))
    result = replay_cli(tmp_path / "orig" / "manifest.json", "--check-only")
    assert result.returncode == 0  # environment drift is reported, inputs are equal
    row = next(line for line in result.stdout.splitlines() if line.startswith("bitsandbytes version"))
    assert "0.49.0" in row and current in row and row.endswith("different (environment)")
    assert not (tmp_path / "orig" / "replay").exists()


@pytest.mark.slow
def test_missing_checkpoint_is_a_clear_error(local_copy, tmp_path) -> None:
    assert run_cli_in_process("model=local", f"model.path={local_copy}", run_dir=tmp_path / "orig").returncode == 0
    shutil.rmtree(local_copy)
    check = replay_cli(tmp_path / "orig" / "manifest.json", "--check-only")
    assert check.returncode == 1
    assert f"the recorded checkpoint '{local_copy}' does not exist any more" in check.stderr
    full = replay_cli(tmp_path / "orig" / "manifest.json", "--run-dir", tmp_path / "replay")
    assert full.returncode == 1 and f"model.path '{local_copy}' is not a directory" in full.stderr


@pytest.mark.parametrize("name", ["smollm2-nf4", "quant-sweep", "dtype-sweep"])
def test_shipped_experiments_compose(name: str) -> None:
    cfg = compose([f"+experiment={name}"])
    assert cfg.model._target_ == "qloader.checkpoint.sources.smollm2_checkpoint"


def test_experiment_copied_from_a_run_reproduces_its_config_hash(tmp_path) -> None:
    overrides = ["model=tiny-llama", "quant=bnb-fp4", "dtype=fp16", "device_map=cpu", "model.seed=3"]
    manifest = qloader.load(overrides, run_dir=tmp_path / "run").manifest
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "copied.yaml").write_text(experiment_yaml(manifest))
    cfg = compose(["+experiment=copied", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"])
    assert config_hash(resolved_config(cfg)) == manifest["config_hash"]


@pytest.mark.slow
def test_pinned_hash_mismatch_fails_in_validate(tiny_checkpoint, tmp_path) -> None:
    real = {
        f["name"]: f["sha256"]
        for f in qloader.load(["model=tiny-llama"], run_dir=tmp_path / "ok").manifest["checkpoint"]["files"]
    }
    pin = f"++model.expected_sha256={{config.json:{real['config.json']},model-00002-of-00007.safetensors:{'0' * 64}}}"
    result = run_cli_in_process("model=tiny-llama", pin, run_dir=tmp_path / "run")
    assert result.returncode == 1
    assert "model.expected_sha256 does not match" in result.stderr
    assert (
        f"{tiny_checkpoint / 'model-00002-of-00007.safetensors'}: sha256 {real['model-00002-of-00007.safetensors']}"
        in result.stderr
    )
    manifest = read_manifest(tmp_path / "run")
    assert manifest["error"]["stage"] == "validate" and "load" not in [s["name"] for s in manifest["stages"]]
    good = f"++model.expected_sha256={{config.json:{real['config.json']}}}"
    assert run_cli_in_process("model=tiny-llama", good, run_dir=tmp_path / "good").returncode == 0


def test_fingerprint_can_be_turned_off(tmp_path) -> None:
    manifest = qloader.load(["model=tiny-llama", "quant=none", "validate.fingerprint=false"], run_dir=tmp_path).manifest
    assert manifest["status"] == "succeeded" and manifest["weights_fingerprint"] is None


@pytest.mark.slow
def test_replay_of_a_run_recorded_before_newer_settings(tmp_path) -> None:
    """A manifest whose config predates `validate`, `model.allow_pickle`, ...: replayed with their defaults."""
    assert run_cli_in_process("model=tiny-llama", "quant=bnb-nf4", run_dir=tmp_path / "orig").returncode == 0
    manifest = read_manifest(tmp_path / "orig")
    config = manifest["config"]
    del config["validate"], config["model"]["allow_pickle"], config["model"]["trust_remote_code"]
    del config["device_map"]["offload_folder"]
    (tmp_path / "orig" / "manifest.json").write_text(json.dumps(manifest))
    result = replay_cli(tmp_path / "orig" / "manifest.json", "--run-dir", tmp_path / "replay")
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert lines["weights_fingerprint"].endswith("equal"), result.stdout + result.stderr
    assert read_manifest(tmp_path / "replay")["config"]["validate"]["finite"] == "auto"


# ---------------------------------------------------------------- replay: every manifest, one line per refusal


def error_line(result: subprocess.CompletedProcess) -> str:
    [line] = [line for line in result.stderr.splitlines() if line.startswith("qloader: error:")]
    assert "Traceback" not in result.stderr
    return line


@pytest.mark.slow
def test_replay_of_a_plan_manifest_reruns_the_plan(tmp_path) -> None:
    """A plan hashes no file: the replay compares sizes (it used to fail with a TypeError)."""
    assert run_cli_in_process("model=tiny-llama", "mode=plan", run_dir=tmp_path / "orig").returncode == 0
    result = replay_cli(tmp_path / "orig" / "manifest.json", "--run-dir", tmp_path / "replay")
    assert result.returncode == 0, result.stderr
    assert "(not hashed)" in result.stdout and read_manifest(tmp_path / "replay")["mode"] == "plan"
    check = replay_cli(tmp_path / "orig" / "manifest.json", "--check-only")
    assert check.returncode == 0, check.stderr


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A plan-mode run's manifest, to edit into bad ones."""
    run_dir = tmp_path_factory.mktemp("recorded")
    assert run_cli_in_process("model=tiny-llama", "quant=bnb-int8", "mode=plan", run_dir=run_dir).returncode == 0
    return run_dir / "manifest.json"


def edited(recorded: Path, tmp_path: Path, edit) -> Path:
    manifest = json.loads(recorded.read_text())
    edit(manifest)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_replay_of_a_file_that_is_not_json(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text("{ not json")
    result = replay_cli(tmp_path / "manifest.json", "--check-only")
    assert result.returncode == 1
    assert error_line(result).startswith(f"qloader: error: ConfigError: '{tmp_path / 'manifest.json'}' is not JSON (")


def test_replay_of_a_config_value_of_the_wrong_type(recorded, tmp_path) -> None:
    path = edited(recorded, tmp_path, lambda m: m["config"]["quant"].update(load_in_8bit="maybe"))
    result = replay_cli(path, "--run-dir", tmp_path / "replay")
    assert result.returncode == 1
    assert error_line(result) == (
        f"qloader: error: ConfigError: '{path}': recorded config: quant.load_in_8bit: Value 'maybe' is not a valid bool"
        " (type str)"
    )


def test_replay_of_a_config_without_a_group(recorded, tmp_path) -> None:
    path = edited(recorded, tmp_path, lambda m: m["config"].pop("quant"))
    result = replay_cli(path, "--check-only")
    assert result.returncode == 1
    assert "the recorded config has no quant section(s)" in error_line(result)


def test_replay_of_a_group_option_deleted_since(recorded, tmp_path) -> None:
    path = edited(recorded, tmp_path, lambda m: m["choices"].update(quant="bnb-int3"))
    result = replay_cli(path, "--run-dir", tmp_path / "replay")
    assert result.returncode == 1
    assert "Could not find 'quant/bnb-int3'; available options in 'quant': auto, " in error_line(result)


def test_check_only_compares_the_config_hash(recorded, tmp_path) -> None:
    """An edited config no longer matches the hash recorded with it."""
    path = edited(recorded, tmp_path, lambda m: m["config"]["quant"].update(llm_int8_threshold=5.0))
    result = replay_cli(path, "--check-only")
    assert result.returncode == 1 and "replay differs: config_hash" in result.stderr
    assert next(line for line in result.stdout.splitlines() if line.startswith("config_hash")).endswith("DIFFERENT")


@pytest.mark.slow
def test_replay_records_the_choices_so_its_experiment_keeps_its_groups(tmp_path) -> None:
    overrides = ["model=tiny-llama", "quant=bnb-fp4", "dtype=fp16", "mode=plan"]
    assert run_cli_in_process(*overrides, run_dir=tmp_path / "orig").returncode == 0
    assert replay_cli(tmp_path / "orig" / "manifest.json", "--run-dir", tmp_path / "replay").returncode == 0
    replayed = read_manifest(tmp_path / "replay")
    assert replayed["choices"] == read_manifest(tmp_path / "orig")["choices"]
    assert {"override /quant": "bnb-fp4"} in yaml.safe_load(experiment_yaml(replayed))["defaults"]


def test_write_experiment_by_name_lands_where_plus_experiment_finds_it(recorded) -> None:
    from qloader.config.compose import config_dir

    name = f"replayed-{os.getpid()}"
    target = config_dir() / "experiment" / f"{name}.yaml"
    try:
        result = replay_cli(recorded, "--write-experiment", name)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [f"wrote {target}", f"run it with: qloader +experiment={name}"]
        cfg = compose([f"+experiment={name}"])
        assert config_hash(resolved_config(cfg)) == json.loads(recorded.read_text())["config_hash"]
    finally:
        target.unlink(missing_ok=True)


def test_write_experiment_into_a_missing_folder(recorded, tmp_path) -> None:
    result = replay_cli(recorded, "--write-experiment", tmp_path / "absent" / "experiment" / "x.yaml")
    assert result.returncode == 1
    assert error_line(result).startswith(
        f"qloader: error: OutputError: --write-experiment '{tmp_path / 'absent' / 'experiment' / 'x.yaml'}': "
        f"folder '{tmp_path / 'absent' / 'experiment'}' does not exist"
    )
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    result = replay_cli(recorded, "--write-experiment", tmp_path / "conf" / "experiment" / "x.yaml")
    assert result.stdout.splitlines()[-1] == f"run it with: qloader --config-dir {tmp_path / 'conf'} +experiment=x"


@pytest.mark.slow
def test_replay_of_a_run_that_saved_needs_a_new_save_dir_or_none(tmp_path, monkeypatch) -> None:
    """Relative paths resolve against the directory the run started in, recorded in the manifest."""
    started = tmp_path / "project"
    started.mkdir()
    with monkeypatch.context() as inside:
        inside.chdir(started)
        orig = run_cli_in_process(
            "model=tiny-llama", "quant=bnb-nf4", "save.enabled=true", "save.dir=ckpt", run_dir=tmp_path / "orig"
        )
    assert orig.returncode == 0, orig.stderr
    manifest = tmp_path / "orig" / "manifest.json"
    assert read_manifest(tmp_path / "orig")["cwd"] == str(started) and (started / "ckpt" / "config.json").is_file()
    refused = replay_cli(manifest, "--run-dir", tmp_path / "r1")
    assert refused.returncode == 1
    assert error_line(refused) == (
        f"qloader: error: ConfigError: the recorded run saved its checkpoint to save.dir '{started / 'ckpt'}', which "
        "exists now; replay with --save-dir NEW_DIR, or --no-save to skip the save"
    )
    saved = replay_cli(manifest, "--run-dir", tmp_path / "r2", "--save-dir", tmp_path / "again")
    assert saved.returncode == 0, saved.stderr
    assert read_manifest(tmp_path / "r2")["saved"]["path"] == str(tmp_path / "again")
    skipped = replay_cli(manifest, "--run-dir", tmp_path / "r3", "--no-save")
    assert skipped.returncode == 0, skipped.stderr
    assert read_manifest(tmp_path / "r3")["saved"] is None


@pytest.mark.slow
def test_replay_of_a_hub_run_pins_the_commit_it_resolved(tiny_checkpoint, tmp_path) -> None:
    """Offline, from a hub-cache layout: `main` moves on to another commit; the replay still loads the first."""
    first, second = "1" * 40, "2" * 40
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / first)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    # Processes of their own: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, when it is imported.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    overrides = ["model=hub", "model.repo_id=org/tiny", "quant=none", "mode=plan", f"hydra.run.dir={tmp_path / 'o'}"]
    run = subprocess.run([sys.executable, "-m", "qloader", *overrides], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / second)
    (repo / "refs" / "main").write_text(second)
    replay = subprocess.run(
        [sys.executable, "-m", "qloader", "replay", str(tmp_path / "o" / "manifest.json"), "--run-dir", tmp_path / "r"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert replay.returncode == 0, replay.stderr
    replayed = read_manifest(tmp_path / "r")
    assert replayed["config"]["model"]["revision"] == first
    assert replayed["checkpoint"]["hub"] == {"repo_id": "org/tiny", "revision": first, "commit": first}
