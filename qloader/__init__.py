"""qloader: load transformers models with quantization applied while loading, driven by Hydra configs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qloader import _legacy

__version__ = "0.1.0"

_legacy.install()  # module paths that earlier manifests and `.hydra/` records name

if TYPE_CHECKING:
    from qloader.api import LoadResult, load


def __getattr__(name: str) -> Any:
    """`qloader.load` and `qloader.LoadResult` import the pipeline on first use (PEP 562), so that
    `qloader --help`, shell completion and `qloader-report` start without it."""
    if name in ("load", "LoadResult"):
        from qloader import api

        return getattr(api, name)
    raise AttributeError(f"module 'qloader' has no attribute {name!r}")


__all__ = ["LoadResult", "__version__", "load"]
