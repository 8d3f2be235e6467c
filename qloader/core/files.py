"""Files every layer writes: atomic JSON (readers never see a torn write) and checks that a folder can be written."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

from qloader.core.errors import OutputError


def write_json_atomic(path: Path, data: dict, exclusive: bool = False) -> None:
    """Readers see the old file or the new one, never a torn write, and always JSON (NaN and Inf as null).

    `exclusive`: create `path` only if it does not exist (FileExistsError otherwise), still atomically:
    the complete temp file is hard-linked into place, which never replaces an existing file.
    """
    data = json_safe(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            json.dump(data, f, indent=2, default=str, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_safe(value, _path: frozenset = frozenset()):
    """`value` with every NaN or Inf float as None: `json.dump` would write them as `NaN`, which is not JSON.
    A container that holds itself is a ValueError, as `json.dump` says."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if not isinstance(value, dict | list | tuple):
        return value
    if id(value) in _path:
        raise ValueError("Circular reference detected")
    inner = _path | {id(value)}
    if isinstance(value, dict):
        return {key: json_safe(item, inner) for key, item in value.items()}
    return [json_safe(item, inner) for item in value]


def rewrite_json_in_place(path: Path, data: dict) -> None:
    """Overwrite `path` with `data` as compact JSON inside the file's current size, padded with spaces: no new
    block is needed, so this works on a full disk where a temp file cannot be written. One write, valid JSON
    before and after it. OSError (ENOSPC) when the compact JSON is longer than the file."""
    text = json.dumps(json_safe(data), separators=(",", ":"), default=str, allow_nan=False).encode()
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        if len(text) + 1 > size:
            raise OSError(errno.ENOSPC, f"the record ({len(text)} bytes) is longer than the {size} bytes on disk")
        padded = text + b" " * (size - len(text) - 1) + b"\n"
        if os.pwrite(fd, padded, 0) != size:
            raise OSError(errno.ENOSPC, "the record was written in part")
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_exclusive(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name first, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(tmp, path)


def remove_empty_folders(folder: Path, kept: Path) -> None:
    """rmdir `folder` and its parents while they are empty, up to (not including) `kept`: what a failed write
    made and left empty."""
    while folder != kept and kept in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def existing_ancestor(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent (where a mkdir -p would start)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: Path, what: str, fix: str | None = None) -> None:
    """Fail before any work if the folder `path` can neither be created nor written: `what` names it
    in the message (`run dir`, `save.dir`), `fix` ends it."""
    existing = existing_ancestor(path)
    if not existing.is_dir():
        why = f"cannot be created: '{existing}' is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"cannot be written: '{existing}' is not writable"
    else:
        return
    raise OutputError(f"{what} '{path}' {why}" + (f"; {fix}" if fix else ""))
