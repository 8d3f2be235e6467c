"""Files every layer writes: atomic JSON (readers never see a torn write) and checks that a folder can be written."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qloader.core.errors import OutputError


def write_json_atomic(path: Path, data: dict, exclusive: bool = False) -> None:
    """Readers see the old file or the new one, never a torn write.

    `exclusive`: create `path` only if it does not exist (FileExistsError otherwise), still atomically:
    the complete temp file is hard-linked into place, which never replaces an existing file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link_exclusive(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name first, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(tmp, path)


def existing_ancestor(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent (where a mkdir -p would start)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: Path, what: str) -> None:
    """Fail before any work if the folder `path` can neither be created nor written: `what` names it
    in the message (`run dir`, `save.dir`)."""
    existing = existing_ancestor(path)
    if not existing.is_dir():
        why = f"cannot be created: '{existing}' is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"cannot be written: '{existing}' is not writable"
    else:
        return
    raise OutputError(f"{what} '{path}' {why}")
