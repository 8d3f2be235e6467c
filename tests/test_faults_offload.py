"""Disk offload (issue #22): a load with modules on disk is a working model equal to plain transformers with the same
device map, its plan and footprint count the disk bytes, and its checks and fingerprint read the offloaded weights;
a method that cannot offload is refused in one line before any shard is read; a model with weights left on the meta
device is never `succeeded`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import read_manifest
from oracle import PROMPT_IDS, assert_same_tensor

import qloader
from qloader.core.errors import QloaderError
from qloader.loading import hf_loading

FULL = ("device_map.max_memory.cpu=100KB",)
"""A budget smaller than any module of tiny-llama: accelerate places the whole model on disk."""
PARTIAL = ("device_map.max_memory.cpu=200KB",)
"""The embeddings fit, the rest goes to disk."""
EXPLICIT = ("device_map=explicit", "+device_map.modules={model: cpu, lm_head: disk}")
EXPLICIT_DEEP = ("device_map=explicit", "+device_map.modules={model.layers.1: disk}")
"""One layer on disk; the rest stays on the default '' entry (cpu)."""


def load(run_dir: Path, *overrides: str, quant: str = "none"):
    offload = f"device_map.offload_folder={run_dir.parent / (run_dir.name + '-offload')}"
    return qloader.load(["model=tiny-llama", f"quant={quant}", offload, *overrides], run_dir=run_dir)


def transformers_offload(path: Path, device_map: dict, folder: Path):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=folder, dtype=dtype)


def assert_same_offloaded_model(ours, theirs) -> None:
    """Every state_dict entry equal: in memory, as it is; on disk (meta in the model), as its hook loads it."""
    from transformers.integrations.accelerate import load_offloaded_parameter

    our_state, their_state = ours.state_dict(), theirs.state_dict()
    assert our_state.keys() == their_state.keys()
    for name, tensor in our_state.items():
        assert (tensor.device.type == "meta") == (their_state[name].device.type == "meta"), name
        if tensor.device.type == "meta":
            mine, other = load_offloaded_parameter(ours, name), load_offloaded_parameter(theirs, name)
            assert mine.dtype == other.dtype and torch.equal(mine, other), name
        else:
            assert_same_tensor(tensor, their_state[name], name)
    with torch.no_grad():  # inputs on cpu: the hooks move them where the model runs
        assert torch.equal(ours(PROMPT_IDS).logits, theirs(PROMPT_IDS).logits)


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    """The same weights loaded with nothing offloaded: what an offloaded load's fingerprint and footprint must equal."""
    return qloader.load(["model=tiny-llama", "quant=none"], run_dir=tmp_path_factory.mktemp("offload") / "plain")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        pytest.param(FULL, {"": "disk"}, id="full-auto"),
        pytest.param(PARTIAL, None, id="partial-auto"),
        pytest.param(EXPLICIT, {"model": "cpu", "lm_head": "disk"}, id="explicit-lm-head"),
        pytest.param(
            EXPLICIT_DEEP,
            {
                "model.layers.1": "disk",
                "model.embed_tokens": "cpu",
                "model.layers.0": "cpu",
                "model.norm": "cpu",
                "model.rotary_emb": "cpu",
                "lm_head": "cpu",
            },
            id="explicit-one-layer",
        ),
    ],
)
def test_disk_offload_equals_transformers_with_the_same_map(
    overrides, expected, tiny_checkpoint, in_memory, tmp_path
) -> None:
    result = load(tmp_path / "run", *overrides)
    manifest = result.manifest
    assert manifest["status"] == "succeeded"
    device_map = manifest["model"]["device_map"]
    assert "disk" in device_map.values()
    if expected is not None:
        assert device_map == expected
    else:
        assert "cpu" in device_map.values()
    theirs = transformers_offload(tiny_checkpoint, device_map, tmp_path / "theirs")
    assert theirs.hf_device_map == device_map
    assert_same_offloaded_model(result.model, theirs)
    # the checks read the offloaded weights: the fingerprint is the one of the same weights in memory
    assert manifest["weights_fingerprint"] == in_memory.manifest["weights_fingerprint"]
    assert manifest["model"]["finite_check"] == "passed"
    # the footprint counts the bytes on disk, as the plan does, and the total is the in-memory one
    model, plan = manifest["model"], manifest["plan"]
    assert model["footprint_bytes"] == in_memory.manifest["model"]["footprint_bytes"] == plan["footprint_bytes"]
    assert model["footprint_devices"]["disk"] > 0
    assert {d: e["total_bytes"] for d, e in plan["devices"].items() if e["total_bytes"]} == model["footprint_devices"]


