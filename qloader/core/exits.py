"""How a run ends for the shell: one line on stderr and the exit code (1 failed, 3 a plan that does not fit,
128 + signal when killed)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qloader.core.errors import OutputError, QloaderError, RunDirInUseError
from qloader.core.interrupts import exit_code, signal_name

FAILED = 1
"""The run failed: a config, an input or the host refused it (one line on stderr, a `failed` manifest)."""
PLAN_DOES_NOT_FIT = 3
"""`mode=plan` ran and its plan does not fit the budgets (`plan.fits: false`): a check scripts can use."""


def plan_exit_code(fits: bool) -> int:
    """0 when the plan fits, else PLAN_DOES_NOT_FIT: distinct from a failed run (1)."""
    return 0 if fits else PLAN_DOES_NOT_FIT


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
        sys.exit(FAILED)
    except QloaderError as e:
        print(f"qloader: error: {type(e).__name__}: {e}", file=sys.stderr)
        if manifest is not None:  # None: refused before any run dir was written
            print(f"qloader: manifest (failed): {manifest}", file=sys.stderr)
        sys.exit(FAILED)
    except KeyboardInterrupt as e:
        print(f"qloader: killed by {signal_name(e)}; manifest (killed): {manifest}", file=sys.stderr)
        sys.exit(exit_code(e))
