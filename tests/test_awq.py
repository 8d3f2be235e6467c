"""AWQ (GEMM layout, loaded through gptqmodel on CPU): a pre-quantized checkpoint built here in the GEMM layout
(no network), detected from config.json, equal to plain transformers tensor for tensor and in its logits, planned
within 1 %, checked for its packed tensors before any tensor is read, merged with a request by the plug-in's
rules, and saved only in the stored layout (never after gptqmodel repacked it on a forward pass).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from damage import assert_missing_tensor_is_named
from oracle import PROMPT_IDS, assert_same_logits, assert_same_weights
from safetensors.torch import load_file, save_file
from tiny_tokenizer import add_tokenizer

import qloader
from qloader.core.errors import ConfigError, QuantizationMismatchError

pytest.importorskip("gptqmodel")
pytestmark = pytest.mark.gptq

GROUP = 32  # tiny-llama's hidden size is 64: two groups per row
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AWQ's GEMM interleaving of the eight 4-bit values in one int32
Q_PROJ = "model.layers.0.self_attn.q_proj"
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "chat_template")


def pack_gemm(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 4-bit integers -> [rows, cols // 8] int32 in AWQ's GEMM order."""
    rows, cols = values.shape
    grouped = values.to(torch.int64).reshape(rows, cols // 8, 8)[..., ORDER]
    packed = (grouped << (torch.arange(8) * 4)).sum(-1)
    return ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)


def quantize_gemm(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Asymmetric 4-bit round-to-nearest per group of `group` inputs, in AWQ's GEMM layout:
    qweight [in, out / 8], qzeros [in / group, out / 8] int32, scales [in / group, out] fp16."""
    w = weight.float().t()  # [in, out]
    grouped = w.reshape(w.shape[0] // group, group, w.shape[1])
    low, high = grouped.amin(1), grouped.amax(1)
    scales = ((high - low) / 15).clamp(min=1e-5).half()
    zeros = torch.round(-low / scales.float()).clamp(0, 15)
    q = torch.round(grouped / scales.float()[:, None] + zeros[:, None]).clamp(0, 15).reshape(w.shape)
    return {"qweight": pack_gemm(q), "qzeros": pack_gemm(zeros), "scales": scales}


def build_awq(source: Path, target: Path, group: int = GROUP) -> Path:
    """A checkpoint's decoder Linears as an AWQ GEMM checkpoint (fp16, two shards with an index), with the
    source's tokenizer (tiny-llama has none: it gets one trained here)."""
    target.mkdir(parents=True)
    tensors = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(shard))
    out = {}
    for name, tensor in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            stem = name.removesuffix(".weight")
            out.update({f"{stem}.{k}": v for k, v in quantize_gemm(tensor, group).items()})
        else:
            out[name] = tensor.half().contiguous()
    names = sorted(out)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: out[n] for n in part}, target / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((source / "config.json").read_text())
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group,
        "zero_point": True,
        "version": "gemm",
    }
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_files = [f for f in source.iterdir() if f.name.startswith(TOKENIZER_PREFIXES)]
    for file in tokenizer_files:
        shutil.copy(file, target / file.name)
    return target if tokenizer_files else add_tokenizer(target)


@pytest.fixture(scope="module")
def awq_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    return build_awq(tiny_checkpoint, tmp_path_factory.mktemp("awq") / "tiny-awq")


def local(path: Path, *overrides: str) -> list[str]:
    return ["model=local", f"model.path={path}", *overrides]


def plain_load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def loaded(awq_checkpoint, tmp_path_factory) -> qloader.LoadResult:
    return qloader.load(local(awq_checkpoint, "dtype=bf16"), run_dir=tmp_path_factory.mktemp("awq-run"))


