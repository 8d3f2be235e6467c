"""The real model still knows its geography after 4-bit quantization."""

from __future__ import annotations

import pytest
import torch

import qloader


@pytest.mark.smollm2
def test_smollm2_nf4_answers_paris(smollm2_checkpoint, tmp_path) -> None:
    result = qloader.load(["model=smollm2-135m", "quant=bnb-nf4"], run_dir=tmp_path)
    tokenizer = result.tokenizer()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = result.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert result.manifest["model"]["quantized_modules"] == 30 * 7
    assert result.manifest["model"]["skipped_modules"] == ["lm_head"]  # tied to the embeddings
