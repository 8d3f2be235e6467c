"""What a checkpoint folder holds: its safetensors shards, their index, and hashes of every input file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import time
from dataclasses import dataclass
from pathlib import Path

from qloader.checkpoint.integrity import check_index, describe_bad_shard, is_lfs_pointer, read_hash_cache
from qloader.core.errors import CheckpointError, UnsafeCheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"
# Files that change what a load produces; tokenizer files are recorded too, for replays.
INPUT_SUFFIXES = (".json", ".safetensors", ".bin", ".jinja", ".model", ".txt", ".py")


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
    shapes: dict[str, tuple[int, ...]]
    """Tensor name -> its shape, from the same headers."""
    format: str = "safetensors"
    """safetensors, or pickle (`pytorch_model.bin`, read only with model.allow_pickle=true)."""
    hash_seconds: float = 0.0
    """Time spent hashing input files (files unchanged since a previous run come from the cache)."""
    hashed_files: int = 0
    """How many files were hashed afresh, rather than taken from the hash cache."""
    hub: dict | None = None
    """model=hub: repo_id, the revision asked for, and the commit it resolved to."""
    contents: str = "checkpoint"
    """What a plan is computed from: 'checkpoint' (every shard here), 'headers' (an index and/or the headers of
    some of its shards: a partial download), 'config-only' (config.json alone). Only mode=plan reads the last two."""

    @property
    def largest_shard_bytes(self) -> int:
        """The largest shard here (0 when there is none: a plan from config.json alone)."""
        return max((shard.stat().st_size for shard in self.shards), default=0)

    @property
    def parameters(self) -> int:
        """Elements in all checkpoint tensors, from the headers."""
        return sum(math.prod(shape) for shape in self.shapes.values())

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


def _read_index(index_path: Path) -> dict:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a mapping of tensor name -> shard file")
        if not isinstance(index.get("metadata") or {}, dict):
            raise TypeError("metadata is not a mapping")
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise CheckpointError(f"{index_path}: not a valid weights index ({e})") from e
    return index


def _find_shards(
    folder: Path, allow_pickle: bool, partial: bool = False
) -> tuple[list[Path], Path | None, dict | None, str]:
    """The weight files, the index (path and metadata) and the format: safetensors, else pickle if allowed.
    `partial` (mode=plan): shards the index lists may be missing, and a folder may hold no weights at all."""
    for index_name, single_name, fmt in (
        (INDEX_NAME, SINGLE_NAME, "safetensors"),
        (PICKLE_INDEX_NAME, PICKLE_SINGLE_NAME, "pickle"),
    ):
        index_path = folder / index_name
        if not index_path.is_file() and not (folder / single_name).is_file():
            continue
        if fmt == "pickle" and not allow_pickle:
            found = index_name if index_path.is_file() else single_name
            raise UnsafeCheckpointError(
                f"checkpoint '{folder}' has only pickle weights ({found}); unpickling can run code from the file. "
                "Convert it to safetensors, or set model.allow_pickle=true to read it with "
                "torch.load(weights_only=True)"
            )
        if not index_path.is_file():
            return [folder / single_name], None, None, fmt
        index = _read_index(index_path)
        weight_map: dict[str, str] = index["weight_map"]
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing and not partial:
            raise CheckpointError(f"{index_path} lists shard(s) that do not exist: {', '.join(missing)}")
        names = [n for n in names if n not in missing]
        metadata = {
            **(index.get("metadata") or {}),
            "all_checkpoint_keys": list(weight_map),
            "weight_map": weight_map,
        }
        return [folder / n for n in names], index_path, metadata, fmt
    if partial:
        return [], None, None, "safetensors"
    raise CheckpointError(f"checkpoint '{folder}' has no safetensors weights (expected {SINGLE_NAME} or {INDEX_NAME})")


class HashCache:
    """sha256 of files keyed by path and identity (size, mtime, ctime, inode), kept in qloader's cache dir,
    never beside the files.

    The cache trusts that a file with the same path and identity holds the same bytes: a write moves the
    ctime, even when `touch -r` puts the mtime back. `trust=False` (model.verify_hashes=true) hashes every
    file afresh and rewrites its entry. A cache file of the wrong shape, or an entry whose checksum does
    not match, is ignored with one warning and rewritten.
    """

    def __init__(self, path: Path, trust: bool = True):
        self.path, self.trust, self.misses = path, trust, 0
        self.entries, well_formed = read_hash_cache(path)
        self.rewrite = not well_formed  # a malformed cache is replaced by the entries that were sound

    def sha256(self, file: Path) -> str:
        from qloader.core.cache import entry_check, file_identity

        identity = file_identity(file.stat())
        key = str(file.resolve())
        entry = self.entries.get(key) if self.trust else None
        if entry and all(entry[name] == value for name, value in identity.items()):
            return entry["sha256"]
        self.misses += 1
        entry = {**identity, "sha256": sha256_file(file)}
        self.entries[key] = {**entry, "check": entry_check(key, entry)}
        return entry["sha256"]

    def remember(self, file: Path, sha256: str) -> None:
        """Record the digest of a file this process just wrote and hashed (a cache entry): no rehash next run."""
        from qloader.core.cache import entry_check, file_identity

        key = str(file.resolve())
        entry = {**file_identity(file.stat()), "sha256": sha256}
        self.entries[key] = {**entry, "check": entry_check(key, entry)}
        self.rewrite = True

    def save(self) -> None:
        if self.misses or self.rewrite:
            from qloader.core.files import write_json_atomic

            with contextlib.suppress(OSError):  # a cache that cannot be written only costs time next run
                write_json_atomic(self.path, self.entries)


def default_hash_cache(trust: bool = True) -> HashCache:
    """qloader's hash cache; `trust=False` rehashes every file (and refreshes the cache)."""
    from qloader.core.cache import cache_dir

    return HashCache(cache_dir() / "sha256-cache.json", trust=trust)


