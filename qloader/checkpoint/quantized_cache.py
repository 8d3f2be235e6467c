"""The quantized-weights cache: a quantized model saved once under `$QLOADER_CACHE/quantized/<key>/`, keyed by
everything that decides its bytes, and read back as a pre-quantized checkpoint by later loads.

An entry is written into a temp folder named after its owner process, then renamed into place, under a lock
file naming its writer (`<key>.lock`): readers never see half an entry and two runs never both write one. The
entry's record (`.qloader-entry`: the key's inputs, each file's size and sha256) is its completion marker; an
entry without one, or whose files no longer match it, is removed with one warning and rebuilt. A run that reads
an entry holds a shared flock on its folder until the run ends; eviction (least recently used first, down to
`cache.max_bytes`) and `qloader cache clear` skip entries in use. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from qloader.checkpoint.reader import HashCache, sha256_file
from qloader.core.cache import cache_dir, owner_tag, remove_dead_temps, warn_damaged
from qloader.core.errors import OutputError
from qloader.core.files import write_json_atomic
from qloader.core.locks import OwnerLock
from qloader.core.permissions import follow_umask
from qloader.core.units import mib, parse_size

log = logging.getLogger("qloader")

RECORD = ".qloader-entry"
"""The completion record inside an entry (no `.json` suffix: it is no input file of the checkpoint)."""
FORMAT = 1
"""The layout of an entry; part of every key, so a new layout never reads an old one."""
WRITING, REMOVING = ".writing-", ".removing-"
"""In the temp names of an entry being written, and of one being removed (renamed away first)."""
_KEY = re.compile(r"^[0-9a-f]{32}$")


def quantized_root() -> Path:
    return cache_dir() / "quantized"


def cache_key(inputs: dict) -> str:
    """sha256 of the canonical JSON of everything that decides the quantized bytes (32 hex digits)."""
    canonical = json.dumps({"format": FORMAT, **inputs}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass
class Entry:
    """A complete entry, held (shared flock on its folder) from `open_entry` until `release`."""

    key: str
    path: Path
    record: dict
    fd: int | None = None

    @property
    def bytes(self) -> int:
        return int(self.record["bytes"])

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def open_entry(key: str, hashes: HashCache) -> Entry | None:
    """The complete entry for `key`, held until `Entry.release`; None if there is none. A damaged one (no record,
    a file missing or changed since it was written) is removed with one warning, so this run rebuilds it."""
    path = quantized_root() / key
    fd = _hold(path, fcntl.LOCK_SH)
    if fd is None:
        return None
    record, why = _check_entry(path, key, hashes)
    if why is None:
        with contextlib.suppress(OSError):
            os.utime(path / RECORD)  # last used: eviction goes by it
        return Entry(key, path, record, fd)
    os.close(fd)
    discard_damaged(path, why)
    return None


def discard_damaged(path: Path, why: str) -> None:
    """Remove a damaged entry (unless another run holds it), with the one warning."""
    removed = remove_entry(path)
    action = "removed; this run quantizes again and rebuilds it" if removed else "in use by another run; left"
    warn_damaged("quantized cache entry", path, why, action)


def _hold(path: Path, mode: int) -> int | None:
    """An fd on the entry folder with a flock of `mode` (never waiting for LOCK_EX); None if the folder is not
    there (or was renamed away meanwhile) or, for LOCK_EX, is held by another run."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, mode if mode == fcntl.LOCK_SH else mode | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _check_entry(path: Path, key: str, hashes: HashCache) -> tuple[dict, str | None]:
    """The entry's record, and why the entry cannot be used (None: every file is there, as written)."""
    try:
        record = json.loads((path / RECORD).read_text())
    except FileNotFoundError:
        return {}, "no completion record (a write that never finished, or a folder put there by hand)"
    except (OSError, ValueError) as e:
        return {}, f"its completion record is not readable JSON ({type(e).__name__}: {e})"
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("files"), list):
        return {}, "its completion record is not one of this entry"
    for item in record["files"]:
        file = path / str(item.get("name"))
        try:
            size = file.stat().st_size
        except OSError:
            return record, f"{item.get('name')} is missing"
        if size != item.get("size"):
            return record, f"{item.get('name')} has {size} bytes, {item.get('size')} when written"
        if hashes.sha256(file) != item.get("sha256"):
            return record, f"{item.get('name')} changed since it was written (sha256 differs)"
    hashes.save()
    return record, None


def remove_entry(path: Path) -> bool:
    """Remove the entry folder if no run holds it: renamed away first (atomic for readers), then deleted."""
    fd = _hold(path, fcntl.LOCK_EX)
    if fd is None:
        return not path.exists()
    try:
        away = path.with_name(f".{path.name}{owner_tag()}{REMOVING}{os.urandom(4).hex()}")
        os.rename(path, away)
    except OSError:
        return False
    finally:
        os.close(fd)
    shutil.rmtree(away, ignore_errors=True)
    return True


