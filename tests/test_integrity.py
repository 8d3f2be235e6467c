"""Hardening: each malformed or unsafe checkpoint gets a named error, a failed manifest, and no weights read.

Every case damages a private copy of the tiny checkpoint and loads it through the Python API.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_manifest, run_cli
from damage import (
    copy_checkpoint,
    edit_index,
    edit_tensors,
    read_header,
    shard_of,
    shards,
    tree_state,
    write_header,
)

import qloader
from qloader.core.errors import QloaderError

GATE = "model.layers.0.mlp.gate_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


def load_local(folder: Path, run_dir: Path, *overrides: str):
    return qloader.load(["model=local", f"model.path={folder}", "device_map=cpu", *overrides], run_dir=run_dir)


def assert_fails(folder: Path, tmp_path: Path, error: str, stage: str, *fragments: str, overrides=()) -> dict:
    """The load raises `error` in `stage`, naming every fragment; the manifest says failed, no tensor was loaded."""
    run_dir = tmp_path / "run"
    with pytest.raises(QloaderError) as raised:
        load_local(folder, run_dir, *overrides)
    assert type(raised.value).__name__ == error, raised.value
    for fragment in fragments:
        assert fragment in str(raised.value), (fragment, str(raised.value))
    manifest = read_manifest(run_dir)
    assert manifest["status"] == "failed" and manifest["error"]["type"] == error
    assert manifest["error"]["stage"] == stage and manifest["weights_fingerprint"] is None
    assert fragments[0] in manifest["error"]["message"]
    return manifest


@pytest.fixture
def damaged(tiny_checkpoint, tmp_path) -> Path:
    return copy_checkpoint(tiny_checkpoint, tmp_path / "checkpoint")


# 1. truncated shards ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keep, fragment",
    [
        (lambda size: 0, "truncated: 0 bytes, shorter than the 8-byte header length"),
        (lambda size: 5, "truncated: 5 bytes, shorter than the 8-byte header length"),
        (lambda size: 40, "truncated inside the header"),
        (lambda size: size - 1, "(truncated, or out-of-bounds offsets)"),
    ],
    ids=["at-0", "in-length", "in-header", "one-byte-short"],
)
def test_truncated_shard(damaged, tmp_path, keep, fragment) -> None:
    shard = shard_of(damaged, DOWN)
    data = shard.read_bytes()
    shard.write_bytes(data[: keep(len(data))])
    assert_fails(damaged, tmp_path, "CheckpointError", "resolve", str(shard), fragment)


# 2.-3. the index and the shards disagree --------------------------------------------------------


def test_index_lists_a_shard_that_does_not_exist(damaged, tmp_path) -> None:
    shard = shard_of(damaged, DOWN)
    shard.unlink()
    assert_fails(damaged, tmp_path, "CheckpointError", "resolve", "lists shard(s) that do not exist", shard.name)


def test_index_names_the_wrong_shard(damaged, tmp_path) -> None:
    right, wrong = shard_of(damaged, DOWN).name, shard_of(damaged, GATE).name
    edit_index(damaged, lambda weight_map: weight_map.update({DOWN: wrong}))
    assert_fails(
        damaged, tmp_path, "CheckpointError", "resolve", "1 tensor(s) listed under the wrong shard",
        f"{DOWN} (index: {wrong}, found in {right})",
    )  # fmt: skip


def test_index_keys_differ_from_the_headers(damaged, tmp_path) -> None:
    def edit(weight_map: dict) -> None:
        weight_map["model.layers.0.mlp.extra.weight"] = weight_map.pop(GATE)

    edit_index(damaged, edit)
    assert_fails(
        damaged, tmp_path, "CheckpointError", "resolve", "model.safetensors.index.json does not match",
        "1 tensor(s) listed that no shard holds: model.layers.0.mlp.extra.weight",
        f"1 tensor(s) in the shards that it does not list: {GATE}",
    )  # fmt: skip


# 4.-6. not a safetensors file, or a corrupt header ----------------------------------------------


def test_git_lfs_pointer_in_place_of_a_shard(damaged, tmp_path) -> None:
    shard = shard_of(damaged, DOWN)
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 33672\n")
    assert_fails(damaged, tmp_path, "CheckpointError", "resolve", f"{shard} is a git-LFS pointer file", "git lfs pull")


def test_header_is_not_json(damaged, tmp_path) -> None:
    shard = shard_of(damaged, DOWN)
    raw = bytearray(shard.read_bytes())
    raw[8:12] = b"nope"
    shard.write_bytes(bytes(raw))
    assert_fails(damaged, tmp_path, "CheckpointError", "resolve", str(shard), "the header is not valid JSON")


def test_header_larger_than_allowed(damaged, tmp_path) -> None:
    shard = shard_of(damaged, DOWN)
    raw = shard.read_bytes()
    shard.write_bytes((200_000_000).to_bytes(8, "little") + raw[8:])
    assert_fails(
        damaged, tmp_path, "CheckpointError", "resolve", str(shard),
        "header length 200000000 bytes exceeds the 100000000 byte limit",
    )  # fmt: skip


def _offsets(shard: Path) -> tuple[dict, bytes, list[str]]:
    header, data = read_header(shard)
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
    return header, data, names


def test_overlapping_offsets(damaged, tmp_path) -> None:
    shard = shard_of(damaged, DOWN)
    header, data, names = _offsets(shard)
    first, second = names[0], names[1]
    start, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [start - 8, end - 8]
    write_header(shard, header, data)
    assert_fails(
        damaged, tmp_path, "CheckpointError", "resolve", str(shard), f"tensor '{second}' overlaps tensor '{first}'"
    )


def test_out_of_bounds_offsets(damaged, tmp_path) -> None:
    shard = shard_of(damaged, DOWN)
    header, data, names = _offsets(shard)
    last = names[-1]
    header[last]["data_offsets"][1] += 64
    write_header(shard, header, data)
    assert_fails(
        damaged, tmp_path, "CheckpointError", "resolve", str(shard),
        f"tensor '{last}' ends at byte {len(data) + 64} but the data section holds {len(data)} bytes",
    )  # fmt: skip


# 7.-8. the tensors do not fit the model ---------------------------------------------------------


@pytest.mark.parametrize("quant", ["none", "bnb-nf4"])
def test_missing_weights_are_fatal(damaged, tmp_path, quant) -> None:
    shard = shard_of(damaged, DOWN)
    edit_tensors(shard, lambda tensors: tensors.pop(DOWN))
    edit_index(damaged, lambda weight_map: weight_map.pop(DOWN))
    manifest = assert_fails(
        damaged, tmp_path, "CheckpointMismatchError", "preprocess",
        f"1 weight(s) the model needs are missing: {DOWN}", overrides=[f"quant={quant}"],
    )  # fmt: skip
    assert "load" not in [stage["name"] for stage in manifest["stages"]]  # nothing was read, nothing initialized


def test_unexpected_tensors_are_fatal(damaged, tmp_path) -> None:
    extra = "model.layers.1.mlp.surprise.weight"
    shard = shard_of(damaged, DOWN)
    edit_tensors(shard, lambda tensors: tensors.update({extra: torch.zeros(4, 4, dtype=torch.bfloat16)}))
    edit_index(damaged, lambda weight_map: weight_map.update({extra: shard.name}))
    assert_fails(damaged, tmp_path, "CheckpointMismatchError", "preprocess", f"1 unexpected tensor(s): {extra}")


def test_missing_keys_are_listed_up_to_eight(damaged, tmp_path) -> None:
    layer1 = [name for name in json.loads((damaged / "model.safetensors.index.json").read_text())["weight_map"]]
    layer1 = [name for name in layer1 if name.startswith("model.layers.1.")]
    for name in layer1:
        edit_tensors(shard_of(damaged, name), lambda tensors, name=name: tensors.pop(name))
    edit_index(damaged, lambda weight_map: [weight_map.pop(name) for name in layer1])
    assert_fails(
        damaged, tmp_path, "CheckpointMismatchError", "preprocess",
        f"{len(layer1)} weight(s) the model needs are missing", f"(and {len(layer1) - 8} more)",
    )  # fmt: skip


@pytest.mark.parametrize("quant", ["none", "bnb-nf4", "bnb-int8"])
def test_shape_mismatch(damaged, tmp_path, quant) -> None:
    shard = shard_of(damaged, GATE)
    shape = []
    edit_tensors(
        shard,
        lambda tensors: shape.extend(tensors[GATE].shape) or tensors.update({GATE: tensors[GATE].t().contiguous()}),
    )
    assert_fails(
        damaged, tmp_path, "CheckpointMismatchError", "preprocess",
        f"1 shape mismatch(es): {GATE}: checkpoint {shape[::-1]}, model {shape}", overrides=[f"quant={quant}"],
    )  # fmt: skip


# 9. NaN and Inf ---------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["none", "bnb-nf4", "bnb-int8"])
@pytest.mark.parametrize("value, kind", [(math.nan, "NaN"), (math.inf, "Inf")])
def test_nonfinite_weight_is_named(damaged, tmp_path, quant, value, kind) -> None:
    def poison(tensors: dict) -> None:
        tensors[DOWN][3, 5] = value

    edit_tensors(shard_of(damaged, DOWN), poison)
    assert_fails(
        damaged, tmp_path, "NonFiniteWeightError", "postprocess",
        f"1 weight(s) hold NaN or Inf after loading: {DOWN} ({kind})", overrides=[f"quant={quant}"],
    )  # fmt: skip


def test_finite_check_can_be_turned_off(damaged, tmp_path) -> None:
    edit_tensors(shard_of(damaged, DOWN), lambda tensors: tensors[DOWN].__setitem__((0, 0), math.nan))
    result = load_local(damaged, tmp_path / "run", "quant=none", "validate.finite=false")
    assert result.manifest["status"] == "succeeded" and result.manifest["model"]["finite_check"] == "skipped"
    assert torch.isnan(result.model.get_parameter(DOWN)).any()


def test_finite_check_auto_covers_small_models_only(tiny_checkpoint, tmp_path) -> None:
    small = load_local(tiny_checkpoint, tmp_path / "small", "quant=none").manifest
    large = load_local(tiny_checkpoint, tmp_path / "large", "quant=none", "validate.finite_max_parameters=1000")
    assert small["model"]["finite_check"] == "passed"
    assert large.manifest["model"]["finite_check"] == "skipped"


# 10. pickle weights -----------------------------------------------------------------------------


class _Exploit:
    """Unpickling this creates a file: what a malicious pytorch_model.bin would do."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.write_text, (self.sentinel, "code ran"))