def test_full_offload_generates_as_transformers_does(tiny_checkpoint, tmp_path) -> None:
    """The whole model on disk still generates: every forward pass reads each weight back through its hook."""
    result = load(tmp_path / "run", *FULL)
    with torch.no_grad():
        out = result.model.generate(PROMPT_IDS, max_new_tokens=3, do_sample=False)
    theirs = transformers_offload(tiny_checkpoint, {"": "disk"}, tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(out, theirs.generate(PROMPT_IDS, max_new_tokens=3, do_sample=False))


OFFLOAD_REFUSALS = ["bnb-nf4", "bnb-int8", "torchao-int8wo", "quanto-int8"]


def _assert_refused(tmp_path: Path, quant: str, *overrides: str) -> str:
    with pytest.raises(QloaderError) as raised:
        load(tmp_path / "run", *overrides, quant=quant)
    message = str(raised.value)
    assert type(raised.value).__name__ == "DeviceMapError", message
    assert "\n" not in message and "cannot offload to disk" in message and "quant=none" in message
    manifest = read_manifest(tmp_path / "run")
    assert manifest["status"] == "failed" and manifest["error"]["stage"] == "device_map"
    assert [s["name"] for s in manifest["stages"]][-1] == "device_map" and manifest["model"] is None
    offload = tmp_path / "run-offload"
    assert not offload.exists() or not any(offload.iterdir())
    return message


@pytest.mark.parametrize("quant", OFFLOAD_REFUSALS)
def test_a_method_that_cannot_offload_is_refused_in_one_line(quant, tmp_path) -> None:
    from qloader.config.quant_options import quant_options

    message = _assert_refused(tmp_path, quant, *FULL)
    method = quant_options()[quant]
    assert message.startswith(f"quant {method.quant_method} cannot offload to disk: ")
    assert "the whole model on disk" in message and "raise device_map.max_memory" in message


def test_a_model_too_large_for_a_method_that_cannot_offload_is_not_sent_to_the_offload_folder(tmp_path) -> None:
    """Before: the shortfall message's fix was `device_map.offload_folder`, which cannot help bitsandbytes."""
    with pytest.raises(QloaderError) as raised:
        qloader.load(["model=tiny-llama", "quant=bnb-nf4", *FULL], run_dir=tmp_path / "run")
    message = str(raised.value)
    assert type(raised.value).__name__ == "DeviceMapError" and "\n" not in message
    assert "the model does not fit" in message and "short by" in message
    assert "Raise max_memory (quant bitsandbytes cannot offload to disk: " in message and "quant=none" in message
    assert "offloads to disk only when device_map.offload_folder is set" not in message


@pytest.mark.parametrize("quant", ["bnb-nf4", "torchao-int8wo"])
def test_an_explicit_disk_entry_with_a_method_that_cannot_offload_is_refused(quant, tmp_path) -> None:
    message = _assert_refused(tmp_path, quant, *EXPLICIT)
    assert "device_map.modules places lm_head on disk" in message
    assert "from_pretrained" not in message and "GPU RAM" not in message  # transformers' advice, not qloader's


def test_bnb_float32_offload_with_an_explicit_map_offloads_as_transformers_does(tiny_checkpoint, tmp_path) -> None:
    """bitsandbytes' one way to disk: with llm_int8_enable_fp32_cpu_offload and an explicit map, transformers keeps
    the modules on cpu and disk unquantized, and those offload as a plain model's do."""
    from oracle import BNB_OPTIONS
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    result = load(tmp_path / "run", *EXPLICIT, "quant.llm_int8_enable_fp32_cpu_offload=true", quant="bnb-nf4")
    device_map = result.manifest["model"]["device_map"]
    assert result.manifest["status"] == "succeeded" and device_map == {"model": "cpu", "lm_head": "disk"}
    config = BitsAndBytesConfig(**BNB_OPTIONS["bnb-nf4"], llm_int8_enable_fp32_cpu_offload=True)
    theirs = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint,
        device_map=device_map,
        offload_folder=tmp_path / "theirs",
        dtype=torch.bfloat16,
        quantization_config=config,
    )
    assert_same_offloaded_model(result.model, theirs)


