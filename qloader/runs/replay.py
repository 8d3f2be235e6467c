"""`qloader replay MANIFEST [--check-only]`: re-run a past run exactly, and say what differs.

The config comes from the manifest's resolved config, never from today's conf/ defaults. The
run's inputs (checkpoint files), environment (library versions, hardware), config hash and
weights fingerprint are compared with the record. The exit code is 1 when the config, the inputs
or the weights fingerprint differ; library or hardware drift alone is reported but not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from qloader.config.compose import GROUPS
from qloader.core.errors import CheckpointError, ConfigError, OutputError, QloaderError
from qloader.runs.manifest import run_dir_stamp

HUB_SOURCE = "qloader.checkpoint.sources.hub_checkpoint"
RELATIVE_PATHS = ("model.path", "save.dir", "device_map.offload_folder")
"""Config fields that may hold a path relative to the directory the run started in."""


def _settings_added_since() -> dict:
    """Settings newer than some manifests, at their schema defaults: a replay of an older run takes them."""
    from dataclasses import asdict

    from qloader.config.schema import DeviceMapConfig, ModelConfig, ValidateConfig

    return {
        "validate": asdict(ValidateConfig()),
        "model": {
            "allow_pickle": ModelConfig.allow_pickle,
            "trust_remote_code": ModelConfig.trust_remote_code,
            "task": ModelConfig.task.value,
        },
        "device_map": {"offload_folder": DeviceMapConfig.offload_folder},
    }


@dataclass(frozen=True)
class Comparison:
    item: str
    recorded: object
    now: object
    decisive: bool
    """The config, inputs and the fingerprint decide the exit code; environment drift is only reported."""

    @property
    def equal(self) -> bool:
        return self.recorded == self.now


# ---------------------------------------------------------------- reading the record


def read_manifest(path: Path) -> dict:
    """The manifest as a dict, or one ConfigError line saying why it is not one; a run whose process died is
    recorded `killed` first (`settle_if_orphaned`)."""
    from qloader.runs.manifest import settle_if_orphaned

    try:
        recorded = settle_if_orphaned(path)
    except json.JSONDecodeError as e:
        raise ConfigError([f"'{path}' is not JSON ({e}); give the manifest.json of a qloader run dir"]) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"'{path}' cannot be read ({e}); give the manifest.json of a qloader run dir"]) from e
    needed = ("config", "config_hash", "overrides", "versions", "hardware")
    if not isinstance(recorded, dict) or (absent := [key for key in needed if key not in recorded]):
        what = f"has no {', '.join(absent)}" if isinstance(recorded, dict) else "is not a JSON object"
        raise ConfigError([f"'{path}' {what}; it is not a qloader run manifest"])
    if not isinstance(recorded["config"], dict):
        raise ConfigError([f"'{path}': config is not a mapping; the manifest was edited or is damaged"])
    if groups := [g for g in GROUPS if not isinstance(recorded["config"].get(g), dict)]:
        raise ConfigError(
            [
                f"'{path}': the recorded config has no {', '.join(groups)} section(s); the manifest was edited or is "
                "incomplete, so the run cannot be rebuilt from it"
            ]
        )
    return recorded


def rebuild_config(recorded: dict, manifest_path: Path):
    """The run's config, typed by today's schemas: the recorded group options composed, the recorded values on top.

    Settings added since the run take their defaults. A recorded value of the wrong type and a group option
    that no longer exists are ConfigErrors naming the field; a key no schema declares is refused in `resolve`.
    """
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from qloader.config.compose import composition_error, omegaconf_error, typed_config

    choices = recorded.get("choices") or {}
    if any(not choices.get(group) for group in GROUPS):  # an older record: no group options to type it by
        return OmegaConf.merge(_settings_added_since(), recorded["config"])
    try:
        return typed_config(recorded["config"], choices)
    except HydraException as e:  # an option deleted from conf/ since
        raise ConfigError([f"'{manifest_path}': recorded choices {choices}: {composition_error(e)}"]) from e
    except OmegaConfBaseException as e:
        raise ConfigError([f"'{manifest_path}': recorded config: {omegaconf_error(e)}"]) from e


def _projection(config: object, shape: object) -> object:
    """`config` limited to the keys `shape` has: settings added since a run do not count as a changed config."""
    if not isinstance(config, dict) or not isinstance(shape, dict):
        return config
    return {key: _projection(config[key], shape[key]) for key in shape if key in config}


def rebuilt_hash(cfg, recorded: dict) -> str:
    from qloader.runs.manifest import config_hash, resolved_config

    return config_hash(_projection(resolved_config(cfg), recorded["config"]))


# ---------------------------------------------------------------- comparing


def _file_row(name: str, recorded: dict | None, now: dict | None) -> Comparison:
    """Size and sha256; a plan-mode record hashed nothing, so only sizes compare."""
    hashed = all(f is not None and f.get("sha256") for f in (recorded, now))

    def show(f: dict | None) -> str:
        if f is None:
            return "missing"
        return f"{f['size']} bytes, sha256 {f['sha256'][:12]}" if hashed else f"{f['size']} bytes (not hashed)"

    return Comparison(f"checkpoint file {name}", show(recorded), show(now), decisive=True)


def compare_inputs(recorded: dict, files_now: list[dict]) -> list[Comparison]:
    before = {f["name"]: f for f in recorded["checkpoint"]["files"]}
    now = {f["name"]: f for f in files_now}
    return [_file_row(n, before.get(n), now.get(n)) for n in sorted(before.keys() | now.keys())]


def compare_environment(recorded: dict, versions: dict, hardware: dict) -> list[Comparison]:
    rows = [
        Comparison(f"{name} version", recorded["versions"].get(name), versions.get(name), False) for name in versions
    ]
    for key in ("cpu_model", "cpu_cores", "ram_bytes", "gpus"):
        rows.append(Comparison(f"hardware {key}", recorded["hardware"].get(key), hardware.get(key), False))
    return rows


def _current_files(recorded: dict, rehash: bool = False) -> list[dict]:
    """The recorded files as they are now; `rehash` reads every byte instead of trusting the hash cache."""
    from qloader.checkpoint.reader import default_hash_cache

    folder = Path(recorded["checkpoint"]["path"])
    if not folder.is_dir():
        raise CheckpointError(f"the recorded checkpoint '{folder}' does not exist any more")
    hashes = default_hash_cache(trust=not rehash)
    names = [f["name"] for f in recorded["checkpoint"]["files"]]
    files = [
        {"name": n, "size": (folder / n).stat().st_size, "sha256": hashes.sha256(folder / n)}
        for n in names
        if (folder / n).is_file()
    ]
    hashes.save()
    return files


def render(rows: list[Comparison]) -> str:
    width = max(len(r.item) for r in rows)
    lines = [f"{'item':<{width}}  {'recorded':<40}  {'now':<40}  result"]
    for r in rows:
        verdict = "equal" if r.equal else ("DIFFERENT" if r.decisive else "different (environment)")
        lines.append(f"{r.item:<{width}}  {str(r.recorded)[:40]:<40}  {str(r.now)[:40]:<40}  {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------- re-running


@dataclass(frozen=True)
class ReplayOptions:
    run_dir: Path | None = None
    save_dir: Path | None = None
    """Write the recorded run's checkpoint here instead of its own save.dir (which exists by now)."""
    no_save: bool = False
    rehash: bool = False
    """Hash every input file afresh (model.verify_hashes=true), not from the hash cache."""


