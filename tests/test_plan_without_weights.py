"""Plan mode from config.json alone, or from a partial download: the same plan as with every weight here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import read_manifest, run_cli_in_process
from families import FAMILIES

import qloader

PLANNED = ("devices", "footprint_bytes", "unquantized_bytes", "parameters", "kept", "device_map", "fits")
"""The plan's fields that do not depend on the shards being here (the peak adds the largest shard)."""


def plan_of(folder: Path, run_dir: Path, *overrides: str) -> dict:
    result = run_cli_in_process("mode=plan", "model=local", f"model.path={folder}", *overrides, run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    return read_manifest(run_dir)["plan"]


def config_only(checkpoint: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(checkpoint / "config.json", folder / "config.json")
    return folder




@pytest.mark.parametrize("quant", ["none", "bnb-nf4", "bnb-int8"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_plan_from_config_alone_equals_the_plan_with_the_weights(name, quant, family_checkpoint, tmp_path) -> None:
    checkpoint = family_checkpoint(name)
    task = f"model.task={FAMILIES[name].task}"
    full = plan_of(checkpoint, tmp_path / "full", f"quant={quant}", task, "device_map=cpu")
    alone = plan_of(config_only(checkpoint, tmp_path / "alone"), tmp_path / "alone-run", f"quant={quant}", task)
    assert {k: full[k] for k in PLANNED} == {k: alone[k] for k in PLANNED}
    assert (full["computed_from"], alone["computed_from"]) == ("checkpoint", "config-only")
    assert alone["peak_load_bytes"] == alone["footprint_bytes"] < full["peak_load_bytes"]
    if quant != "none":
        assert sum(d["quantized_bytes"] for d in alone["devices"].values()) > 0


def test_plan_from_a_partial_download_reads_the_headers_here(tiny_checkpoint, tmp_path) -> None:
    partial = config_only(tiny_checkpoint, tmp_path / "partial")
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    shutil.copy(tiny_checkpoint / "model.safetensors.index.json", partial)
    for shard in shards[:2]:
        shutil.copy(tiny_checkpoint / shard, partial)
    full = plan_of(tiny_checkpoint, tmp_path / "full", "quant=bnb-nf4")
    result = run_cli_in_process("mode=plan", "model=local", f"model.path={partial}", "quant=bnb-nf4", run_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "computed from             config.json and the headers of the shards here" in result.stdout
    manifest = read_manifest(tmp_path)
    plan = manifest["plan"]
    assert plan["computed_from"] == "headers" and {k: full[k] for k in PLANNED} == {k: plan[k] for k in PLANNED}
    assert plan["peak_load_bytes"] == plan["footprint_bytes"] + max((partial / s).stat().st_size for s in shards[:2])
    assert sorted(f["name"] for f in manifest["checkpoint"]["files"]) == sorted(
        ["config.json", "model.safetensors.index.json", *shards[:2]]
    )


def test_a_load_still_needs_every_shard(tiny_checkpoint, tmp_path) -> None:
    partial = config_only(tiny_checkpoint, tmp_path / "partial")
    shutil.copy(tiny_checkpoint / "model.safetensors.index.json", partial)
    result = run_cli_in_process("model=local", f"model.path={partial}", "quant=none", run_dir=tmp_path / "run")
    assert result.returncode == 1 and "CheckpointError" in result.stderr
    assert "lists shard(s) that do not exist" in result.stderr


def test_headers_that_contradict_the_config_are_one_line_and_a_failed_manifest(tiny_checkpoint, tmp_path) -> None:
    partial = config_only(tiny_checkpoint, tmp_path / "partial")
    config = json.loads((partial / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    for name in ("model.safetensors.index.json", "model-00003-of-00007.safetensors"):
        shutil.copy(tiny_checkpoint / name, partial)
    result = run_cli_in_process("mode=plan", "model=local", f"model.path={partial}", run_dir=tmp_path / "run")
    assert result.returncode == 1, result.stdout
    line = result.stderr.splitlines()[0]
    assert line.startswith(f"qloader: error: CheckpointMismatchError: {partial}: the weights do not fit")
    assert (
        "shape mismatch" in line and "model.layers.0.mlp.gate_proj.weight: checkpoint [128, 64], model [96, 64]" in line
    )
    manifest = read_manifest(tmp_path / "run")
    assert (manifest["status"], manifest["error"]["type"]) == ("failed", "CheckpointMismatchError")


def test_dtype_auto_without_a_dtype_in_config_json_says_what_to_set(tiny_checkpoint, tmp_path) -> None:
    folder = config_only(tiny_checkpoint, tmp_path / "alone")
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli_in_process("mode=plan", "model=local", f"model.path={folder}", "dtype=auto", run_dir=tmp_path)
    assert result.returncode == 1
    assert "config.json: dtype=auto reads torch_dtype (or dtype) from config.json, which has none" in result.stderr
    assert "set dtype=bf16" in result.stderr and read_manifest(tmp_path)["status"] == "failed"
    plan = plan_of(folder, tmp_path / "bf16", "dtype=bf16")
    assert plan["computed_from"] == "config-only"


def test_dtype_auto_takes_config_json_torch_dtype(tiny_checkpoint, tmp_path) -> None:
    folder = config_only(tiny_checkpoint, tmp_path / "alone")
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    fp32 = plan_of(folder, tmp_path / "fp32", "dtype=auto", "quant=none")
    bf16 = plan_of(folder, tmp_path / "bf16", "dtype=bf16", "quant=none")
    weights = [plan["devices"]["cpu"]["unquantized_bytes"] for plan in (fp32, bf16)]
    assert weights[0] == 2 * weights[1] > 0  # the buffers (rotary inv_freq) stay float32 in both


def test_an_unknown_architecture_is_one_line(tmp_path) -> None:
    folder = tmp_path / "alone"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["NoSuchLM"]}))
    result = run_cli_in_process("mode=plan", "model=local", f"model.path={folder}", run_dir=tmp_path / "run")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 2
    assert (
        f"CheckpointError: {folder / 'config.json'}: model_type 'no-such-model' is not an architecture" in result.stderr
    )
    assert read_manifest(tmp_path / "run")["error"]["type"] == "CheckpointError"


def saved_by_qloader(quant: str, folder: Path, run_dir: Path) -> Path:
    overrides = ["model=tiny-llama", f"quant={quant}", "save.enabled=true", f"save.dir={folder}"]
    qloader.load(overrides, run_dir=run_dir)
    return folder


def compressed_tensors_w4a16(tiny_checkpoint: Path, folder: Path, run_dir: Path) -> Path:
    pytest.importorskip("compressed_tensors")
    from test_compressed_tensors import build_checkpoint

    return build_checkpoint(tiny_checkpoint, folder, "W4A16")


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda ckpt, folder, run: saved_by_qloader("bnb-nf4", folder, run), id="bnb-nf4"),
        pytest.param(lambda ckpt, folder, run: saved_by_qloader("torchao-int8wo", folder, run), id="torchao-int8wo"),
        pytest.param(compressed_tensors_w4a16, id="compressed-tensors-w4a16"),
    ],
)
def test_pre_quantized_plan_from_config_alone_equals_the_plan_and_the_load(build, tiny_checkpoint, tmp_path) -> None:
    saved = build(tiny_checkpoint, tmp_path / "saved", tmp_path / "save-run")
    assert "quantization_config" in json.loads((saved / "config.json").read_text())
    full = plan_of(saved, tmp_path / "full")
    alone = plan_of(config_only(saved, tmp_path / "alone"), tmp_path / "alone-run")
    assert {k: full[k] for k in PLANNED} == {k: alone[k] for k in PLANNED}
    loaded = qloader.load(["model=local", f"model.path={saved}"], run_dir=tmp_path / "load").manifest
    assert loaded["quantization"]["pre_quantized"] is True
    assert alone["footprint_bytes"] == loaded["model"]["footprint_bytes"] == loaded["plan"]["footprint_bytes"]
    assert alone["devices"]["cpu"]["quantized_bytes"] > 0 and alone["compression"] > 1.2
    assert [group["module_class"] for group in alone["kept"]] == ["Embedding", "Linear"]  # embed_tokens, lm_head
