"""Ways to damage a copy of a checkpoint, for the hardening tests: each edits files in place."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][tensor]


def edit_index(folder: Path, edit: Callable[[dict], None]) -> None:
    index = json.loads((folder / INDEX).read_text())
    edit(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index, indent=2))


def read_header(shard: Path) -> tuple[dict, bytes]:
    """The header as a dict, and the data section's bytes."""
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_header(shard: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    shard.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_tensors(shard: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite a shard through safetensors itself, after `edit` changed its tensors."""
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def drop_tensor(folder: Path, key: str) -> None:
    """Remove one tensor from its shard and from the index; the shard keeps its own metadata (torchao's)."""
    from safetensors import safe_open

    index = json.loads((folder / INDEX).read_text())
    shard = folder / index["weight_map"].pop(key)
    with safe_open(shard, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata=metadata)
    (folder / INDEX).write_text(json.dumps(index))


def assert_missing_tensor_is_named(source: Path, key: str, work: Path) -> None:
    """A copy of `source` without tensor `key` fails to load with an error naming it, before any weight is
    fingerprinted, and its failed manifest says where."""
    import pytest

    import qloader
    from qloader.core.errors import CheckpointError, CheckpointMismatchError

    path = copy_checkpoint(source, work / "ckpt")
    drop_tensor(path, key)
    with pytest.raises((CheckpointError, CheckpointMismatchError)) as raised:
        qloader.load(["model=local", f"model.path={path}"], run_dir=work / "run")
    assert key in str(raised.value)
    manifest = json.loads((work / "run" / "manifest.json").read_text())
    assert manifest["error"]["stage"] in ("preprocess", "load") and manifest["weights_fingerprint"] is None


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` (itself included) -> (size, mtime_ns)."""
    paths = [folder, *sorted(folder.rglob("*"))]
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in paths}
