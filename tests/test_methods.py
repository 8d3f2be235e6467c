"""torchao and optimum-quanto: each quant option equals plain transformers, is measured and planned to the byte,
fingerprinted, checked for NaN, saved where it can be, and fails early and clearly where it cannot run.

One qloader load per option on tiny-llama is shared by the tests that only read it (module-scoped fixture);
the equality test runs first in each option's group and compares the weights before any forward pass.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from damage import copy_checkpoint, drop_tensor, edit_tensors, shard_of
from oracle import (
    BNB_OPTIONS,
    QUANTO_WEIGHTS,
    TORCHAO_OPTIONS,
    assert_same_logits,
    assert_same_model,
    assert_same_weights,
    method_load,
    options_of,
)

import qloader
from qloader.config.quant_options import quant_options
from qloader.core.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    EnvironmentMismatchError,
    NonFiniteWeightError,
)
from qloader.measure.fingerprint import weights_fingerprint
from qloader.quant.base import inner_tensors

TINY = "model=tiny-llama"
# Every conf/quant option of torchao and optimum-quanto, as the method registry maps them (a new option is tested
# as soon as its YAML exists, and fails until the expectations below name it).
OPTIONS = options_of("torchao", "quanto")
# option -> the class of the weight tensor of each of its 14 quantized Linear layers
WEIGHT_CLASSES = {
    "torchao-int8wo": "Int8Tensor",
    "torchao-int8dq": "Int8Tensor",
    "torchao-fp8wo": "Float8Tensor",
    "torchao-int4": "Int4OpaqueTensor",
    "quanto-int8": "WeightQBytesTensor",
    "quanto-int4": "WeightQBitsTensor",
    "quanto-fp8": "WeightQBytesTensor",
}
# option that cannot be saved -> what its refusal names; every other option saves
UNSAVEABLE = {"torchao-int4": "PrototypeInt4WeightOnlyConfig", "quanto-int8": "quanto", "quanto-int4": "quanto"}
UNSAVEABLE["quanto-fp8"] = "quanto"
SAVEABLE = [option for option in OPTIONS if option not in UNSAVEABLE]
LINEAR = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


def quantized_weights(model) -> dict[str, str]:
    """Linear layer weight name -> its tensor class, for every weight that is a tensor subclass."""
    return {
        f"{name}.weight": type(module.weight).__name__
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
        and hasattr(type(module.weight), "__tensor_flatten__")
    }


def storage_bytes(model) -> int:
    """The bytes of every distinct storage behind the inner tensors of every parameter and buffer."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        for _, inner in inner_tensors(tensor):
            storage = inner.untyped_storage()
            if (key := (str(inner.device), storage.data_ptr())) not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def flip_one_bit(tensor: torch.Tensor) -> None:
    """Flip the lowest bit of the first byte of a plain tensor, in place (twice restores it)."""
    with torch.no_grad():
        tensor.reshape(-1).view(torch.uint8)[0] ^= 1


@pytest.fixture(scope="module")
def unquantized(tmp_path_factory) -> qloader.LoadResult:
    return qloader.load([TINY, "quant=none"], run_dir=tmp_path_factory.mktemp("none"))


def test_every_option_has_its_expectations() -> None:
    assert sorted(WEIGHT_CLASSES) == sorted(OPTIONS)
    assert set(UNSAVEABLE) <= set(OPTIONS) and {"torchao-int8wo", "quanto-int8"} <= set(OPTIONS)
    # the oracle writes out each option of the methods it stands in for, independently of qloader
    assert {*BNB_OPTIONS, *QUANTO_WEIGHTS, *TORCHAO_OPTIONS} == set(options_of("bitsandbytes", "torchao", "quanto"))


@pytest.fixture(scope="module", params=OPTIONS)
def loaded(request, tmp_path_factory) -> tuple[str, qloader.LoadResult]:
    """One qloader load per option, shared by the tests below (none of them changes the weights for good)."""
    option = request.param
    return option, qloader.load([TINY, f"quant={option}"], run_dir=tmp_path_factory.mktemp(option))


# 1. the oracle: equal to plain transformers, weights first -------------------------------------------


def test_equals_transformers(loaded) -> None:
    option, result = loaded
    reference = method_load(result.checkpoint_path, option)
    assert_same_weights(result.model, reference)  # before any forward pass
    assert_same_logits(result.model, reference)
    # and the oracle would notice: one bit of one inner tensor of the reference differs
    _, scale = list(inner_tensors(reference.get_parameter(LINEAR)))[-1]
    flip_one_bit(scale)
    with pytest.raises(AssertionError, match=LINEAR):
        assert_same_weights(result.model, reference)