def _pickle_checkpoint(tiny_checkpoint: Path, folder: Path, payload) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    torch.save(payload, folder / "pytorch_model.bin")
    return folder


def _tiny_state_dict(tiny_checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for shard in shards(tiny_checkpoint) for k, v in load_file(shard).items()}


def test_pickle_weights_are_refused_by_default(tiny_checkpoint, tmp_path) -> None:
    sentinel = tmp_path / "sentinel"
    folder = _pickle_checkpoint(tiny_checkpoint, tmp_path / "pickled", {"w": _Exploit(sentinel)})
    assert_fails(
        folder, tmp_path, "UnsafeCheckpointError", "resolve", "has only pickle weights (pytorch_model.bin)",
        "model.allow_pickle=true",
    )  # fmt: skip
    assert not sentinel.exists()


def test_allowed_pickle_is_still_read_without_running_code(tiny_checkpoint, tmp_path) -> None:
    sentinel = tmp_path / "sentinel"
    folder = _pickle_checkpoint(tiny_checkpoint, tmp_path / "pickled", {"w": _Exploit(sentinel)})
    assert_fails(
        folder, tmp_path, "UnsafeCheckpointError", "resolve", "torch.load(weights_only=True) refused it",
        overrides=["model.allow_pickle=true"],
    )  # fmt: skip
    assert not sentinel.exists()


