"""Folders and files qloader creates get the modes the user's umask gives, like `mkdir` and `open` do.

`tempfile.mkdtemp` and `mkstemp` create 0700 / 0600 whatever the umask, and a folder built under a
temp name keeps that mode after its rename: a shared cache or a saved checkpoint would then be
private to whoever made it first. Each such temp folder is opened up before it is renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """This process's umask, read from /proc (no race with other threads), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(tree: Path) -> None:
    """Give `tree` and everything in it the mode a plain mkdir / open would: 0777 or 0666 minus the umask."""
    mask = current_umask()
    os.chmod(tree, 0o777 & ~mask)
    for root, dirs, files in os.walk(tree):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
