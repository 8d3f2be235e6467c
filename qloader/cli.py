"""`qloader [overrides]`: compose the config with Hydra, run the stages, print a summary."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qloader.config import CONFIG_NAME, GROUPS, config_dir
from qloader.errors import QloaderError
from qloader.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=CONFIG_NAME)
def _main(cfg: DictConfig) -> str | None:
    from qloader import pipeline, summary

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:  # a fresh process per job; failures are summed up at the end
        from qloader.sweep import run_job

        return run_job(run_dir, hydra_cfg.job.num, list(hydra_cfg.overrides.task))
    try:
        choices = {group: hydra_cfg.runtime.choices.get(group) for group in GROUPS}
        result = pipeline.run(cfg, run_dir, list(hydra_cfg.overrides.task), choices=choices)
    except QloaderError as e:
        print(f"qloader: error: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"qloader: manifest (failed): {run_dir / 'manifest.json'}", file=sys.stderr)
        sys.exit(1)
    if cfg.mode == "plan":
        from qloader.plan import render

        print(render(result.manifest["plan"]))
    elif cfg.summary:
        print(summary.render(result.manifest))


def main() -> None:
    if sys.argv[1:2] == ["replay"]:  # `qloader replay MANIFEST ...`: not a Hydra run
        from qloader.replay import main as replay_main

        sys.exit(replay_main(sys.argv[2:]))
    _main()