def test_every_method_says_in_one_line_whether_it_offloads() -> None:
    from qloader.quant.base import REGISTERED
    from qloader.quant.lifecycle import Quantization, disk_offload_refusal

    assert disk_offload_refusal(Quantization(), "auto") is None  # unquantized: offloads
    for method in REGISTERED.values():
        line = disk_offload_refusal(Quantization(method=method), "auto")
        assert line is None or (line.startswith(f"quant {method.quant_method} cannot") and "\n" not in line)


def test_weights_left_on_meta_without_a_hook_fail_the_load(monkeypatch, tmp_path) -> None:
    """Before: with the whole model on disk, no hooks were attached; the run said succeeded with every weight on
    meta. A load that leaves any weight without a value is a LoadError naming it, never `succeeded`."""
    monkeypatch.setattr(hf_loading, "accelerate_dispatch", lambda *args, **kwargs: None)
    with pytest.raises(QloaderError) as raised:
        load(tmp_path / "run", *FULL)
    message = str(raised.value)
    assert type(raised.value).__name__ == "LoadError" and "\n" not in message
    assert "hold no value" in message and "lm_head.weight" in message and "raise device_map.max_memory" in message
    manifest = read_manifest(tmp_path / "run")
    assert manifest["status"] == "failed" and manifest["error"]["stage"] == "postprocess"
    assert manifest["weights_fingerprint"] is None


def test_a_weight_forced_onto_meta_in_memory_fails_the_load(monkeypatch, tmp_path) -> None:
    finalize = hf_loading.finalize

    def leave_on_meta(model, *args, **kwargs):
        finalize(model, *args, **kwargs)
        weight = model.model.norm.weight
        model.model.norm.weight = torch.nn.Parameter(torch.empty_like(weight, device="meta"))

    monkeypatch.setattr(hf_loading, "finalize", leave_on_meta)
    with pytest.raises(QloaderError, match=r"1 weight\(s\) hold no value .*: model\.norm\.weight; ") as raised:
        qloader.load(["model=tiny-llama", "quant=none", "device_map=cpu"], run_dir=tmp_path / "run")
    assert type(raised.value).__name__ == "LoadError"
    assert read_manifest(tmp_path / "run")["status"] == "failed"


@pytest.mark.slow  # the probe's unquantized reference runs in a process of its own
def test_the_probe_runs_on_a_model_offloaded_to_disk(tiny_checkpoint, tmp_path) -> None:
    """Before: `probe=quick` with the model on disk ended in a traceback (`Cannot copy out of meta tensor`)."""
    from damage import copy_checkpoint
    from tiny_tokenizer import add_tokenizer

    folder = add_tokenizer(copy_checkpoint(tiny_checkpoint, tmp_path / "checkpoint"))
    run = tmp_path / "run"
    offload = f"device_map.offload_folder={tmp_path / 'offload'}"
    overrides = [
        "model=local",
        f"model.path={folder}",
        "quant=none",
        "probe=quick",
        "probe.decode_tokens=2",
        offload,
        *FULL,
    ]
    result = qloader.load(overrides, run_dir=run)
    probe = result.manifest["probe"]
    assert result.manifest["status"] == "succeeded" and result.manifest["model"]["device_map"] == {"": "disk"}
    assert probe["top1_agreement"] == 1.0 and probe["mean_kl"] == 0.0 and probe["sample"]["output"] is not None
    assert probe["footprint_after_bytes"] == result.manifest["model"]["footprint_bytes"]


def test_the_finite_check_reads_the_weights_offloaded_to_disk(tiny_checkpoint, tmp_path) -> None:
    """A NaN in a weight that sits on disk fails the load as one in memory does: the check reads it back."""
    import math

    from damage import copy_checkpoint, edit_tensors, shard_of

    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "checkpoint")
    edit_tensors(shard_of(folder, "lm_head.weight"), lambda t: t["lm_head.weight"].__setitem__((0, 0), math.nan))
    overrides = ["model=local", f"model.path={folder}", "quant=none", f"device_map.offload_folder={tmp_path / 'o'}"]
    with pytest.raises(QloaderError, match=r"hold NaN or Inf after loading: lm_head\.weight \(NaN\)") as raised:
        qloader.load([*overrides, *EXPLICIT], run_dir=tmp_path / "run")
    assert type(raised.value).__name__ == "NonFiniteWeightError"
    assert read_manifest(tmp_path / "run")["model"] is None
