"""The Python API: the same pipeline as the CLI, for notebooks and tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qloader.config.compose import compose_with_choices
from qloader.runs.manifest import new_run_dir
from qloader.runs.pipeline import LoadResult, run


def load(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> LoadResult:
    """Load a model as `qloader <overrides>` would; the manifest goes to `run_dir/manifest.json`.

    A `run_dir` that already holds a manifest is refused (OutputError): one run dir, one record.
    Without one, a new `outputs/api/DATE/HH-MM-SS-PID` is created.

    >>> result = load(["model=tiny-llama", "quant=bnb-nf4"], run_dir="outputs/api")
    >>> result.model, result.manifest["stages"]
    >>> result.save("checkpoints/tiny-nf4")   # the weights as loaded, before any forward pass
    """
    cfg, choices = compose_with_choices(overrides)
    run_dir = new_run_dir(Path("outputs") / "api") if run_dir is None else Path(run_dir)
    return run(cfg, run_dir, list(overrides), choices=choices)


__all__ = ["LoadResult", "load"]