def test_fixture_is_the_gemm_layout(tiny_checkpoint, awq_checkpoint) -> None:
    """gptqmodel's own GEMM dequantizer reads the built layout back to the source weights (within half a step)."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    source = {}
    for shard in sorted(tiny_checkpoint.glob("*.safetensors")):
        source.update(load_file(shard))
    built = {}
    for shard in sorted(awq_checkpoint.glob("*.safetensors")):
        built.update(load_file(shard))
    weight = source[f"{Q_PROJ}.weight"].float()
    parts = [built[f"{Q_PROJ}.{k}"] for k in ("qweight", "qzeros", "scales")]
    dequantized = dequantize_gemm(*parts, 4, GROUP).float().t()
    step = parts[2].float().repeat_interleave(GROUP, dim=0).t()
    assert dequantized.shape == weight.shape
    assert bool(((dequantized - weight).abs() <= step * 0.5 + 1e-3).all())


def test_equals_transformers_every_tensor_and_logits(loaded, awq_checkpoint) -> None:
    quantization = loaded.manifest["quantization"]
    assert quantization["pre_quantized"] is True and quantization["description"] == "awq 4-bit (group 32, gemm)"
    assert loaded.manifest["model"]["quantized_modules"] == 14
    assert loaded.manifest["model"]["skipped_modules"] == ["lm_head"]
    reference = plain_load(awq_checkpoint)
    assert type(reference.get_submodule(Q_PROJ)).__name__ == type(loaded.model.get_submodule(Q_PROJ)).__name__
    assert loaded.model.get_submodule(Q_PROJ).qweight.dtype == torch.int32  # the stored layout, before any forward
    assert_same_weights(loaded.model, reference)
    assert_same_logits(loaded.model, reference)


def test_plan_within_one_percent_and_fingerprint_stable(loaded, awq_checkpoint, tmp_path) -> None:
    plan = qloader.load(local(awq_checkpoint, "dtype=bf16", "mode=plan"), run_dir=tmp_path / "plan")
    planned, measured = plan.manifest["plan"]["footprint_bytes"], loaded.manifest["model"]["footprint_bytes"]
    assert abs(planned - measured) / measured <= 0.01, (planned, measured)
    config_only = tmp_path / "config-only"  # the same plan from config.json alone, its quantization_config included
    config_only.mkdir()
    shutil.copy(awq_checkpoint / "config.json", config_only / "config.json")
    alone = qloader.load(local(config_only, "dtype=bf16", "mode=plan"), run_dir=tmp_path / "alone").manifest["plan"]
    assert alone["computed_from"] == "config-only"
    assert alone["footprint_bytes"] == planned and alone["devices"] == plan.manifest["plan"]["devices"]
    again = qloader.load(local(awq_checkpoint, "dtype=bf16"), run_dir=tmp_path / "again")
    assert again.manifest["weights_fingerprint"] == loaded.manifest["weights_fingerprint"]


def test_probe_reports_the_storage_after_its_forward(awq_checkpoint, tmp_path) -> None:
    """gptqmodel repacks the weights on the first forward: the manifest records the storage held after it."""
    result = qloader.load(
        local(awq_checkpoint, "dtype=bf16", "probe=quick", "probe.decode_tokens=4"), run_dir=tmp_path / "run"
    )
    probe = result.manifest["probe"]
    assert probe["footprint_after_bytes"] != result.manifest["model"]["footprint_bytes"]
    assert result.model.get_submodule(Q_PROJ).qweight.dtype != torch.int32


@pytest.mark.parametrize("suffix", ["qzeros", "scales"])
def test_missing_packed_tensor_is_named_before_loading(suffix, awq_checkpoint, tmp_path) -> None:
    assert_missing_tensor_is_named(awq_checkpoint, f"{Q_PROJ}.{suffix}", tmp_path)


def test_merge_rules(awq_checkpoint, tmp_path) -> None:
    with pytest.raises(QuantizationMismatchError) as raised:
        qloader.load(local(awq_checkpoint, "quant=awq", "quant.group_size=128"), run_dir=tmp_path / "a")
    assert f"quant.group_size: checkpoint {GROUP}, requested 128" in str(raised.value)
    with pytest.raises(QuantizationMismatchError):
        qloader.load(local(awq_checkpoint, "quant=bnb-int8"), run_dir=tmp_path / "b")
    result = qloader.load(
        local(awq_checkpoint, "quant=awq", f"quant.group_size={GROUP}", "quant.backend=torch_awq"),
        run_dir=tmp_path / "c",
    )
    rows = {row["field"]: row for row in result.manifest["quantization"]["merge"]}
    assert rows["backend"] == {"field": "backend", "checkpoint": None, "user": "torch_awq", "used": "torch_awq"}
    assert type(result.model.get_submodule(Q_PROJ)).__name__ == "AwqTorchLinear"  # the used backend's kernel


def test_awq_request_on_an_unquantized_checkpoint_is_refused(tiny_checkpoint, tmp_path) -> None:
    with pytest.raises(ConfigError) as raised:
        qloader.load(local(tiny_checkpoint, "quant=awq"), run_dir=tmp_path / "run")
    assert "pre-quantized" in str(raised.value)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]["stage"] == "instantiate"


def test_saves_the_stored_layout_and_refuses_after_a_forward(awq_checkpoint, tmp_path) -> None:
    from qloader.quant.registry import METHODS

    target = tmp_path / "saved"
    first = qloader.load(
        local(awq_checkpoint, "dtype=bf16", "save.enabled=true", f"save.dir={target}"), run_dir=tmp_path / "run"
    )
    again = qloader.load(local(target, "dtype=bf16"), run_dir=tmp_path / "again")
    assert again.manifest["quantization"]["pre_quantized"] is True
    assert again.manifest["weights_fingerprint"] == first.manifest["weights_fingerprint"]
    assert_same_weights(again.model, plain_load(target))
    assert METHODS["awq"].check_save_model(first.model) is None
    with torch.no_grad():
        first.model(PROMPT_IDS)
    why = METHODS["awq"].check_save_model(first.model)
    assert why is not None and "repacked" in why and "does not reload" in why


@pytest.mark.smollm2
def test_smollm2_awq_equals_transformers_and_plan_within_one_percent(smollm2_checkpoint, tmp_path) -> None:
    """Real SmolLM2-135M packed in the GEMM layout (group 64): every tensor and the logits equal plain
    transformers, the plan within 1 % of the real storage."""
    checkpoint = build_awq(smollm2_checkpoint, tmp_path / "smol-awq", group=64)
    result = qloader.load(local(checkpoint, "dtype=bf16"), run_dir=tmp_path / "run")
    assert result.manifest["quantization"]["description"] == "awq 4-bit (group 64, gemm)"
    assert result.manifest["model"]["quantized_modules"] == 30 * 7
    reference = plain_load(checkpoint)
    assert_same_weights(result.model, reference)
    assert_same_logits(result.model, reference)
    plan = qloader.load(local(checkpoint, "dtype=bf16", "mode=plan"), run_dir=tmp_path / "plan")
    planned, measured = plan.manifest["plan"]["footprint_bytes"], result.manifest["model"]["footprint_bytes"]
    assert abs(planned - measured) / measured <= 0.01, (planned, measured)