def store_entry(
    key: str, record: dict, write: Callable[[Path], None], need_bytes: int, max_bytes: int, hashes: HashCache
) -> tuple[Entry | None, str | None]:
    """Write the entry for `key` (`write(folder)` fills a folder with the checkpoint) under its lock, then evict
    least recently used entries down to `max_bytes`. Returns the entry, or None and why nothing was stored."""
    root = quantized_root()
    if need_bytes > max_bytes:
        return None, f"the quantized model ({mib(need_bytes)}) is larger than cache.max_bytes ({mib(max_bytes)})"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_dead_writes(root)
        lock = OwnerLock(root / key, "quantized cache entry", "this run does not store it").acquire()
    except OutputError as e:
        return None, f"another run is writing it ({e})" if "another run" in str(e) else str(e)
    except OSError as e:
        return None, f"the cache folder {root} cannot be written ({type(e).__name__}: {e})"
    try:
        if (root / key).is_dir():
            return None, "another run stored it meanwhile"
        evict(max_bytes - need_bytes, keep=key)
        if (free := shutil.disk_usage(root).free) < need_bytes:
            return None, f"{root} has {mib(free)} free, the quantized model needs about {mib(need_bytes)}"
        record = _write_entry(root, key, record, write)
    except Exception as e:  # a full disk, or a serializer that refuses the model: the load itself goes on
        return None, f"writing it failed ({type(e).__name__}: {e})"
    finally:
        lock.release()
    for item in record["files"]:
        hashes.remember(root / key / item["name"], item["sha256"])
    hashes.save()
    evict(max_bytes, keep=key)
    return Entry(key, root / key, record), None


def _write_entry(root: Path, key: str, record: dict, write: Callable[[Path], None]) -> dict:
    """The checkpoint and its record in a temp folder, then one rename: the entry appears complete or not at all."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}{owner_tag()}{WRITING}", dir=root))
    try:
        write(tmp)
        files = [
            {"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        ]
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {**record, "key": key, "format": FORMAT, "files": files, "created_at": now}
        record["bytes"] = sum(item["size"] for item in files)
        write_json_atomic(tmp / RECORD, record)
        follow_umask(tmp)
        os.rename(tmp, root / key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def list_entries() -> list[dict]:
    """Every entry, least recently used first: key, path, bytes, last use, and what it holds."""
    root = quantized_root()
    if not root.is_dir():
        return []
    rows = []
    for path in root.iterdir():
        if not _KEY.match(path.name) or not path.is_dir():
            continue
        try:
            record = json.loads((path / RECORD).read_text())
            used = (path / RECORD).stat().st_mtime
        except (OSError, ValueError):
            record, used = None, path.stat().st_mtime
        record = record if isinstance(record, dict) else {}
        size = record.get("bytes")
        if not isinstance(size, int):
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        rows.append(
            {
                "key": path.name,
                "path": str(path),
                "bytes": size,
                "last_used": datetime.fromtimestamp(used, timezone.utc).isoformat(timespec="seconds"),
                "description": record.get("description") or "damaged (no completion record)",
                "source": record.get("source"),
                "_used": used,
            }
        )
    return sorted(rows, key=lambda row: row["_used"])


def held_bytes() -> int:
    return sum(row["bytes"] for row in list_entries())


def evict(limit: int, keep: str | None = None) -> list[dict]:
    """Remove least recently used entries until the cache holds at most `limit` bytes (never `keep`, nor an entry
    another run is reading)."""
    rows = list_entries()
    total, removed = sum(row["bytes"] for row in rows), []
    for row in rows:
        if total <= limit:
            break
        if row["key"] != keep and remove_entry(Path(row["path"])):
            total -= row["bytes"]
            removed.append(row)
    if removed:
        log.info(
            "quantized cache: evicted %d least recently used entr%s (%s) to stay under %s",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            mib(sum(row["bytes"] for row in removed)),
            mib(limit),
        )
    return removed


def clear() -> tuple[list[dict], list[dict]]:
    """Remove every entry no run is reading: (removed, kept in use)."""
    removed, kept = [], []
    for row in list_entries():
        (removed if remove_entry(Path(row["path"])) else kept).append(row)
    if quantized_root().is_dir():
        remove_dead_writes(quantized_root())
    return removed, kept


def remove_dead_writes(root: Path) -> None:
    """Temp folders of entries whose writer (or remover) died, with one warning."""
    temps = [p for p in root.glob(".*") if WRITING in p.name or REMOVING in p.name]
    remove_dead_temps(temps, "quantized cache temp folder(s)")


def max_bytes(setting: int | str) -> int:
    """`cache.max_bytes` in bytes; auto: half of what the cache's file system has free plus what the cache holds."""
    if setting != "auto":
        return parse_size(setting)
    root = quantized_root()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return (shutil.disk_usage(existing).free + held_bytes()) // 2