# 2. inventory and real storage -------------------------------------------------------------------


def test_inventory_and_footprint_are_the_real_storage(loaded, unquantized) -> None:
    option, result = loaded
    model = result.manifest["model"]
    assert model["quantized_modules"] == 14  # 2 layers x 7 Linear
    assert model["skipped_modules"] == ["lm_head"]
    weights = quantized_weights(result.model)
    assert len(weights) == 14 and set(weights.values()) == {WEIGHT_CLASSES[option]}
    assert "lm_head.weight" not in weights and type(result.model.lm_head.weight) is torch.nn.Parameter
    assert model["footprint_bytes"] == storage_bytes(result.model)
    assert unquantized.manifest["model"]["footprint_bytes"] == storage_bytes(unquantized.model)
    assert model["footprint_bytes"] < unquantized.manifest["model"]["footprint_bytes"]


def test_plan_equals_measured_footprint(loaded, tmp_path) -> None:
    option, result = loaded
    plan = qloader.load([TINY, f"quant={option}", "mode=plan"], run_dir=tmp_path)
    assert plan.manifest["mode"] == "plan" and plan.manifest["status"] == "succeeded"
    assert plan.manifest["plan"]["footprint_bytes"] == result.manifest["model"]["footprint_bytes"]


# 3. fingerprint ------------------------------------------------------------------------------------


def test_fingerprint_is_deterministic_and_sees_every_inner_byte(loaded, tmp_path) -> None:
    option, result = loaded
    fingerprint = result.manifest["weights_fingerprint"]
    again = qloader.load([TINY, f"quant={option}"], run_dir=tmp_path)
    assert again.manifest["weights_fingerprint"] == fingerprint
    assert weights_fingerprint(result.model) == fingerprint
    parts = list(inner_tensors(result.model.get_parameter(LINEAR)))
    assert len(parts) >= 2  # packed data and at least one scale
    for part, tensor in parts:
        flip_one_bit(tensor)
        try:
            assert weights_fingerprint(result.model) != fingerprint, part
        finally:
            flip_one_bit(tensor)
    assert weights_fingerprint(result.model) == fingerprint


# 4. the manifest -----------------------------------------------------------------------------------


def test_manifest_records_versions_and_choice(loaded) -> None:
    option, result = loaded
    manifest = result.manifest
    for package in ("torchao", "optimum-quanto"):
        assert manifest["versions"][package] == importlib.metadata.version(package)
    assert manifest["quantization"]["method"] == quant_options()[option].quant_method
    if option == "torchao-int4":
        if torch.cuda.is_available():
            from torchao.quantization import Int4WeightOnlyConfig as kind
        else:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig as kind
        assert manifest["quantization"]["choice"] == {"quant_type": f"{kind.__module__}.{kind.__qualname__}"}


# 5. NaN ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """A copy of the tiny checkpoint with one NaN in one Linear weight."""
    folder = copy_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("nan") / "checkpoint")

    def poison(tensors: dict) -> None:
        tensors[DOWN][3, 5] = math.nan

    edit_tensors(shard_of(folder, DOWN), poison)
    return folder


@pytest.mark.parametrize("option", OPTIONS)
def test_nan_weight_is_named(option, nan_checkpoint, tmp_path) -> None:
    with pytest.raises(NonFiniteWeightError) as raised:
        qloader.load(["model=local", f"model.path={nan_checkpoint}", f"quant={option}"], run_dir=tmp_path)
    assert f"1 weight(s) hold NaN or Inf after loading: {DOWN} (NaN)" in str(raised.value)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]["stage"] == "postprocess"


# 6. save and reload ----------------------------------------------------------------------------------


def save_with_qloader(option: str, tmp: Path) -> tuple[qloader.LoadResult, Path]:
    ckpt = tmp / f"{option}-ckpt"
    result = qloader.load(
        [TINY, f"quant={option}", "save.enabled=true", f"save.dir={ckpt}", "save.max_shard_size=30KB"],
        run_dir=tmp / f"{option}-save",
    )
    return result, ckpt


