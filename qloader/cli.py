"""`qloader [overrides]`: compose the config with Hydra, run the stages, print a summary."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from qloader.config.compose import CONFIG_NAME, GROUPS, config_dir, share_config_store, with_device_budgets
from qloader.config.schema import register_configs
from qloader.core.errors import OutputError
from qloader.core.exits import exit_on_failure
from qloader.runs.manifest import register_run_dir_resolver
from qloader.runs.slurm import register_resolver as register_gpus_resolver

register_configs()
register_run_dir_resolver()
register_gpus_resolver()
share_config_store()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=CONFIG_NAME)
def _main(cfg: DictConfig) -> str | None:
    from qloader.runs import pipeline, summary

    CheckRunDir.pending = None  # Hydra has written the run dir's records
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:  # a fresh process per job; failures are summed up at the end
        from qloader.runs.sweep import run_job

        overrides, sweep_dir = list(hydra_cfg.overrides.task), Path(hydra_cfg.sweep.dir)
        return run_job(run_dir, hydra_cfg.job.num, overrides, sweep_dir, resume=cfg.sweep.resume)
    with exit_on_failure(run_dir / "manifest.json"):
        choices = {group: hydra_cfg.runtime.choices.get(group) for group in GROUPS}
        result = pipeline.run(cfg, run_dir, list(hydra_cfg.overrides.task), choices=choices)
    if cfg.mode == "plan":
        from qloader.core.exits import plan_exit_code
        from qloader.measure.plan import render

        print(render(result.manifest["plan"]))
        if code := plan_exit_code(result.manifest["plan"]["fits"]):
            sys.exit(code)
    elif cfg.summary:
        print(summary.render(result.manifest))


class CheckRunDir(Callback):
    """Before Hydra writes the run (or sweep) dir: an unwritable one, or one that holds another run's records, is
    one clear line, not a traceback or a record written over (Hydra saves `.hydra/` before the run begins)."""

    pending: dict | None = None
    """The single run whose records Hydra is writing, until its task begins: what to undo if that write fails."""

    def _check(self, path: str) -> None:
        from qloader.core.files import check_writable_dir

        with exit_on_failure(None):
            check_writable_dir(Path(path).absolute(), "run dir")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from qloader.core.files import existing_ancestor
        from qloader.runs.manifest import claim_run_dir

        CheckRunDir.pending = None
        self._check(config.hydra.run.dir)
        run_dir = Path(config.hydra.run.dir).absolute()
        kept = existing_ancestor(run_dir)
        with exit_on_failure(None):
            claim_run_dir(run_dir, config.hydra.output_subdir)
        CheckRunDir.pending = {"config": config, "run_dir": run_dir, "kept": kept}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from qloader.runs.sweep import claim_sweep_dir

        CheckRunDir.pending = None
        self._check(config.hydra.sweep.dir)
        with exit_on_failure(None):
            claim_sweep_dir(config)


def _run_dir_not_written(error: OSError) -> int:
    """Hydra could not write the run dir's records (a full disk): one OutputError line, a `failed` manifest if one
    can still be written, and no empty leftovers; the exit code."""
    import copy

    from omegaconf import open_dict, read_write

    from qloader.runs.manifest import record_unstarted_run, release_run_dir

    pending, CheckRunDir.pending = CheckRunDir.pending, None
    config, run_dir = pending["config"], pending["run_dir"]
    failure = OutputError(
        f"run dir '{run_dir}' cannot be written: {error.strerror or error}; free some space or choose another "
        "run dir (hydra.run.dir=...)"
    )
    recorded = False
    try:
        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        choices = {group: config.hydra.runtime.choices.get(group) for group in GROUPS}
        recorded = record_unstarted_run(run_dir, task, list(config.hydra.overrides.task), choices, failure)
    except Exception:  # the config cannot be recorded either: the line below still says what failed
        pass
    release_run_dir(run_dir, config.hydra.output_subdir, pending["kept"])
    print(f"qloader: error: OutputError: {failure}", file=sys.stderr)
    if recorded:
        print(f"qloader: manifest (failed): {run_dir / 'manifest.json'}", file=sys.stderr)
    return 1


def _complete_replay() -> bool:
    """`qloader replay <TAB>`: replay's options, else nothing, so the shell completes file names."""
    if not ({"-sc", "--shell-completion"} & set(sys.argv[1:])):
        return False
    words = os.environ.get("COMP_LINE", "").split()
    if words[1:2] != ["replay"]:
        return False
    current = "" if os.environ.get("COMP_LINE", "").endswith(" ") else words[-1]
    if current.startswith("-"):
        from qloader.runs.replay import parser

        options = [o for action in parser()._actions for o in action.option_strings if o.startswith("--")]
        options.sort(key=lambda option: option == "--help")  # replay's own options first, as in its usage line
        print(" ".join(option for option in options if option.startswith(current)))
    return True


def main() -> None:
    if sys.argv[1:2] == ["replay"]:  # `qloader replay MANIFEST ...`: not a Hydra run
        from qloader.runs.replay import main as replay_main

        sys.exit(replay_main(sys.argv[2:]))
    if sys.argv[1:2] == ["cache"]:  # `qloader cache list|clear`: the quantized-weights cache, no torch
        from qloader.runs.cache_command import main as cache_main

        sys.exit(cache_main(sys.argv[2:]))
    if _complete_replay():
        return
    # Composition errors (a misspelt key, a value outside a choice) reach this function instead of
    # Hydra's multi-line report, so they print as one line; a user who sets HYDRA_FULL_ERROR keeps Hydra's.
    user_wants_hydra_report = "HYDRA_FULL_ERROR" in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _run_hydra(user_wants_hydra_report)
    finally:
        if not user_wants_hydra_report:  # `main` may run again in this process (tests, notebooks)
            os.environ.pop("HYDRA_FULL_ERROR", None)


def _run_hydra(user_wants_hydra_report: bool) -> None:
    sys.argv[1:] = with_device_budgets(sys.argv[1:])  # device_map.max_memory.N=SIZE for any N, no `+`
    try:
        _main()
    except KeyboardInterrupt as interrupt:  # a sweep's launcher, or Hydra before a run: one line, no traceback
        from qloader.runs.sweep import end_interrupted_sweep

        sys.exit(end_interrupted_sweep(interrupt))
    except HydraException as e:
        if user_wants_hydra_report:
            raise
        from qloader.config.compose import composition_error

        print(f"qloader: error: ConfigError: {composition_error(e)}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:
        if CheckRunDir.pending is not None:  # Hydra writing the run dir's `.hydra/` or log (a full disk)
            sys.exit(_run_dir_not_written(error))
        _end_broken_sweep_or_raise(error)
    except Exception as error:
        _end_broken_sweep_or_raise(error)


def _end_broken_sweep_or_raise(error: Exception) -> None:
    """A sweep whose launcher failed (a joblib worker killed) still settles its jobs and writes its summary."""
    from qloader.runs.sweep import SweepSummary, end_broken_sweep

    if SweepSummary.active_sweep_dir is None:
        raise error
    sys.exit(end_broken_sweep(error))
