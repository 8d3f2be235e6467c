"""What a checkpoint folder holds: its safetensors shards, their index, and hashes of every input file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import time
from dataclasses import dataclass
from pathlib import Path

from qloader.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files that change what a load produces; tokenizer files are recorded too, for replays.
INPUT_SUFFIXES = (".json", ".safetensors", ".jinja", ".model", ".txt")


@dataclass(frozen=True)
class InputFile:
    name: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    shards: list[Path]
    """Weight files in load order."""
    sharded_metadata: dict | None
    """The index's metadata (+ weight_map), as transformers passes it around; None when unsharded."""
    files: list[InputFile]
    tensors: dict[str, Path]
    """Tensor name -> the shard that holds it, from the shards' own headers."""
    hash_seconds: float = 0.0
    """Time spent hashing input files (files unchanged since a previous run come from the cache)."""
    hashed_files: int = 0
    """How many files were hashed afresh, rather than taken from the hash cache."""

    @property
    def largest_shard_bytes(self) -> int:
        return max(shard.stat().st_size for shard in self.shards)

    @property
    def weights_bytes(self) -> int:
        return sum(shard.stat().st_size for shard in self.shards)


def sha256_file(path: Path) -> str:
    """Hash through mmap, with no read buffers: a multi-MB buffer, once freed, would raise glibc's
    mmap threshold for the whole process and make the load stage's temporaries stay resident."""
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return hashlib.sha256(view).hexdigest()


def _find_shards(folder: Path) -> tuple[list[Path], dict | None]:
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index_path} lists shard(s) that do not exist: {', '.join(missing)}")
        metadata = {
            **index.get("metadata", {}),
            "all_checkpoint_keys": list(weight_map),
            "weight_map": weight_map,
        }
        return [folder / n for n in names], metadata
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME], None
    raise CheckpointError(f"checkpoint '{folder}' has no safetensors weights (expected {SINGLE_NAME} or {INDEX_NAME})")


class HashCache:
    """sha256 of files keyed by (path, size, mtime), kept in qloader's cache dir, never beside the files."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries: dict[str, dict] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.misses = 0

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        entry = self.entries.get(key)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return entry["sha256"]
        self.misses += 1
        digest = sha256_file(file)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        return digest

    def save(self) -> None:
        if self.misses:
            from qloader.manifest import write_json_atomic

            with contextlib.suppress(OSError):  # a cache that cannot be written only costs time next run
                write_json_atomic(self.path, self.entries)


def default_hash_cache() -> HashCache:
    from qloader.sources import cache_dir

    return HashCache(cache_dir() / "sha256-cache.json")


def inspect_checkpoint(folder: Path, hashes: HashCache | None = None, hash_files: bool = True) -> Checkpoint:
    """Find the weight shards and hash every input file (sorted by name); plan mode hashes nothing."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"checkpoint '{folder}' has no config.json (expected a transformers checkpoint folder)")
    shards, metadata = _find_shards(folder)
    hashes = hashes or default_hash_cache()
    start = time.perf_counter()
    inputs = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in INPUT_SUFFIXES)
    files = [InputFile(p.name, p.stat().st_size, hashes.sha256(p) if hash_files else None) for p in inputs]
    hashes.save()
    return Checkpoint(
        path=folder,
        shards=shards,
        sharded_metadata=metadata,
        files=files,
        tensors=_tensor_index(shards),
        hash_seconds=round(time.perf_counter() - start, 4),
        hashed_files=hashes.misses,
    )


def _tensor_index(shards: list[Path]) -> dict[str, Path]:
    """Read only the headers: which shard holds which tensor."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as handle:
                index.update(dict.fromkeys(handle.keys(), shard))
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise CheckpointError(f"{shard}: not a readable safetensors file ({e})") from e
    return index
