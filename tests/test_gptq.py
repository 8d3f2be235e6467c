"""GPTQ (gptqmodel backend, an optional extra): calibrated in postprocess on qloader's shipped text, equal to
plain transformers with the same GPTQConfig and calibration samples (qweight, qzeros, scales, g_idx
torch.equal), planned within 1 %, saved and reloaded as a pre-quantized checkpoint (detected, merged,
checked for its packed tensors before any tensor is read), without leaking gptqmodel's environment changes.

tiny-llama has no tokenizer: the tests give a copy of it a byte-level BPE tokenizer (vocabulary 512) trained
here on the calibration text itself, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from damage import assert_missing_tensor_is_named
from oracle import assert_same_logits, assert_same_weights
from tiny_tokenizer import add_tokenizer

import qloader
from qloader.core.errors import QuantizationMismatchError
from qloader.quant.methods.gptq import calibration_samples, calibration_text_sha256, cpu_has_native_half_matmul

pytest.importorskip("gptqmodel")
pytestmark = pytest.mark.gptq

SAMPLES, SEQLEN, GROUP = 8, 64, 32  # tiny-llama's hidden size is 64: group 32 gives two groups per row
SETTINGS = [f"quant.group_size={GROUP}", f"quant.dataset_samples={SAMPLES}", f"quant.dataset_seqlen={SEQLEN}"]
PACKED = ("qweight", "qzeros", "scales", "g_idx")
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """tiny-llama with a tokenizer of its vocabulary size, trained on the calibration text (deterministic)."""
    target = tmp_path_factory.mktemp("gptq") / "tiny-tok"
    shutil.copytree(tiny_checkpoint, target)
    return add_tokenizer(target)


def local(path: Path, *overrides: str) -> list[str]:
    return ["model=local", f"model.path={path}", *overrides]


def reference_load(
    path: Path,
    bits: int = 4,
    seed: int = 0,
    samples: int = SAMPLES,
    seqlen: int = SEQLEN,
    group: int = GROUP,
    dtype: torch.dtype = torch.bfloat16,
):
    """Plain transformers with the same GPTQConfig and the same calibration samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    calibration = calibration_samples(AutoTokenizer.from_pretrained(path), samples, seqlen, seed)
    config = GPTQConfig(bits=bits, group_size=group, dataset=calibration)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="auto", dtype=dtype)


def assert_same_packed(model, reference) -> int:
    """qweight, qzeros, scales and g_idx torch.equal in every packed module; how many modules there are."""
    ours, theirs = model.state_dict(), reference.state_dict()
    packed = [name for name, module in model.named_modules() if hasattr(module, "qweight")]
    for name in packed:
        for part in PACKED:
            assert torch.equal(ours[f"{name}.{part}"], theirs[f"{name}.{part}"]), f"{name}.{part}"
    return len(packed)


@pytest.fixture(scope="module")
def environment_before() -> dict:
    return dict(os.environ)


@pytest.fixture(scope="module", params=[4, 8])
def loaded(request, checkpoint, environment_before, tmp_path_factory) -> tuple[int, qloader.LoadResult]:
    bits = request.param
    run_dir = tmp_path_factory.mktemp(f"gptq{bits}")
    return bits, qloader.load(local(checkpoint, f"quant=gptq-{bits}bit", *SETTINGS), run_dir=run_dir)


def test_equals_transformers_packed_tensors(loaded, checkpoint) -> None:
    bits, result = loaded
    reference = reference_load(checkpoint, bits)
    assert assert_same_packed(result.model, reference) == 14
    assert_same_weights(result.model, reference)
    assert_same_logits(result.model, reference)


def test_manifest_inventory_plan_and_environment(loaded, checkpoint, environment_before, tmp_path) -> None:
    bits, result = loaded
    manifest = result.manifest
    quantization = manifest["quantization"]
    assert quantization["description"] == f"gptq {bits}-bit (group {GROUP})" and quantization["pre_quantized"] is False
    assert quantization["choice"]["calibration_text_sha256"] == calibration_text_sha256()
    assert quantization["choice"] | {"calibration_text_sha256": None} == {
        "calibration_text": "calibration_text.txt",
        "calibration_text_sha256": None,
        "dataset_samples": SAMPLES,
        "dataset_seqlen": SEQLEN,
        "seed": 0,
    }
    assert quantization["config"]["dataset"].startswith(f"{SAMPLES} samples, sha256 ")  # not the text itself
    assert manifest["model"]["quantized_modules"] == 14 and manifest["model"]["skipped_modules"] == ["lm_head"]
    plan = qloader.load(local(checkpoint, f"quant=gptq-{bits}bit", *SETTINGS, "mode=plan"), run_dir=tmp_path)
    planned, measured = plan.manifest["plan"]["footprint_bytes"], manifest["model"]["footprint_bytes"]
    assert abs(planned - measured) / measured <= 0.01, (planned, measured)
    # gptqmodel's import moves HF_HOME and the allocator settings: none of it leaks into qloader's process
    for key in ("HF_HOME", "HF_HUB_CACHE", "PYTORCH_ALLOC_CONF", "QLOADER_CACHE", "TRANSFORMERS_CACHE"):
        assert os.environ.get(key) == environment_before.get(key), key
    assert "tokenicer" not in json.dumps(manifest)
    # gptqmodel's CPU packing extension is compiled into qloader's cache, never into ~/.cache/gptqmodel
    if "GPTQMODEL_TORCH_EXTENSIONS_DIR" not in environment_before:
        built = Path(os.environ["QLOADER_CACHE"]) / "gptqmodel" / "torch_extensions"
        assert os.environ["GPTQMODEL_TORCH_EXTENSIONS_DIR"] == str(built) and built.is_dir()


