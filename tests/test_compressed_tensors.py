"""compressed-tensors pre-quantized checkpoints (W4A16 and W8A16, pack-quantized), built here with the
compressed-tensors library itself (no network): detected from config.json, equal to plain transformers
tensor for tensor, planned to the byte, checked for their stored tensors before any tensor is read,
merged with a request by transformers' rules, fingerprinted, saved, and measured after decompression.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from damage import assert_missing_tensor_is_named
from oracle import assert_same_logits, assert_same_model, assert_same_weights

import qloader
from qloader.core.errors import ConfigError, QuantizationMismatchError
from qloader.measure.fingerprint import weights_fingerprint

pytest.importorskip("compressed_tensors")

SCHEMES = ("W4A16", "W8A16")
Q_PROJ = "model.layers.0.self_attn.q_proj"
GROUP_SIZE = 32  # the presets' 128 is larger than tiny-llama's hidden size (64)


def build_checkpoint(source: Path, target: Path, preset: str, group_size: int = GROUP_SIZE, shard="40KB") -> Path:
    """Quantize `source` in memory with a compressed-tensors preset scheme (weight scales from each group's
    min/max, deterministic), compress it (pack-quantized) and save it as llm-compressor would."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.weights.group_size = group_size
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if (args := getattr(getattr(module, "quantization_scheme", None), "weights", None)) is None:
                continue
            grouped = module.weight.reshape(module.weight.shape[0], -1, args.group_size)
            scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(target, max_shard_size=shard)
    compressor.update_config(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())
    return target


def transformers_load(path: Path, **config):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(**config)} if config else {}
    return AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.bfloat16, **extra)


def local(path: Path, *overrides: str) -> list[str]:
    return ["model=local", f"model.path={path}", *overrides]


def storage_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if (key := tensor.untyped_storage().data_ptr()) not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


@pytest.fixture(scope="module", params=SCHEMES)
def checkpoint(request, tiny_checkpoint, tmp_path_factory) -> tuple[str, Path]:
    preset = request.param
    return preset, build_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp(preset) / "ckpt", preset)


@pytest.fixture(scope="module")
def loaded(checkpoint, tmp_path_factory) -> tuple[str, Path, qloader.LoadResult]:
    preset, path = checkpoint
    return preset, path, qloader.load(local(path), run_dir=tmp_path_factory.mktemp(f"{preset}-run"))


# 1. the oracle and detection -------------------------------------------------------------------------


def test_detected_and_equal_to_transformers(loaded) -> None:
    preset, path, result = loaded
    quantization = result.manifest["quantization"]
    assert quantization["pre_quantized"] is True and quantization["method"] == "compressed-tensors"
    assert quantization["description"] == f"compressed-tensors {preset} (pack-quantized)"
    assert quantization["merge"] == [] and quantization["config"]["dequantize"] is False
    reference = transformers_load(path)
    assert_same_weights(result.model, reference)  # the stored layout, before any forward pass
    layer = result.model.get_submodule(Q_PROJ)
    assert layer.weight_packed.dtype == torch.int32 and not hasattr(layer, "weight")
    assert_same_logits(result.model, reference)  # both decompress on this first forward
    assert_same_weights(result.model, reference)  # and decompress to the same weights


def test_inventory_footprint_and_plan_are_exact(loaded, tmp_path) -> None:
    preset, path, result = loaded
    model = result.manifest["model"]
    assert model["quantized_modules"] == 14 and model["skipped_modules"] == ["lm_head"]
    fresh = qloader.load(local(path), run_dir=tmp_path / "fresh")  # `loaded` may have run a forward already
    assert fresh.manifest["model"]["footprint_bytes"] == storage_bytes(fresh.model) == model["footprint_bytes"]
    plan = qloader.load([*local(path), "mode=plan"], run_dir=tmp_path / "plan").manifest
    assert plan["status"] == "succeeded" and plan["plan"]["footprint_bytes"] == model["footprint_bytes"]
    unquantized = qloader.load(["model=tiny-llama", "quant=none"], run_dir=tmp_path / "none").manifest
    assert model["footprint_bytes"] < unquantized["model"]["footprint_bytes"]


def test_fingerprint_is_deterministic_and_sees_packed_bytes(checkpoint, tmp_path) -> None:
    _, path = checkpoint
    first = qloader.load(local(path), run_dir=tmp_path / "a")
    second = qloader.load(local(path), run_dir=tmp_path / "b")
    fingerprint = first.manifest["weights_fingerprint"]
    assert second.manifest["weights_fingerprint"] == fingerprint == weights_fingerprint(first.model)
    for name in ("weight_packed", "weight_scale"):
        tensor = getattr(first.model.get_submodule(Q_PROJ), name)
        with torch.no_grad():
            tensor.reshape(-1).view(torch.uint8)[0] ^= 1
        assert weights_fingerprint(first.model) != fingerprint, name
        with torch.no_grad():
            tensor.reshape(-1).view(torch.uint8)[0] ^= 1
    assert weights_fingerprint(first.model) == fingerprint


