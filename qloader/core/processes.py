"""Which process owns a record, and whether it still runs: pid, start time and boot, because pids are reused."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (`/proc/PID/stat` field 22); None if gone or no /proc."""
    try:
        after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the `(comm)` field come field 3 (state) onwards: field 22 is index 19
    return None if after_name[0] in ("Z", "X") else int(after_name[19])


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_identity(pid: int | None = None) -> dict:
    """`{pid, start_ticks, boot_id, host}` of `pid` (default: this process), as recorded in manifests."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start_ticks": _start_ticks(pid), "boot_id": _boot_id(), "host": socket.gethostname()}


def is_alive(identity: object) -> bool | None:
    """Does the process `identity` names still run? None when this host cannot tell (another host, a malformed
    identity): a record on a shared file system is only settled where its process ran."""
    if not isinstance(identity, dict) or not isinstance(identity.get("pid"), int) or identity["pid"] <= 0:
        return None
    if identity.get("host") != socket.gethostname():
        return None
    if identity.get("boot_id") is not None and identity.get("boot_id") != _boot_id():
        return False  # this host rebooted since: every process of that boot is gone
    ticks = _start_ticks(identity["pid"])
    if ticks is None and _boot_id() is None:  # no /proc: ask the kernel about the pid alone
        try:
            os.kill(identity["pid"], 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    recorded = identity.get("start_ticks")
    return ticks is not None and (recorded is None or ticks == recorded)
