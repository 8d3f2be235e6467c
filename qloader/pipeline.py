"""Run the seven stages in order, measure each one from outside, and write the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

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
    manifest = RunManifest(Path(run_dir) / "manifest.json", cfg, overrides, choices, replay_of).begin()
    ctx, current = LoadContext(cfg=cfg, overrides=tuple(overrides)), None
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