def test_calibration_samples_are_seeded(checkpoint) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    first = calibration_samples(tokenizer, SAMPLES, SEQLEN, 0)
    assert first == calibration_samples(tokenizer, SAMPLES, SEQLEN, 0) and len(first) == SAMPLES
    assert first != calibration_samples(tokenizer, SAMPLES, SEQLEN, 1)


@pytest.fixture(scope="module")
def saved(loaded, checkpoint, tmp_path_factory) -> tuple[int, qloader.LoadResult, Path]:
    bits, _ = loaded
    tmp = tmp_path_factory.mktemp(f"saved{bits}")
    target = tmp / "ckpt"
    result = qloader.load(
        local(
            checkpoint,
            f"quant=gptq-{bits}bit",
            *SETTINGS,
            "save.enabled=true",
            f"save.dir={target}",
            "save.max_shard_size=40KB",
        ),
        run_dir=tmp / "run",
    )
    return bits, result, target


def test_save_and_reload_both_ways(saved, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    bits, before, target = saved
    again = qloader.load(local(target), run_dir=tmp_path / "again")
    assert again.manifest["quantization"]["pre_quantized"] is True
    assert again.manifest["quantization"]["description"] == f"gptq {bits}-bit (group {GROUP})"
    assert again.manifest["model"]["quantized_modules"] == 14
    assert again.manifest["weights_fingerprint"] == before.manifest["weights_fingerprint"]
    theirs = AutoModelForCausalLM.from_pretrained(target, device_map="auto", dtype=torch.bfloat16)
    assert_same_weights(again.model, theirs)
    assert_same_weights(again.model, before.model)
    assert_same_logits(again.model, theirs)
    plan = qloader.load([*local(target), "mode=plan"], run_dir=tmp_path / "plan").manifest["plan"]
    measured = again.manifest["model"]["footprint_bytes"]
    assert abs(plan["footprint_bytes"] - measured) / measured <= 0.01, (plan["footprint_bytes"], measured)
    # the same plan from config.json alone (its quantization_config included), before a byte of weights is here
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(target / "config.json", config_only / "config.json")
    alone = qloader.load([*local(config_only), "mode=plan"], run_dir=tmp_path / "alone").manifest["plan"]
    assert alone["computed_from"] == "config-only" and plan["computed_from"] == "checkpoint"
    assert alone["footprint_bytes"] == plan["footprint_bytes"] and alone["devices"] == plan["devices"]


@pytest.mark.parametrize("suffix", ["qzeros", "scales"])
def test_missing_packed_tensor_is_named_before_loading(suffix, saved, tmp_path) -> None:
    _, _, source = saved
    assert_missing_tensor_is_named(source, f"{Q_PROJ}.{suffix}", tmp_path)


def test_merge_rules(saved, tmp_path) -> None:
    bits, _, target = saved
    other = 8 if bits == 4 else 4
    with pytest.raises(QuantizationMismatchError) as raised:
        qloader.load(local(target, f"quant=gptq-{other}bit", f"quant.group_size={GROUP}"), run_dir=tmp_path / "a")
    assert f"quant.bits: checkpoint {bits}, requested {other}" in str(raised.value)
    with pytest.raises(QuantizationMismatchError):
        qloader.load(local(target, "quant=bnb-nf4"), run_dir=tmp_path / "b")
    result = qloader.load(
        local(target, f"quant=gptq-{bits}bit", f"quant.group_size={GROUP}", "quant.damp_percent=0.05"),
        run_dir=tmp_path / "c",
    )
    rows = {row["field"]: row for row in result.manifest["quantization"]["merge"]}
    assert rows["damp_percent"] == {"field": "damp_percent", "checkpoint": 0.1, "user": 0.05, "used": 0.1}
    assert result.manifest["quantization"]["choice"] is None  # pre-quantized: nothing calibrated


@pytest.mark.parametrize(
    ("flags", "dtype", "native"),
    [
        ("fpu avx2 avx512f", "torch.bfloat16", False),
        ("fpu avx2 avx512f avx512_bf16", "torch.bfloat16", True),
        ("fpu amx_bf16 amx_tile", "torch.bfloat16", True),
        ("fpu avx512_bf16", "torch.float16", False),
        ("fpu avx512_fp16", "torch.float16", True),
    ],
)
def test_native_half_matmul_is_read_from_the_cpu_flags(tmp_path, flags, dtype, native) -> None:
    """The slow-calibration warning's test: a CPU flag for native half matmuls, per dtype."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_native_half_matmul(dtype, cpuinfo) is native
    assert cpu_has_native_half_matmul(dtype, tmp_path / "missing") is True  # cannot tell: no warning