@pytest.mark.parametrize("option", SAVEABLE)
def test_save_and_reload_both_ways(option, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    before, ckpt = save_with_qloader(option, tmp_path)
    assert before.manifest["saved"]["path"] == str(ckpt.resolve())
    assert len(list(ckpt.glob("*.safetensors"))) > 1  # sharded

    # qloader saves -> plain transformers loads it as it is, and qloader reloads it with no quant override
    theirs = AutoModelForCausalLM.from_pretrained(ckpt, device_map="auto", dtype=torch.bfloat16)
    again = qloader.load(["model=local", f"model.path={ckpt}"], run_dir=tmp_path / "reload")
    assert again.manifest["quantization"]["pre_quantized"] is True
    assert again.manifest["quantization"]["description"] == before.manifest["quantization"]["description"]
    assert again.manifest["model"]["quantized_modules"] == 14
    assert_same_weights(theirs, before.model)
    assert_same_weights(again.model, before.model)
    assert again.manifest["weights_fingerprint"] == before.manifest["weights_fingerprint"]
    assert again.manifest["model"]["footprint_bytes"] == before.manifest["model"]["footprint_bytes"]
    assert_same_logits(theirs, before.model)
    assert_same_logits(again.model, before.model)

    # plain transformers quantizes and saves -> qloader loads it
    reference = method_load(before.checkpoint_path, option)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    ours = qloader.load(["model=local", f"model.path={tmp_path / 'hf'}"], run_dir=tmp_path / "from-hf")
    assert ours.manifest["quantization"]["pre_quantized"] is True
    assert_same_model(ours.model, reference)


@pytest.mark.parametrize("option", SAVEABLE)
def test_prequantized_missing_scale_is_named(option, tmp_path) -> None:
    _, ckpt = save_with_qloader(option, tmp_path)
    key = LINEAR.removesuffix(".weight") + "._weight_scale"
    drop_tensor(ckpt, key)  # torchao's shard metadata stays: only the tensor goes

    run_dir = tmp_path / "run"
    with pytest.raises((CheckpointError, CheckpointMismatchError)) as raised:
        qloader.load(["model=local", f"model.path={ckpt}"], run_dir=run_dir)
    assert f"'{key}'" in str(raised.value) and "missing" in str(raised.value)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["error"]["stage"] in ("preprocess", "load") and manifest["weights_fingerprint"] is None


@pytest.mark.parametrize("option", list(UNSAVEABLE))
def test_save_of_unsaveable_method_fails_before_any_work(option, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(ConfigError) as raised:
        qloader.load([TINY, f"quant={option}", "save.enabled=true", f"save.dir={ckpt}"], run_dir=tmp_path / "run")
    message = str(raised.value)
    assert "save.enabled=true" in message and UNSAVEABLE[option] in message
    assert "save.enabled=false" in message and "quant=torchao-int8wo" in message  # the fix
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]["stage"] == "resolve"
    assert manifest["checkpoint"] is None and [s["name"] for s in manifest["stages"]] == ["resolve"]
    assert not ckpt.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# 7. a missing backend ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "module", "extra"),
    [("torchao-int8wo", "torchao", "torchao"), ("quanto-int4", "optimum.quanto", "quanto")],
)
def test_missing_backend_names_the_extra(option, module, extra, monkeypatch, tmp_path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == module else real(name, *a, **k)
    )
    with pytest.raises(EnvironmentMismatchError) as raised:
        qloader.load([TINY, f"quant={option}"], run_dir=tmp_path)
    message = str(raised.value)
    assert f"pip install 'qloader[{extra}]'" in message and f"'{module}'" in message and "\n" not in message
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["error"]["type"] == "EnvironmentMismatchError" and manifest["error"]["stage"] == "resolve"


# 8. SmolLM2: the plan within 1 % -------------------------------------------------------------------------


@pytest.mark.smollm2
@pytest.mark.parametrize("option", [*OPTIONS, "bnb-nf4", "bnb-int8"])
def test_smollm2_equals_transformers_and_plan_within_one_percent(option, smollm2_checkpoint, tmp_path) -> None:
    overrides = ["model=smollm2-135m", f"quant={option}"]
    plan = qloader.load([*overrides, "mode=plan"], run_dir=tmp_path / "plan").manifest["plan"]["footprint_bytes"]
    result = qloader.load(overrides, run_dir=tmp_path / "load")
    measured = result.manifest["model"]["footprint_bytes"]
    error = (plan - measured) / measured
    print(f"\n{option}: plan {plan} measured {measured} error {100 * error:+.4f} %")
    assert abs(error) <= 0.01
    assert_same_model(result.model, method_load(smollm2_checkpoint, option))
