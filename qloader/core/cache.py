"""Where qloader keeps what it builds once per machine (converted models, hashes, kernels, references), and
what every cache uses to heal: file identities, entry checksums, one warning per damaged file, and temp names
that carry their owner process, so leftovers of a killed writer can be told from a writer still at work."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """`$QLOADER_CACHE`, else `$XDG_CACHE_HOME/qloader`, else `~/.cache/qloader`."""
    if env := os.environ.get("QLOADER_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qloader"


# ---------------------------------------------------------------- what the caches trust, and how they heal

log = logging.getLogger("qloader")

_OWNER = re.compile(r"\.pid(\d+)-(\d+)(?=[.-]|$)")
"""The owner tag in a temp name (`.pid<pid>-<start ticks>`), see `owner_tag`."""
_ATOMIC_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")
"""The temp file of `qloader.core.files.write_json_atomic`: `.<name>.<pid>.tmp` (the pid alone)."""


def file_identity(stat: os.stat_result) -> dict[str, int]:
    """What a cache knows a file by: its size and mtime, and what no user can set back (ctime, inode).

    `touch -r` restores an mtime; rewriting a file always moves its ctime, replacing it its inode.
    """
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "ino": stat.st_ino}


def entry_check(key: str, entry: dict) -> str:
    """A checksum over a cache entry and its key: a damaged digest, identity or key no longer matches it."""
    body = {name: value for name, value in entry.items() if name != "check"}
    return hashlib.sha256(json.dumps([key, body], sort_keys=True).encode()).hexdigest()[:16]


def warn_damaged(what: str, path: Path, why: str, action: str) -> None:
    """The one warning line for a damaged cache file: which cache, where, what is wrong, what qloader does."""
    log.warning("%s %s: %s; %s", what, path, why, action)


def read_json_entries(
    path: Path, what: str, entry_ok: Callable[[str, object], bool], action: str
) -> tuple[dict[str, Any], bool]:
    """The entries of the cache file `path` (a JSON object) for which `entry_ok(key, entry)` holds, and whether
    the file was sound (a missing one is). Anything else, a file that is not JSON, JSON of another shape or
    a folder in its place, is one warning (`what` names the cache, `action` what happens instead); a folder is
    removed, so that the cache can be written again. Temp files of a writer that died are removed first."""
    remove_dead_json_temps(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, True
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raw, why = None, f"not readable JSON ({type(e).__name__}: {e})"
    else:
        why = None if isinstance(raw, dict) else f"a JSON {type(raw).__name__}, not an object"
    entries = {key: entry for key, entry in raw.items() if entry_ok(key, entry)} if why is None else {}
    if why is None and len(entries) < len(raw):
        bad = len(raw) - len(entries)
        why = f"{bad} malformed entr{'y' if bad == 1 else 'ies'} (damaged, or written by an older qloader)"
    if why is not None:
        if path.is_dir():
            discard(path)
        warn_damaged(what, path, why, action)
    return entries, why is None


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= set("0123456789abcdef")


def discard(path: Path) -> None:
    """Remove whatever is at `path` (a file, or a folder where a file belongs); a cache that cannot be
    cleaned only costs the next run the same warning."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def owner_tag() -> str:
    """`.pid<pid>-<start ticks>`, put in the name of a temp file or folder: a later process can tell whether
    the one that made it is still running (a reused pid has another start time)."""
    from qloader.core.processes import process_identity

    identity = process_identity()
    return f".pid{identity['pid']}-{identity['start_ticks'] or 0}"


def owner_alive(name: str) -> bool:
    """Is the process named in the temp name `name` running? True for a name that names none (unknown owner).

    An owner tag names the process exactly; a `write_json_atomic` temp names only a pid, so it counts as
    alive while any process has that pid.
    """
    import socket

    from qloader.core.processes import is_alive

    if found := _OWNER.search(name):
        pid, ticks = int(found[1]), int(found[2]) or None
    elif found := _ATOMIC_TMP.search(name):
        pid, ticks = int(found[1]), None
    else:
        return True
    return is_alive({"pid": pid, "start_ticks": ticks, "host": socket.gethostname()}) is not False


def remove_dead_json_temps(path: Path) -> list[Path]:
    """The temp files a killed `write_json_atomic(path)` left beside the cache file `path`, removed."""
    return remove_dead_temps(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"), "cache temp file(s)")


def remove_dead_temps(paths: Iterable[Path], what: str) -> list[Path]:
    """Remove the temp files and folders among `paths` whose owner process died (killed mid-write), with one
    warning naming them."""
    dead = [p for p in paths if not owner_alive(p.name)]
    for path in dead:
        discard(path)
    if dead:
        names = ", ".join(str(p) for p in dead[:4]) + (f" (and {len(dead) - 4} more)" if len(dead) > 4 else "")
        log.warning("removed %d %s left by a process that died while writing it: %s", len(dead), what, names)
    return dead