def inspect_checkpoint(
    folder: Path,
    hashes: HashCache | None = None,
    hash_files: bool = True,
    allow_pickle: bool = False,
    partial: bool = False,
) -> Checkpoint:
    """Find the weight shards, read their headers and hash every input file (plan mode hashes nothing).

    Every shard is checked here, before any tensor is read: readable, consistent with its index. `partial`
    (mode=plan): a folder with config.json alone, or an index whose shards are not all here, is enough.
    """
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"checkpoint '{folder}' has no config.json (expected a transformers checkpoint folder)")
    shards, index_path, metadata, fmt = _find_shards(folder, allow_pickle, partial)
    tensors, shapes = _read_headers(shards) if fmt == "safetensors" else _read_pickles(shards)
    contents = _contents(shards, metadata)
    if index_path is not None:
        here = {shard.name for shard in shards}
        check_index(index_path, {k: v for k, v in metadata["weight_map"].items() if v in here}, tensors)
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
        tensors=tensors,
        shapes=shapes,
        format=fmt,
        hash_seconds=round(time.perf_counter() - start, 4),
        hashed_files=hashes.misses,
        contents=contents,
    )


def _contents(shards: list[Path], metadata: dict | None) -> str:
    """'checkpoint' when every weight file is here, 'headers' when an index lists some that are not, 'config-only'
    when there are none."""
    if not shards:
        return "headers" if metadata else "config-only"
    listed = set((metadata or {}).get("weight_map", {}).values())
    return "headers" if listed - {shard.name for shard in shards} else "checkpoint"


def _add_tensor(tensors: dict[str, Path], name: str, shard: Path) -> None:
    if name in tensors:
        raise CheckpointError(f"tensor '{name}' is in two shards: {tensors[name]} and {shard}")
    tensors[name] = shard


def _read_headers(shards: list[Path]) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """Read only the headers: which shard holds which tensor, and its shape."""
    from safetensors import safe_open

    tensors: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    _add_tensor(tensors, name, shard)
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError for a bad file
            raise CheckpointError(describe_bad_shard(shard, e)) from e
    return tensors, shapes


def load_pickle_shard(shard: Path) -> dict:
    """`torch.load(weights_only=True)`: plain tensors only, no code; memory-mapped where the format allows."""
    import pickle

    import torch

    try:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(shard, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line]
        reason = lines[0].removeprefix("WeightsUnpickler error: ").split(". ")[0] if lines else str(e)[:200]
        raise UnsafeCheckpointError(
            f"{shard}: torch.load(weights_only=True) refused it ({reason}): it holds more than tensors"
        ) from e
    except Exception as e:
        if is_lfs_pointer(shard):
            raise CheckpointError(describe_bad_shard(shard, e)) from e
        raise CheckpointError(f"{shard}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{shard}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def _read_pickles(shards: list[Path]) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    tensors: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        for name, tensor in load_pickle_shard(shard).items():
            _add_tensor(tensors, name, shard)
            shapes[name] = tuple(tensor.shape)
    return tensors, shapes