@contextmanager
def _started_in(cwd: str | None, cfg) -> Iterator[None]:
    """Run where the recorded run started, so the config's relative paths mean what they meant then."""
    from omegaconf import OmegaConf

    relative = [key for key in RELATIVE_PATHS if (v := OmegaConf.select(cfg, key)) and not Path(str(v)).is_absolute()]
    if not relative or cwd is None:
        yield
        return
    if not Path(cwd).is_dir():
        raise ConfigError(
            [f"{', '.join(relative)} are relative to '{cwd}', where the run started, which no longer exists"]
        )
    before = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


def _apply_options(cfg, recorded: dict, options: ReplayOptions) -> None:
    """--save-dir / --no-save, and a hub checkpoint pinned to the commit the run resolved."""
    from omegaconf import open_dict

    with open_dict(cfg):
        if options.rehash:
            cfg.model.verify_hashes = True
        if options.no_save:
            cfg.save.enabled = False
        elif options.save_dir is not None:
            cfg.save.dir = str(options.save_dir.absolute())
        elif cfg.save.get("enabled") and cfg.save.get("dir"):
            target = Path(recorded.get("cwd") or ".") / str(cfg.save.dir)
            if target.exists() and (not target.is_dir() or any(target.iterdir())):
                raise ConfigError(
                    [
                        f"the recorded run saved its checkpoint to save.dir '{target}', which exists now; "
                        "replay with --save-dir NEW_DIR, or --no-save to skip the save"
                    ]
                )
        hub = (recorded.get("checkpoint") or {}).get("hub")
        if cfg.model.get("_target_") == HUB_SOURCE and hub and hub.get("commit"):
            cfg.model.revision = hub["commit"]


