"""Bring your own quantizer: a method defined outside qloader (tests/custom_method.py), named by `_target_` in a
user's own quant option, loads like a built-in one and equals plain transformers with the same config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from custom_method import INT8_MAX, RtnInt8Config, RtnInt8Linear
from oracle import assert_same_model
from transformers import AutoModelForCausalLM

import qloader

TINY = ["model=tiny-llama", "device_map=cpu", "summary=false"]
# A user's own option file, in a config folder of their own (added with hydra.searchpath).
OPTION_YAML = """\
# Per-output-channel int8, rounded to nearest: a method of my own (custom_method.py).
defaults:
  - /quant_rtn_int8_schema@_here_
  - _self_
"""


@pytest.fixture(scope="module")
def user_conf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user-conf")
    (folder / "quant").mkdir()
    (folder / "quant" / "rtn-int8.yaml").write_text(OPTION_YAML)
    return folder


@pytest.fixture(scope="module")
def loaded(user_conf, tmp_path_factory) -> qloader.LoadResult:
    overrides = [*TINY, f"hydra.searchpath=[file://{user_conf}]", "quant=rtn-int8"]
    return qloader.load(overrides, run_dir=tmp_path_factory.mktemp("rtn-int8"))


def test_own_method_equals_transformers_with_its_config(loaded) -> None:
    reference = AutoModelForCausalLM.from_pretrained(
        loaded.checkpoint_path, quantization_config=RtnInt8Config(), device_map="cpu", dtype=torch.bfloat16
    )
    assert_same_model(loaded.model, reference)  # every tensor, then the logits


def test_own_method_quantizes_every_linear_but_the_head(loaded, tiny_checkpoint, tmp_path) -> None:
    layers = {name: m for name, m in loaded.model.named_modules() if isinstance(m, RtnInt8Linear)}
    assert len(layers) == 14 and type(loaded.model.lm_head) is torch.nn.Linear  # 2 layers x 7 projections
    plain = qloader.load([*TINY, "quant=none"], run_dir=tmp_path)
    for name, layer in layers.items():
        original = plain.model.get_submodule(name).weight.float()
        assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() == INT8_MAX
        dequantized = layer.weight.float() * layer.weight_scale
        assert (dequantized - original).abs().le(layer.weight_scale / 2 + 1e-6).all(), name  # round to nearest


def test_manifest_names_the_method(loaded) -> None:
    manifest = loaded.manifest
    assert manifest["status"] == "succeeded"
    quantization = manifest["quantization"]
    assert quantization["method"] == "rtn_int8" and quantization["quantizer"] == "RtnInt8HfQuantizer"
    assert quantization["description"] == "rtn int8 (per output channel)"
    assert manifest["model"]["quantized_modules"] == 14
    assert manifest["model"]["quantized_module_classes"] == {"RtnInt8Linear": 14}


def test_own_target_on_the_none_schema_loads_the_same(loaded, tmp_path) -> None:
    """Without a schema of its own (from the command line): the config class's defaults."""
    overrides = [*TINY, "quant=none", "quant._target_=custom_method.RtnInt8Config"]
    again = qloader.load(overrides, run_dir=tmp_path)
    assert again.manifest["quantization"]["method"] == "rtn_int8"
    assert again.manifest["weights_fingerprint"] == loaded.manifest["weights_fingerprint"]
