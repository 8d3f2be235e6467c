"""GPTQ on real SmolLM2-135M (the gptq extra): its own file, so an xdist worker calibrates it beside the other
GPTQ / AWQ tests (`make test-gptq`). The tiny-model GPTQ tests and their helpers are in tests/test_gptq.py."""

from __future__ import annotations

import pytest
import torch
from oracle import assert_same_logits, assert_same_weights

import qloader

pytest.importorskip("gptqmodel")
pytestmark = pytest.mark.gptq

from test_gptq import assert_same_packed, reference_load  # noqa: E402  (imports gptqmodel's side of the tests)


@pytest.mark.smollm2
def test_smollm2_equals_transformers_and_plan_within_one_percent(smollm2_checkpoint, tmp_path) -> None:
    """Real SmolLM2-135M, gptq-4bit (group 64) on 8 samples x 128 tokens in float32 (calibrating in bfloat16
    is several times slower on CPUs without native bf16): packed tensors, weights and logits equal plain
    transformers calibrated on the same samples; the plan within 1 % of the real storage."""
    overrides = ["model=smollm2-135m", "quant=gptq-4bit", "quant.dataset_samples=8", "quant.dataset_seqlen=128"]
    overrides.append("dtype=fp32")
    result = qloader.load(overrides, run_dir=tmp_path / "run")
    reference = reference_load(smollm2_checkpoint, samples=8, seqlen=128, group=64, dtype=torch.float32)
    assert assert_same_packed(result.model, reference) == 30 * 7
    assert_same_weights(result.model, reference)
    assert_same_logits(result.model, reference)
    plan = qloader.load([*overrides, "mode=plan"], run_dir=tmp_path / "plan").manifest["plan"]["footprint_bytes"]
    measured = result.manifest["model"]["footprint_bytes"]
    assert abs(plan - measured) / measured <= 0.01, (plan, measured)
