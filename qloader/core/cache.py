"""Where qloader keeps what it builds once per machine (converted models, hashes, kernels, references)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$QLOADER_CACHE`, else `$XDG_CACHE_HOME/qloader`, else `~/.cache/qloader`."""
    if env := os.environ.get("QLOADER_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qloader"