def replay(manifest_path: Path, options: ReplayOptions, check_only: bool) -> tuple[list[Comparison], dict | None]:
    """The comparison rows, and the new manifest (None with check_only)."""
    from qloader.measure import environment
    from qloader.runs.manifest import config_hash

    recorded = read_manifest(manifest_path)
    cfg = rebuild_config(recorded, manifest_path)
    if recorded.get("checkpoint") is None:
        raise CheckpointError(f"{manifest_path}: the recorded run never resolved a checkpoint; nothing to replay")
    if check_only:
        rows = [Comparison("config_hash", recorded["config_hash"], config_hash(recorded["config"]), True)]
        rows += compare_inputs(recorded, _current_files(recorded, options.rehash))
        return rows + compare_environment(recorded, environment.versions(), environment.hardware()), None
    from qloader.runs import pipeline

    rebuilt = rebuilt_hash(cfg, recorded)
    _apply_options(cfg, recorded, options)
    from qloader.runs.manifest import new_run_dir

    run_dir = options.run_dir or new_run_dir(Path.cwd() / "outputs" / "replay")  # unique, created here
    choices = recorded.get("choices") or {}
    with _started_in(recorded.get("cwd"), cfg):
        result = pipeline.run(
            cfg, run_dir, recorded["overrides"], choices=choices, replay_of=str(manifest_path.resolve())
        )
    now = result.manifest
    rows = [Comparison("config_hash", recorded["config_hash"], rebuilt, True)]
    rows += compare_inputs(recorded, now["checkpoint"]["files"])
    rows += compare_environment(recorded, now["versions"], now["hardware"])
    fingerprint = recorded.get("weights_fingerprint")  # None: a plan, or validate.fingerprint=false
    rows.append(Comparison("weights_fingerprint", fingerprint, now["weights_fingerprint"], fingerprint is not None))
    return rows, now


# ---------------------------------------------------------------- experiments


def experiment_yaml(manifest: dict) -> str:
    """An experiment config (`+experiment=NAME`) that reproduces the run: its choices, then its values."""
    header = "# @package _global_\n# Reproduces the run recorded in a qloader manifest.\n"
    body = {"defaults": [{f"override /{g}": c} for g, c in manifest["choices"].items()], **manifest["config"]}
    return header + yaml.safe_dump(body, sort_keys=False)


