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
from damage import drop_tensor
from oracle import assert_same_logits, assert_same_weights

import qloader
from qloader.errors import CheckpointError, CheckpointMismatchError, QuantizationMismatchError
from qloader.quant.gptq import CALIBRATION_TEXT, calibration_samples, calibration_text_sha256

pytest.importorskip("gptqmodel")

SAMPLES, SEQLEN, GROUP = 8, 64, 32  # tiny-llama's hidden size is 64: group 32 gives two groups per row
SETTINGS = [f"quant.group_size={GROUP}", f"quant.dataset_samples={SAMPLES}", f"quant.dataset_seqlen={SEQLEN}"]
PACKED = ("qweight", "qzeros", "scales", "g_idx")
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """tiny-llama with a tokenizer of its vocabulary size, trained on the calibration text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    target = tmp_path_factory.mktemp("gptq") / "tiny-tok"
    shutil.copytree(tiny_checkpoint, target)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([CALIBRATION_TEXT.read_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(target)
    return target


def local(path: Path, *overrides: str) -> list[str]:
    return ["model=local", f"model.path={path}", *overrides]


def reference_load(path: Path, bits: int = 4, seed: int = 0):
    """Plain transformers with the same GPTQConfig and the same calibration samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    samples = calibration_samples(AutoTokenizer.from_pretrained(path), SAMPLES, SEQLEN, seed)
    config = GPTQConfig(bits=bits, group_size=GROUP, dataset=samples)
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="auto", dtype=torch.bfloat16
    )


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
    ours, theirs = result.model.state_dict(), reference.state_dict()
    for name, module in result.model.named_modules():
        if hasattr(module, "qweight"):
            for part in PACKED:
                assert torch.equal(ours[f"{name}.{part}"], theirs[f"{name}.{part}"]), f"{name}.{part}"
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
    plan = qloader.load([*local(target), "mode=plan"], run_dir=tmp_path / "plan").manifest["plan"]["footprint_bytes"]
    measured = again.manifest["model"]["footprint_bytes"]
    assert abs(plan - measured) / measured <= 0.01, (plan, measured)


@pytest.mark.parametrize("suffix", ["qzeros", "scales"])
def test_missing_packed_tensor_is_named_before_loading(suffix, saved, tmp_path) -> None:
    _, _, source = saved
    path = shutil.copytree(source, tmp_path / "ckpt")
    key = f"{Q_PROJ}.{suffix}"
    drop_tensor(path, key)
    with pytest.raises((CheckpointError, CheckpointMismatchError)) as raised:
        qloader.load(local(path), run_dir=tmp_path / "run")
    assert key in str(raised.value)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["error"]["stage"] in ("preprocess", "load") and manifest["weights_fingerprint"] is None


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
