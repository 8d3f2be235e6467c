"""A fingerprint of a loaded model's weights: sha256 over its state, in a stable order.

An unquantized load leaves most weights as zero-copy views of the memory-mapped shards. Hashing
them reads every byte again (most of the load's time). When qloader can prove that a tensor's
memory *is* a byte range of a shard whose sha256 it already holds (the mapping is of that file,
unchanged since it was hashed, and holds no privately written page), the tensor's sha256 is taken
from a cache keyed by (file sha256, offset, length): content-addressed, so it is the same digest
the bytes would give, and it cannot outlive a changed byte. Each digest carries a checksum: one
damaged in the cache file is dropped and the bytes are hashed, never used.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qloader.quant.base import flatten_context, inner_tensors

SHARD_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class FileRegion:
    """A mapped shard: its address range in this process, the file offset it starts at, the file's sha256."""

    start: int
    end: int
    offset: int
    sha256: str


def mapped_shards(smaps: str | None = None, hashes: Mapping[str, dict] | None = None) -> list[FileRegion]:
    """The mappings of safetensors files whose memory is provably the file's current bytes.

    From /proc/self/smaps: file-backed, no anonymous (copy-on-write) page, the same inode as the file on
    disk, and a sha256 in qloader's input-hash cache taken at the file's current size and mtime.
    """
    if smaps is None:
        try:
            smaps = Path("/proc/self/smaps").read_text()
        except OSError:  # not Linux: every tensor is hashed from its bytes
            return []
    if hashes is None:
        from qloader.checkpoint.reader import default_hash_cache

        hashes = default_hash_cache().entries
    regions, current = [], None
    for line in smaps.splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and not fields[0].endswith(":"):
            current = fields if len(fields) >= 6 and fields[5].endswith(SHARD_SUFFIX) else None
        elif current is not None and fields and fields[0] == "Anonymous:":
            if fields[1] == "0" and (region := _verified_region(current, hashes)) is not None:
                regions.append(region)
            current = None
    return sorted(regions, key=lambda r: r.start)


def _verified_region(fields: list[str], hashes: Mapping[str, dict]) -> FileRegion | None:
    from qloader.core.cache import file_identity

    path = " ".join(fields[5:])
    entry = hashes.get(path)
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if not entry or any(entry.get(name) != value for name, value in file_identity(stat).items()):
        return None  # changed since it was hashed (a write moves the ctime, even if the mtime is put back)
    if int(fields[4]) != stat.st_ino or not fields[1].startswith("r"):
        return None
    start, end = (int(x, 16) for x in fields[0].split("-"))
    return FileRegion(start, end, int(fields[2], 16), entry["sha256"])


def read_region_cache(path: Path) -> tuple[dict[str, dict], bool]:
    """The entries of `region-sha256.json` whose shape and checksum hold, and whether the file was sound.

    Each entry is `"<file sha256>:<offset>:<length>": {"sha256": digest, "check": checksum}`; a digest that
    was damaged or edited no longer matches its checksum and is dropped, so it is never used: the bytes
    are hashed instead. Anything else (not JSON, `[]`, a folder in its place) is one warning, and rewritten.
    """
    from qloader.core.cache import read_json_entries

    action = "ignoring it, those tensors are hashed from their bytes"
    return read_json_entries(path, "region digest cache", _region_entry_ok, action)


def _region_entry_ok(key: str, entry: object) -> bool:
    """{"sha256": 64 hex digits, "check": the entry's checksum}."""
    from qloader.core.cache import entry_check, is_sha256

    if not isinstance(entry, dict) or set(entry) != {"sha256", "check"}:
        return False
    return is_sha256(entry["sha256"]) and entry["check"] == entry_check(key, entry)