def experiment_target(name_or_path: str) -> tuple[Path, str]:
    """Where `--write-experiment` writes, and the exact command that runs the experiment.

    A bare NAME goes to the experiment folder of the config dir qloader reads (`+experiment=NAME`);
    a path must lie in a folder named `experiment`, the group Hydra looks in.
    """
    from qloader.config.compose import config_dir

    own = config_dir() / "experiment"
    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")):
        return own / f"{name_or_path}.yaml", f"qloader +experiment={name_or_path}"
    path = Path(name_or_path).absolute()
    if path.suffix == ".yml":
        raise OutputError(
            f"--write-experiment '{name_or_path}': Hydra reads an experiment from NAME.yaml only; name it "
            f"{path.with_suffix('.yaml').name}"
        )
    if path.suffix != ".yaml":  # what +experiment=NAME looks for
        path = path.with_name(f"{path.name}.yaml")
    if not path.parent.is_dir():
        raise OutputError(
            f"--write-experiment '{name_or_path}': folder '{path.parent}' does not exist; create it, or give a NAME "
            f"to write {own}/NAME.yaml"
        )
    if path.parent.resolve() == own.resolve():
        return path, f"qloader +experiment={path.stem}"
    if path.parent.name != "experiment":
        raise OutputError(
            f"--write-experiment '{name_or_path}': Hydra finds +experiment=NAME only in a folder named 'experiment'; "
            f"write into DIR/experiment/, or give a NAME to write {own}/NAME.yaml"
        )
    return path, f"qloader --config-dir {path.parent.parent} +experiment={path.stem}"


def write_experiment(manifest_path: Path, name_or_path: str) -> str:
    """Write the experiment; returns the command that runs it."""
    recorded = read_manifest(manifest_path)
    if any(not (recorded.get("choices") or {}).get(group) for group in GROUPS):
        raise ConfigError(
            [
                f"'{manifest_path}' records no config-group choices, so an experiment cannot name its groups; "
                f"write it from the manifest of the original run (replay_of: {recorded.get('replay_of')})"
            ]
        )
    path, command = experiment_target(name_or_path)
    if path.exists():
        raise OutputError(f"--write-experiment: '{path}' exists; choose another name")
    try:
        path.write_text(experiment_yaml(recorded))
    except OSError as e:
        raise OutputError(f"--write-experiment: cannot write '{path}': {e.strerror or e}") from e
    return f"wrote {path}\nrun it with: {command}"


# ---------------------------------------------------------------- the command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qloader replay", description=__doc__.splitlines()[0])
    p.add_argument("manifest", type=Path, help="a run's manifest.json, or its run dir")
    p.add_argument("--check-only", action="store_true", help="compare config, inputs and environment; load nothing")
    p.add_argument("--run-dir", type=Path, help="where the replay writes (default outputs/replay/DATE/TIME-PID)")
    save = p.add_mutually_exclusive_group()
    save.add_argument("--save-dir", type=Path, metavar="DIR", help="save the checkpoint here, not to its save.dir")
    save.add_argument("--no-save", action="store_true", help="skip the save of a run that saved a checkpoint")
    p.add_argument("--rehash", action="store_true", help="hash every input file afresh, not from the hash cache")
    p.add_argument(
        "--write-experiment",
        metavar="NAME|PATH",
        help="write the run as an experiment: NAME goes to conf/experiment/NAME.yaml (qloader +experiment=NAME)",
    )
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.manifest.is_dir() and (args.manifest / "manifest.json").is_file():  # a run dir: its manifest
        args.manifest = args.manifest / "manifest.json"
    elif args.manifest.is_dir():
        parser().error(
            f"'{args.manifest}' is a directory with no manifest.json; give a run's manifest.json (or its run dir)"
        )
    if not args.manifest.is_file():
        parser().error(f"manifest '{args.manifest}' does not exist")
    run_dir = (args.run_dir or run_dir_stamp(Path("outputs") / "replay")).absolute()
    options = ReplayOptions(run_dir, args.save_dir, args.no_save, args.rehash)
    try:
        if args.write_experiment:
            print(write_experiment(args.manifest, args.write_experiment))
            return 0
        rows, now = replay(args.manifest, options, args.check_only)
    except QloaderError as e:
        print(f"qloader: error: {type(e).__name__}: {e}", file=sys.stderr)
        if (run_dir / "manifest.json").is_file():
            print(f"qloader: manifest (failed): {run_dir / 'manifest.json'}", file=sys.stderr)
        return 1
    print(render(rows))
    differing = [r.item for r in rows if r.decisive and not r.equal]
    if now is not None:
        print(f"\nnew manifest: {now['run_dir']}/manifest.json (replay_of {args.manifest})")
    if differing:
        print(f"qloader: replay differs: {', '.join(differing)}", file=sys.stderr)
        return 1
    return 0
