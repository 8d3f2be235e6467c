"""A qloader load is the model plain `from_pretrained` gives with the same settings, tensor for tensor."""

from __future__ import annotations

import pytest
from oracle import MODES, assert_same_model, transformers_load

import qloader


@pytest.mark.parametrize("mode", list(MODES))
def test_tiny_llama_equals_transformers(mode: str, tmp_path) -> None:
    overrides, bnb_kwargs = MODES[mode]
    result = qloader.load(["model=tiny-llama", *overrides], run_dir=tmp_path)
    assert_same_model(result.model, transformers_load(result.checkpoint_path, bnb_kwargs))
    quantized = result.manifest["model"]["quantized_modules"]
    assert quantized == (0 if mode == "none" else 14)  # 2 layers x 7 linears; lm_head stays


# SmolLM2 in the modes no other test loads it in: bnb-nf4 (nf4-dq here) and bnb-int8 load it in tests/test_methods.py
# (`test_smollm2_equals_transformers_and_plan_within_one_percent`) against the same bitsandbytes config.
SMOLLM2_ONLY_HERE = [mode for mode in MODES if mode not in ("nf4-dq", "int8")]


@pytest.mark.smollm2
@pytest.mark.parametrize("mode", SMOLLM2_ONLY_HERE)
def test_smollm2_equals_transformers(mode: str, smollm2_checkpoint, tmp_path) -> None:
    overrides, bnb_kwargs = MODES[mode]
    result = qloader.load(["model=smollm2-135m", *overrides], run_dir=tmp_path)
    assert_same_model(result.model, transformers_load(smollm2_checkpoint, bnb_kwargs))


def test_fp16_and_cpu_map_equal_transformers(tmp_path) -> None:
    import torch

    overrides, bnb_kwargs = MODES["int8"]
    result = qloader.load(["model=tiny-llama", *overrides, "dtype=fp16", "device_map=cpu"], run_dir=tmp_path)
    reference = transformers_load(result.checkpoint_path, bnb_kwargs, device_map="cpu", dtype=torch.float16)
    assert_same_model(result.model, reference)
    assert result.model.model.norm.weight.dtype == torch.float16