class RegionHashes:
    """sha256 of file byte ranges, keyed by the file's sha256, offset and length; kept in qloader's cache.

    `trust=False` (model.verify_hashes=true) reads no digest from the cache: every tensor is hashed from its
    bytes, and the cache is rewritten with what they give.
    """

    def __init__(self, path: Path | None, regions: list[FileRegion], trust: bool = True):
        self.path, self.regions, self.starts = path, regions, [r.start for r in regions]
        self.entries: dict[str, dict] = {}
        self.trust, self.added, self.rewrite = trust, 0, False
        self.lock = threading.Lock()
        if path is not None and regions:
            self.entries, well_formed = read_region_cache(path)
            self.rewrite = not well_formed

    def key(self, tensor: torch.Tensor) -> str | None:
        """The cache key of a tensor that is exactly a byte range of a verified mapping; None otherwise."""
        if not self.regions or tensor.device.type != "cpu" or not tensor.is_contiguous() or not tensor.numel():
            return None
        if type(tensor) not in (torch.Tensor, nn.Parameter):
            return None
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        i = bisect.bisect_right(self.starts, start) - 1
        if i < 0 or end > self.regions[i].end:
            return None
        region = self.regions[i]
        return f"{region.sha256}:{start - region.start + region.offset}:{end - start}"

    def sha256(self, tensor: torch.Tensor, data) -> str:
        from qloader.core.cache import entry_check

        key = self.key(tensor)
        if key is not None and self.trust and (entry := self.entries.get(key)):
            return entry["sha256"]
        digest = hashlib.sha256(data).hexdigest()
        if key is not None:
            entry = {"sha256": digest}
            with self.lock:
                self.entries[key] = {**entry, "check": entry_check(key, entry)}
                self.added += 1
        return digest

    def save(self) -> None:
        if (self.added or self.rewrite) and self.path is not None:
            from qloader.core.files import write_json_atomic

            with contextlib.suppress(OSError):  # a cache that cannot be written only costs time next run
                write_json_atomic(self.path, self.entries)


def _plain_entry(name: str, tensor: torch.Tensor, regions: RegionHashes) -> str:
    tensor = tensor.detach()
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.to("cpu").contiguous()
    data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else b""
    return f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{regions.sha256(tensor, data)}\n"


def _entry(name: str, tensor: torch.Tensor, regions: RegionHashes) -> str:
    """One line per plain tensor; a tensor subclass (torchao, quanto) as its inner tensors and attributes."""
    if not (context := flatten_context(tensor)):
        return _plain_entry(name, tensor, regions)
    inner = "".join(_plain_entry(f"{name}/{part}", t, regions) for part, t in inner_tensors(tensor))
    return f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{context}\n{inner}"


def weights_fingerprint(
    model: nn.Module,
    offloaded: Mapping[str, torch.Tensor] | None = None,
    reuse_file_hashes: bool = True,
    trust_cache: bool = True,
) -> str:
    """sha256 over one line per state_dict entry, sorted by name: name, dtype, shape, sha256 of the bytes.

    `state_dict()` is the canonical serialized form: parameters and buffers, and for bitsandbytes
    layers the packed weights with every quant-state tensor (absmax, quant_map, nested statistics,
    int8 SCB) and the quant-state fields, which bitsandbytes packs into a tensor of their own. A tensor
    subclass (torchao, optimum-quanto) counts as its inner tensors plus its attributes (block size, qtype).
    Weights offloaded to disk (on the meta device in the model) are read from `offloaded`.
    A tensor that is provably a byte range of an already-hashed shard takes its digest from the region
    cache (see the module docstring); the digest, and so the fingerprint, is the same either way.
    `trust_cache=False` (model.verify_hashes=true) hashes every tensor and rewrites the region cache.
    Entries are hashed on every core at once: hashlib releases the GIL while it hashes.
    """
    from qloader.core.cache import cache_dir

    entries = sorted(model.state_dict().items())
    if offloaded is not None:
        entries = [(n, offloaded[n] if t.device.type == "meta" else t) for n, t in entries]
    regions = RegionHashes(
        cache_dir() / "region-sha256.json", mapped_shards() if reuse_file_hashes else [], trust=trust_cache
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=cores) as pool:
        lines = list(pool.map(lambda entry: _entry(*entry, regions), entries))
    regions.save()
    return hashlib.sha256("".join(lines).encode()).hexdigest()
