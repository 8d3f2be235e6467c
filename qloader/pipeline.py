"""Run the seven stages in order, measure each one from outside, and write the manifest."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qloader.errors import RunKilled
from qloader.manifest import RunManifest
from qloader.measure import measure_stage
from qloader.stages import LoadContext, stages_for


@dataclass
class LoadResult:
    model: Any
    """The loaded transformers model."""
    manifest: dict
    run_dir: Path
    checkpoint_path: Path

    def tokenizer(self):
        """The checkpoint's tokenizer (AutoTokenizer from the same folder)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.checkpoint_path)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C: the manifest records `killed` and the stage it was in."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame) -> None:
        raise RunKilled(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    *,
    choices: dict[str, str] | None = None,
    replay_of: str | None = None,
) -> LoadResult:
    """Compose -> stages -> manifest. Any failure leaves a `failed` manifest and re-raises.

    `choices` are the config-group options the run composed (model, quant, ...); `replay_of` links
    a replay to the manifest it re-runs.
    """
    manifest = RunManifest(Path(run_dir) / "manifest.json", cfg, overrides, choices, replay_of)
    ctx, current = LoadContext(cfg=cfg, overrides=tuple(overrides)), None
    with _sigterm_as_interrupt():
        manifest.begin()  # an unwritable run dir fails here, before any work
        try:
            for current, stage in stages_for(cfg):
                stats = None
                try:
                    with measure_stage(current) as stats:
                        ctx = stage(ctx)
                finally:
                    if stats is not None:
                        manifest.add_stage(stats)  # filled in on exit, also when the stage failed
        except BaseException as error:
            manifest.fail(error, current, ctx)
            raise
        return LoadResult(ctx.model, manifest.succeed(ctx), Path(run_dir), ctx.checkpoint.path)
