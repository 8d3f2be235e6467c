"""`qloader replay MANIFEST [--check-only]`: re-run a past run exactly, and say what differs.

The config comes from the manifest's resolved config, never from today's conf/ defaults. The
run's inputs (checkpoint files), environment (library versions, hardware), config hash and
weights fingerprint are compared with the record. The exit code is 1 when the inputs or the
weights fingerprint differ; library or hardware drift alone is reported but not fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from qloader import environment
from qloader.checkpoint import default_hash_cache
from qloader.errors import CheckpointError, QloaderError


def _settings_added_since() -> dict:
    """Settings newer than some manifests, at their schema defaults: a replay of an older run takes them."""
    from dataclasses import asdict

    from qloader.schema import DeviceMapConfig, ModelConfig, ValidateConfig

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
    """Inputs and the fingerprint decide the exit code; environment drift is only reported."""

    @property
    def equal(self) -> bool:
        return self.recorded == self.now


def _file_row(name: str, recorded: dict | None, now: dict | None) -> Comparison:
    def show(f: dict | None) -> str:
        return "missing" if f is None else f"{f['size']} bytes, sha256 {f['sha256'][:12]}"

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


def _current_files(recorded: dict) -> list[dict]:
    folder = Path(recorded["checkpoint"]["path"])
    if not folder.is_dir():
        raise CheckpointError(f"the recorded checkpoint '{folder}' does not exist any more")
    hashes = default_hash_cache()
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


def replay(manifest_path: Path, run_dir: Path | None, check_only: bool) -> tuple[list[Comparison], dict | None]:
    """The comparison rows, and the new manifest (None with check_only)."""
    from omegaconf import OmegaConf

    from qloader import pipeline

    recorded = json.loads(manifest_path.read_text())
    if recorded.get("checkpoint") is None:
        raise CheckpointError(f"{manifest_path}: the recorded run never resolved a checkpoint; nothing to replay")
    if check_only:
        rows = compare_inputs(recorded, _current_files(recorded))
        return rows + compare_environment(recorded, environment.versions(), environment.hardware()), None
    run_dir = run_dir or Path("outputs") / "replay" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    cfg = OmegaConf.merge(_settings_added_since(), recorded["config"])
    result = pipeline.run(cfg, run_dir, recorded["overrides"], replay_of=str(manifest_path.resolve()))
    now = result.manifest
    rows = [Comparison("config_hash", recorded["config_hash"], now["config_hash"], True)]
    rows += compare_inputs(recorded, now["checkpoint"]["files"])
    rows += compare_environment(recorded, now["versions"], now["hardware"])
    fingerprint = recorded["weights_fingerprint"]  # None: the run was made with validate.fingerprint=false
    rows.append(Comparison("weights_fingerprint", fingerprint, now["weights_fingerprint"], fingerprint is not None))
    return rows, now


def experiment_yaml(manifest: dict) -> str:
    """An experiment config (`+experiment=NAME`) that reproduces the run: its choices, then its values."""
    header = "# @package _global_\n# Reproduces the run recorded in a qloader manifest.\n"
    body = {"defaults": [{f"override /{g}": c} for g, c in manifest["choices"].items()], **manifest["config"]}
    return header + yaml.safe_dump(body, sort_keys=False)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qloader replay", description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="a run's manifest.json")
    parser.add_argument("--check-only", action="store_true", help="compare inputs and environment; load nothing")
    parser.add_argument("--run-dir", type=Path, help="where the replay writes (default outputs/replay/DATE/TIME)")
    parser.add_argument("--write-experiment", type=Path, metavar="YAML", help="write the run as an experiment config")
    args = parser.parse_args(argv)
    if not args.manifest.is_file():
        parser.error(f"manifest '{args.manifest}' does not exist")
    if args.write_experiment:
        args.write_experiment.write_text(experiment_yaml(json.loads(args.manifest.read_text())))
        print(f"wrote {args.write_experiment}")
        return 0
    try:
        rows, now = replay(args.manifest, args.run_dir, args.check_only)
    except QloaderError as e:
        print(f"qloader: replay error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(render(rows))
    differing = [r.item for r in rows if r.decisive and not r.equal]
    if now is not None:
        print(f"\nnew manifest: {now['run_dir']}/manifest.json (replay_of {args.manifest})")
    if differing:
        print(f"qloader: replay differs: {', '.join(differing)}", file=sys.stderr)
        return 1
    return 0
