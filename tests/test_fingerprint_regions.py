"""The fingerprint of zero-copy weights, taken from the region cache, is the digest of their bytes."""

from __future__ import annotations

from pathlib import Path

import torch

import qloader
from qloader.measure.fingerprint import RegionHashes, mapped_shards, weights_fingerprint


def test_unquantized_fingerprint_reuses_file_hashes_and_equals_hashing_the_bytes(tmp_path) -> None:
    result = qloader.load(["model=tiny-llama", "quant=none", "device_map=cpu"], run_dir=tmp_path)
    fingerprint = result.manifest["weights_fingerprint"]
    regions = RegionHashes(None, mapped_shards())
    keys = [regions.key(t) for t in result.model.state_dict().values()]
    assert regions.regions and sum(k is not None for k in keys) >= len(keys) // 2  # zero-copy views, proven
    assert weights_fingerprint(result.model, reuse_file_hashes=False) == fingerprint  # bytes hashed afresh
    assert weights_fingerprint(result.model) == fingerprint  # from the region cache


def test_a_written_weight_changes_the_fingerprint_and_leaves_the_proof(tmp_path) -> None:
    result = qloader.load(["model=tiny-llama", "quant=none", "device_map=cpu"], run_dir=tmp_path)
    fingerprint = result.manifest["weights_fingerprint"]
    weight = result.model.get_submodule("model.layers.0.mlp.down_proj").weight
    before = RegionHashes(None, mapped_shards()).key(weight)
    assert before is not None
    old = weight[0, 0].clone()
    with torch.no_grad():
        weight[0, 0] = old + 1.0  # a private copy of that page: its mapping no longer proves anything
    assert RegionHashes(None, mapped_shards()).key(weight) is None
    assert weights_fingerprint(result.model) != fingerprint
    with torch.no_grad():
        weight[0, 0] = old
    assert weights_fingerprint(result.model) == fingerprint


def test_a_shard_changed_since_it_was_hashed_is_not_trusted(tmp_path) -> None:
    result = qloader.load(["model=tiny-llama", "quant=none", "device_map=cpu"], run_dir=tmp_path)
    smaps = Path("/proc/self/smaps").read_text()
    from qloader.checkpoint.reader import default_hash_cache

    entries = default_hash_cache().entries
    assert mapped_shards(smaps, entries)
    stale = {path: {**entry, "mtime_ns": entry["mtime_ns"] - 1} for path, entry in entries.items()}
    assert mapped_shards(smaps, stale) == []  # the file's bytes may differ from the cached sha256
    assert result.manifest["weights_fingerprint"]
