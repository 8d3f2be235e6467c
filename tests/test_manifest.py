"""The run manifest: schema-valid, complete, atomic, and honest about failures."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import read_manifest, run_cli_in_process

import qloader
from qloader.core.files import write_json_atomic
from qloader.core.names import STAGE_NAMES
from qloader.runs.manifest import config_hash, manifest_schema

SCHEMA = manifest_schema()


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("nf4")
    return qloader.load(["model=tiny-llama", "quant=bnb-nf4"], run_dir=run_dir)


def test_success_manifest_is_schema_valid_and_complete(nf4_run) -> None:
    manifest = read_manifest(nf4_run.run_dir)
    jsonschema.validate(manifest, SCHEMA)
    assert manifest == json.loads(json.dumps(nf4_run.manifest, default=str))
    assert manifest["status"] == "succeeded" and manifest["error"] is None
    assert [s["name"] for s in manifest["stages"]] == list(STAGE_NAMES)
    assert all(s["status"] == "succeeded" and s["wall_s"] >= 0 for s in manifest["stages"])
    assert manifest["quantization"]["method"] == "bitsandbytes"
    assert manifest["quantization"]["config"]["bnb_4bit_quant_type"] == "nf4"
    assert manifest["quantization"]["config"]["quant_method"] == "bitsandbytes"
    assert manifest["quantization"]["pre_quantized"] is False
    assert manifest["model"]["quantized_modules"] == 14
    assert manifest["model"]["skipped_modules"] == ["lm_head"]
    assert manifest["model"]["device_map"] == {"": "cpu"}
    assert manifest["overrides"] == ["model=tiny-llama", "quant=bnb-nf4"]


def test_checkpoint_files_are_hashed(nf4_run) -> None:
    import hashlib

    files = {f["name"]: f for f in nf4_run.manifest["checkpoint"]["files"]}
    assert len(nf4_run.manifest["checkpoint"]["shards"]) == 7
    for name in (*nf4_run.manifest["checkpoint"]["shards"], "config.json", "model.safetensors.index.json"):
        data = (nf4_run.checkpoint_path / name).read_bytes()
        assert files[name] == {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_per_stage_memory_is_recorded(nf4_run) -> None:
    for stage in nf4_run.manifest["stages"]:
        assert stage["rss_peak_bytes"] >= stage["rss_start_bytes"] > 0
        assert stage["anon_peak_bytes"] >= stage["anon_start_bytes"] > 0
        assert stage["cuda"] is None  # CPU-only host


def test_footprint_counts_packed_weights_and_quant_states(nf4_run) -> None:
    import torch

    model = nf4_run.model
    fp_bytes = sum(p.numel() * 2 for p in model.parameters() if p.dtype == torch.bfloat16)
    packed = sum(p.numel() for p in model.parameters() if p.dtype == torch.uint8)
    footprint = nf4_run.manifest["model"]["footprint_bytes"]
    assert fp_bytes + packed < footprint < fp_bytes + 2 * packed  # quant states add a little


def test_config_hash_is_canonical() -> None:
    a = {"quant": {"x": 1, "y": [1, 2]}, "dtype": "bf16"}
    b = {"dtype": "bf16", "quant": {"y": [1, 2], "x": 1}}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "dtype": "fp16"})


def test_same_config_same_hash_across_runs(nf4_run, tmp_path) -> None:
    again = qloader.load(["model=tiny-llama", "quant=bnb-nf4"], run_dir=tmp_path)
    assert again.manifest["config_hash"] == nf4_run.manifest["config_hash"]
    other = qloader.load(["model=tiny-llama", "quant=bnb-fp4"], run_dir=tmp_path / "fp4")
    assert other.manifest["config_hash"] != nf4_run.manifest["config_hash"]


def test_atomic_write_leaves_old_file_when_serialisation_fails(tmp_path) -> None:
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"status": "running"})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"status": "succeeded", "bad": float("nan"), "loop": _circular()})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left behind


def _circular() -> dict:
    d: dict = {}
    d["self"] = d
    return d


def test_failed_manifest_is_schema_valid(tmp_path) -> None:
    result = run_cli_in_process("model=tiny-llama", "device_map=cuda", run_dir=tmp_path)
    assert result.returncode == 1
    manifest = read_manifest(tmp_path)
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["status"] == "failed"
    assert manifest["stages"][-1] == {**manifest["stages"][-1], "name": "validate", "status": "failed"}


def test_save_run_manifest_is_schema_valid(tmp_path) -> None:
    result = qloader.load(
        ["model=tiny-llama", "quant=bnb-int8", "save.enabled=true", f"save.dir={tmp_path / 'ckpt'}"],
        run_dir=tmp_path / "run",
    )
    manifest = read_manifest(tmp_path / "run")
    jsonschema.validate(manifest, SCHEMA)
    assert [s["name"] for s in manifest["stages"]] == [*STAGE_NAMES, "save"]
    saved = {f["name"] for f in manifest["saved"]["files"]}
    assert {"config.json", "model.safetensors"} <= saved
    assert manifest["saved"]["path"] == str((tmp_path / "ckpt").resolve()) == str(result.manifest["saved"]["path"])