@pytest.mark.parametrize("mode", ["none", "nf4-dq"])
def test_allowed_pickle_loads_as_transformers_does(tiny_checkpoint, tmp_path, mode) -> None:
    from oracle import MODES, assert_same_model, transformers_load

    folder = _pickle_checkpoint(tiny_checkpoint, tmp_path / "pickled", _tiny_state_dict(tiny_checkpoint))
    overrides, bnb_kwargs = MODES[mode]
    result = load_local(folder, tmp_path / "run", "model.allow_pickle=true", *overrides)
    assert result.manifest["checkpoint"]["shards"] == ["pytorch_model.bin"]
    assert_same_model(result.model, transformers_load(folder, bnb_kwargs, device_map="cpu"))


# 11. custom modeling code -----------------------------------------------------------------------

MODELING = """
from pathlib import Path
from transformers import LlamaForCausalLM

Path({sentinel!r}).write_text("code ran")


class SentinelForCausalLM(LlamaForCausalLM):
    pass
"""


def _remote_code_checkpoint(tiny_checkpoint: Path, folder: Path, sentinel: Path) -> Path:
    copy_checkpoint(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_sentinel.SentinelForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_sentinel.py").write_text(MODELING.format(sentinel=str(sentinel)))
    return folder


def test_custom_code_is_refused_by_default(tiny_checkpoint, tmp_path) -> None:
    sentinel = tmp_path / "sentinel"
    folder = _remote_code_checkpoint(tiny_checkpoint, tmp_path / "custom", sentinel)
    assert_fails(
        folder, tmp_path, "UnsafeCheckpointError", "resolve", "has auto_map", "(modeling_sentinel.py)",
        "model.trust_remote_code=true",
    )  # fmt: skip
    assert not sentinel.exists()


@pytest.mark.slow  # a real process of its own (signals, umask, import side effects): make test-slow
def test_custom_code_runs_when_trusted(tiny_checkpoint, tmp_path) -> None:
    sentinel = tmp_path / "sentinel"
    folder = _remote_code_checkpoint(tiny_checkpoint, tmp_path / "custom", sentinel)
    # A process of its own: the checkpoint's code runs on import, and transformers reads HF_MODULES_CACHE once, when
    # it is imported; in this process the module would stay in sys.modules and on sys.path for every later test.
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = run_cli(
        "model=local", f"model.path={folder}", "model.trust_remote_code=true", "quant=bnb-nf4", "device_map=cpu",
        run_dir=tmp_path / "run", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sentinel.read_text() == "code ran"
    assert read_manifest(tmp_path / "run")["model"]["class"] == "SentinelForCausalLM"


# 12. a memory budget too small ------------------------------------------------------------------


def test_too_small_max_memory_names_the_shortfall_and_never_offloads(tmp_path) -> None:
    with pytest.raises(QloaderError) as raised:
        qloader.load(["model=tiny-llama", "quant=none", "device_map.max_memory.cpu=200KB"], run_dir=tmp_path)
    message = str(raised.value)
    assert type(raised.value).__name__ == "DeviceMapError" and "the model does not fit" in message
    assert "short by" in message and "device_map.offload_folder" in message
    manifest = read_manifest(tmp_path)
    assert manifest["error"]["stage"] == "device_map" and manifest["model"] is None


def test_explicit_disk_placement_needs_an_offload_folder(tmp_path) -> None:
    with pytest.raises(QloaderError, match=r"places lm_head on disk; set device_map.offload_folder") as raised:
        qloader.load(
            [
                "model=tiny-llama",
                "quant=none",
                "device_map=explicit",
                "+device_map.modules={model: cpu, lm_head: disk}",
            ],
            run_dir=tmp_path,
        )
    assert type(raised.value).__name__ == "DeviceMapError"


def test_offload_folder_inside_the_checkpoint_is_refused(damaged, tmp_path) -> None:
    inside = f"device_map.offload_folder={damaged / 'offload'}"
    assert_fails(
        damaged, tmp_path, "DeviceMapError", "device_map", "is inside the checkpoint",
        overrides=["device_map=auto", "device_map.max_memory.cpu=200KB", inside],
    )  # fmt: skip


def test_offload_folder_allows_disk_offload_as_transformers_does(damaged, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    before = tree_state(damaged)
    budget = ["device_map=auto", "device_map.max_memory.cpu=200KB"]
    offload = f"device_map.offload_folder={tmp_path / 'offload'}"
    result = load_local(damaged, tmp_path / "run", "quant=none", *budget, offload)
    device_map = result.manifest["model"]["device_map"]
    assert "disk" in device_map.values() and "cpu" in device_map.values()
    theirs = AutoModelForCausalLM.from_pretrained(
        damaged, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": "200KB"}, offload_folder=tmp_path / "t"
    )
    assert theirs.hf_device_map == device_map
    with torch.no_grad():
        ids = torch.tensor([[1, 17, 42, 99]])
        assert torch.equal(result.model(ids).logits, theirs(ids).logits)
    in_memory = load_local(damaged, tmp_path / "plain", "quant=none")  # same weights, none offloaded
    assert result.manifest["weights_fingerprint"] == in_memory.manifest["weights_fingerprint"]
    assert result.manifest["model"]["finite_check"] == "passed"
    assert tree_state(damaged) == before


# The checkpoint folder is never written ---------------------------------------------------------


def test_a_run_never_writes_inside_the_checkpoint(tiny_checkpoint, tmp_path) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "checkpoint")
    before = tree_state(folder)
    load_local(folder, tmp_path / "run", "quant=bnb-nf4", "save.enabled=true", f"save.dir={tmp_path / 'saved'}")
    load_local(folder, tmp_path / "plan", "mode=plan")
    assert tree_state(folder) == before