# 2. stored tensors checked from the headers -------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["weight_scale", "weight_packed"])
def test_missing_stored_tensor_is_named_before_loading(suffix, checkpoint, tmp_path) -> None:
    _, source = checkpoint
    assert_missing_tensor_is_named(source, f"{Q_PROJ}.{suffix}", tmp_path)


def test_quant_state_names_follow_the_format(loaded) -> None:
    from qloader.quant.registry import METHODS

    _, _, result = loaded
    quantizer = result.model.hf_quantizer
    names = METHODS["compressed-tensors"].quant_state_names(quantizer, Q_PROJ, result.model.get_submodule(Q_PROJ))
    assert names == ("weight_packed", "weight_scale", "weight_shape")  # symmetric: no zero point
    assert METHODS["compressed-tensors"].quant_state_names(quantizer, "lm_head", result.model.lm_head) == ()


# 3. merging with a request ------------------------------------------------------------------------------


def test_dequantize_request_is_merged_and_recorded(checkpoint, tmp_path) -> None:
    preset, path = checkpoint
    result = qloader.load(local(path, "quant=compressed-tensors", "quant.dequantize=true"), run_dir=tmp_path)
    quantization = result.manifest["quantization"]
    assert quantization["merge"] == [{"field": "dequantize", "checkpoint": False, "user": True, "used": True}]
    assert quantization["description"] == f"compressed-tensors {preset} (pack-quantized; dequantized on load)"
    assert result.manifest["model"]["quantized_modules"] == 0  # dense bf16 weights
    assert_same_model(result.model, transformers_load(path, dequantize=True))
    plan = qloader.load(
        local(path, "quant=compressed-tensors", "quant.dequantize=true", "mode=plan"), run_dir=tmp_path / "p"
    )
    assert plan.manifest["plan"]["footprint_bytes"] == result.manifest["model"]["footprint_bytes"]


@pytest.mark.parametrize("option", ["bnb-nf4", "torchao-int8wo", "none"])
def test_contradicting_request_is_a_mismatch(option, checkpoint, tmp_path) -> None:
    preset, path = checkpoint
    with pytest.raises(QuantizationMismatchError) as raised:
        qloader.load(local(path, f"quant={option}"), run_dir=tmp_path)
    assert "config.json" in str(raised.value) and f"compressed-tensors {preset}" in str(raised.value)


def test_request_on_unquantized_checkpoint_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError) as raised:
        qloader.load(["model=tiny-llama", "quant=compressed-tensors"], run_dir=tmp_path)
    assert "pre-quantized" in str(raised.value)


# 4. save -----------------------------------------------------------------------------------------------


def test_save_writes_the_compressed_layout_and_reloads_equal(checkpoint, tmp_path) -> None:
    preset, path = checkpoint
    target = tmp_path / "saved"
    before = qloader.load(local(path, "save.enabled=true", f"save.dir={target}"), run_dir=tmp_path / "save")
    saved_config = json.loads((target / "config.json").read_text())["quantization_config"]
    assert saved_config["quantization_status"] == "compressed" and saved_config["format"] == "pack-quantized"
    again = qloader.load(local(target), run_dir=tmp_path / "again")
    assert again.manifest["weights_fingerprint"] == before.manifest["weights_fingerprint"]
    assert_same_weights(again.model, before.model)
    assert_same_model(transformers_load(target), transformers_load(path))


def test_save_note_says_what_is_written(loaded) -> None:
    from qloader.quant.registry import METHODS

    _, path, _ = loaded
    method = METHODS["compressed-tensors"]
    model = transformers_load(path)
    assert "compressed layout" in method.save_note(model)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert "decompressed bfloat16 checkpoint" in method.save_note(model)


# 5. SmolLM2: the plan within 1 %, and the memory really used after the probe -----------------------------


@pytest.mark.smollm2
@pytest.mark.parametrize("preset", ["W4A16"])  # W8A16 on SmolLM2: the same code path, covered on tiny-llama
def test_smollm2_plan_and_memory_after_probe(preset, smollm2_checkpoint, tmp_path) -> None:
    path = build_checkpoint(smollm2_checkpoint, tmp_path / "ckpt", preset, group_size=64, shard="100MB")
    plan = qloader.load([*local(path), "mode=plan"], run_dir=tmp_path / "plan").manifest["plan"]["footprint_bytes"]
    result = qloader.load([*local(path), "probe=quick", "probe.decode_tokens=4"], run_dir=tmp_path / "load")
    measured = result.manifest["model"]["footprint_bytes"]
    after = result.manifest["probe"]["footprint_after_bytes"]
    print(f"\n{preset}: plan {plan} measured {measured} after probe {after}")
    assert abs(plan - measured) / measured <= 0.01
    assert after > measured  # decompressed to bf16 by the probe's forward pass
    assert result.manifest["probe"]["perplexity"] < 100
    reference = transformers_load(path)
    assert_same_weights(qloader.load(local(path), run_dir=tmp_path / "again").model, reference)
