"""`qloader [overrides]`: compose the config with Hydra, run the stages, print a summary."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from qloader.config import CONFIG_NAME, GROUPS, config_dir
from qloader.errors import OutputError, QloaderError
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
    with exit_on_failure(run_dir / "manifest.json"):
        choices = {group: hydra_cfg.runtime.choices.get(group) for group in GROUPS}
        result = pipeline.run(cfg, run_dir, list(hydra_cfg.overrides.task), choices=choices)
    if cfg.mode == "plan":
        from qloader.plan import render

        print(render(result.manifest["plan"]))
    elif cfg.summary:
        print(summary.render(result.manifest))


class CheckRunDir(Callback):
    """Before Hydra creates the run (or sweep) dir: an unwritable one is one clear line, not a traceback."""

    def _check(self, path: str) -> None:
        from qloader.manifest import check_output_dir

        with exit_on_failure(None):
            check_output_dir(Path(path).absolute())

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)


@contextmanager
def exit_on_failure(manifest: Path | None) -> Iterator[None]:
    """A failed run exits 1 with one line naming the error; a killed one exits 130 (SIGINT) or 143 (SIGTERM)."""
    try:
        yield
    except OutputError as e:  # no manifest could be written
        print(f"qloader: error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    except QloaderError as e:
        print(f"qloader: error: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"qloader: manifest (failed): {manifest}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        name = getattr(e, "signal_name", "SIGINT")
        print(f"qloader: killed by {name}; manifest (killed): {manifest}", file=sys.stderr)
        sys.exit(128 + signal.Signals[name].value)


def main() -> None:
    if sys.argv[1:2] == ["replay"]:  # `qloader replay MANIFEST ...`: not a Hydra run
        from qloader.replay import main as replay_main

        sys.exit(replay_main(sys.argv[2:]))
    _main()
