"""CUDA paths: run where a GPU is present, skipped (by the `cuda` marker) elsewhere."""

from __future__ import annotations

import pytest
from oracle import MODES, assert_same_model, transformers_load

import qloader


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_tiny_llama_on_cuda_equals_transformers(mode: str, tmp_path) -> None:
    overrides, bnb_kwargs = MODES[mode]
    result = qloader.load(["model=tiny-llama", *overrides, "device_map=cuda"], run_dir=tmp_path)
    assert_same_model(result.model, transformers_load(result.checkpoint_path, bnb_kwargs, device_map="cuda"))
    stages = {s["name"]: s for s in result.manifest["stages"]}
    assert stages["load"]["cuda"]["cuda:0"]["peak_allocated_bytes"] > 0
    assert result.manifest["hardware"]["gpus"]


@pytest.mark.cuda
def test_auto_map_places_model_on_gpu(tmp_path) -> None:
    result = qloader.load(["model=tiny-llama", "quant=bnb-nf4"], run_dir=tmp_path)
    assert set(result.manifest["model"]["device_map"].values()) == {"0"}
