"""The Python API: the same pipeline as the CLI, for notebooks and tests."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from qloader.config import compose_with_choices
from qloader.pipeline import LoadResult, run


def load(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> LoadResult:
    """Load a model as `qloader <overrides>` would; the manifest goes to `run_dir/manifest.json`.

    >>> result = load(["model=tiny-llama", "quant=bnb-nf4"], run_dir="outputs/api")
    >>> result.model, result.manifest["stages"]
    """
    cfg, choices = compose_with_choices(overrides)
    if run_dir is None:
        run_dir = Path("outputs") / "api" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    return run(cfg, Path(run_dir), list(overrides), choices=choices)


__all__ = ["LoadResult", "load"]
