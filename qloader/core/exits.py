"""How a run ends for the shell: one line on stderr and the exit code (1 failed, 128 + signal when killed)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qloader.core.errors import OutputError, QloaderError, RunDirInUseError
from qloader.core.interrupts import exit_code, signal_name


def recorded_status(manifest: Path) -> str | None:
    """The status a manifest file holds now; None if there is none to read."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    return data.get("status") if isinstance(data, dict) else None


@contextmanager
def exit_on_failure(manifest: Path | None) -> Iterator[None]:
    """A failed run exits 1 with one line naming the error; a killed one exits 130 (SIGINT) or 143 (SIGTERM)."""
    try:
        yield
    except OutputError as e:  # the manifest itself may be what could not be written
        print(f"qloader: error: {type(e).__name__}: {e}", file=sys.stderr)
        status = None if manifest is None or isinstance(e, RunDirInUseError) else recorded_status(manifest)  # ours?
        if status in ("failed", "killed"):  # not `running`: a record that could not be updated is not pointed at
            print(f"qloader: manifest ({status}): {manifest}", file=sys.stderr)
        sys.exit(1)
    except QloaderError as e:
        print(f"qloader: error: {type(e).__name__}: {e}", file=sys.stderr)
        if manifest is not None:  # None: refused before any run dir was written
            print(f"qloader: manifest (failed): {manifest}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        print(f"qloader: killed by {signal_name(e)}; manifest (killed): {manifest}", file=sys.stderr)
        sys.exit(exit_code(e))
