"""Lock files that name their owner: one writer per output folder, refused up front rather than after a load.

A lock is a JSON file created exclusively beside the folder it guards (`<dir>.lock`), holding the owner's pid
and start time (`qloader.core.cache.owner_tag`), so that a lock left by a process that died (kill -9, the OOM
killer) is recognised and taken over, with one warning, instead of blocking that folder forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from qloader.core.cache import owner_alive, owner_tag
from qloader.core.errors import OutputError
from qloader.core.files import write_json_atomic

log = logging.getLogger("qloader")


class OwnerLock:
    """An exclusive lock file for `guarded`; `what` names the setting in messages (`save.dir`), `fix` the way out."""

    def __init__(self, guarded: Path, what: str, fix: str):
        self.guarded, self.what, self.fix = guarded, what, fix
        self.path = guarded.with_name(f"{guarded.name}.lock")
        self.token: str | None = None
        self._made: list[Path] = []

    def acquire(self) -> OwnerLock:
        """Take the lock, or raise OutputError naming the live owner; a dead owner's lock is taken over."""
        try:
            self._made = _make_parents(self.path.parent)
        except OSError as e:
            where = f"{self.what} '{self.guarded}'"
            raise OutputError(f"{where}: cannot create {self.path.parent} ({e}); {self.fix}") from e
        record = {
            "pid": os.getpid(),
            "owner": owner_tag(),
            "host": socket.gethostname(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }
        try:
            with _directory_locked(self.path.parent):  # one qloader process at a time checks and takes it
                self._take(record)
        except BaseException:
            self._remove_made()
            raise
        self.token = record["token"]
        return self

    def _take(self, record: dict) -> None:
        for _ in range(3):  # the owner may release it between our create and our read: then create again
            try:
                write_json_atomic(self.path, record, exclusive=True)
                return
            except FileExistsError:
                pass
            except OSError as e:
                raise OutputError(f"{self._cannot('create', e)}; choose another {self.what}") from e
            try:
                holder = _read_record(self.path)
            except FileNotFoundError:
                continue
            if holder is not None and _alive(holder):
                raise OutputError(
                    f"{self.what} '{self.guarded}' is being written by another run (pid {holder['pid']}"
                    f"{_where(holder)}, started {holder.get('started_at')}; lock file {self.path}); {self.fix}"
                )
            who = "a damaged lock" if holder is None else f"the lock of pid {holder['pid']}, a run that died"
            log.warning("%s '%s': taking over %s (%s)", self.what, self.guarded, who, self.path)
            try:
                self.path.unlink(missing_ok=True)
            except OSError as e:
                raise OutputError(f"{self._cannot('remove', e)}; delete it, or choose another {self.what}") from e
        raise OutputError(f"{self.what} '{self.guarded}': its lock file {self.path} keeps changing; {self.fix}")

    def _cannot(self, verb: str, error: OSError) -> str:
        return f"{self.what} '{self.guarded}': cannot {verb} its lock file {self.path} ({error})"

    def release(self) -> None:
        """Remove the lock file if it is still this lock's (and the parent folders `acquire` made, if empty)."""
        if self.token is None:
            return
        try:
            holder = _read_record(self.path)
        except FileNotFoundError:
            holder = None
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.token = None
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if nothing was written into it
        self._made = []

    def __enter__(self) -> OwnerLock:
        return self.acquire() if self.token is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first), so that a refused run leaves none."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by another process meanwhile: not ours to remove
            folder.mkdir()
            made.append(folder)
    return made


@contextlib.contextmanager
def _directory_locked(folder: Path) -> Iterator[None]:
    """flock on the folder itself: checking a lock file and replacing a dead owner's is one step."""
    try:
        fd: int | None = os.open(folder, os.O_RDONLY)
    except OSError:
        fd = None  # a folder that cannot be opened: the exclusive create alone decides
    try:
        if fd is not None:
            with contextlib.suppress(OSError):  # a file system without flock: the exclusive create still decides
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _read_record(path: Path) -> dict | None:
    """The lock file's record; None if it is unreadable or not a record (a damaged lock). FileNotFoundError
    passes through: the lock was released meanwhile."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("owner"), str):
        return None
    return record if isinstance(record.get("pid"), int) else None


def _alive(holder: dict) -> bool:
    """Is the owner running? A lock from another host cannot be checked here, so it counts as held."""
    if holder.get("host") != socket.gethostname():
        return True
    return owner_alive(holder["owner"])


def _where(holder: dict) -> str:
    """' on host X, which this host cannot check: delete the lock file if that run is gone' for another host's."""
    host = holder.get("host")
    if host == socket.gethostname():
        return ""
    return f" on host {host}, which this host cannot check: delete the lock file if that run is gone"
