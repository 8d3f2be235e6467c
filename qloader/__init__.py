"""qloader: load transformers models with quantization applied while loading, driven by Hydra configs."""

__version__ = "0.1.0"

from qloader.api import LoadResult, load  # noqa: E402

__all__ = ["LoadResult", "__version__", "load"]
