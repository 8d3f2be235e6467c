"""`qloader [overrides]`: compose the config with Hydra, run the stages, print a summary."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from qloader.config import CONFIG_NAME, GROUPS, config_dir, share_config_store
from qloader.errors import OutputError, QloaderError, RunDirInUseError
from qloader.manifest import register_run_dir_resolver
from qloader.schema import register_configs

register_configs()
register_run_dir_resolver()
share_config_store()


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
    except OutputError as e:  # the manifest itself may be what could not be written
        print(f"qloader: error: {type(e).__name__}: {e}", file=sys.stderr)
        if manifest is not None and manifest.is_file() and not isinstance(e, RunDirInUseError):  # not ours
            print(f"qloader: manifest (failed): {manifest}", file=sys.stderr)
        sys.exit(1)
    except QloaderError as e:
        print(f"qloader: error: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"qloader: manifest (failed): {manifest}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        name = getattr(e, "signal_name", "SIGINT")
        print(f"qloader: killed by {name}; manifest (killed): {manifest}", file=sys.stderr)
        sys.exit(128 + signal.Signals[name].value)


def _complete_replay() -> bool:
    """`qloader replay <TAB>`: replay's options, else nothing, so the shell completes file names."""
    if not ({"-sc", "--shell-completion"} & set(sys.argv[1:])):
        return False
    words = os.environ.get("COMP_LINE", "").split()
    if words[1:2] != ["replay"]:
        return False
    current = "" if os.environ.get("COMP_LINE", "").endswith(" ") else words[-1]
    if current.startswith("-"):
        from qloader.replay import parser

        options = [o for action in parser()._actions for o in action.option_strings if o.startswith("--")]
        options.sort(key=lambda option: option == "--help")  # replay's own options first, as in its usage line
        print(" ".join(option for option in options if option.startswith(current)))
    return True


def main() -> None:
    if sys.argv[1:2] == ["replay"]:  # `qloader replay MANIFEST ...`: not a Hydra run
        from qloader.replay import main as replay_main

        sys.exit(replay_main(sys.argv[2:]))
    if _complete_replay():
        return
    # Composition errors (a misspelt key, a value outside a choice) reach this function instead of
    # Hydra's multi-line report, so they print as one line; a user who sets HYDRA_FULL_ERROR keeps Hydra's.
    user_wants_hydra_report = "HYDRA_FULL_ERROR" in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _main()
    except KeyboardInterrupt as interrupt:  # a sweep's launcher, or Hydra before a run: one line, no traceback
        from qloader.sweep import end_interrupted_sweep

        sys.exit(end_interrupted_sweep(interrupt))
    except HydraException as e:
        if user_wants_hydra_report:
            raise
        from qloader.config import composition_error

        print(f"qloader: error: ConfigError: {composition_error(e)}", file=sys.stderr)
        sys.exit(1)
