"""Records written before the package took its layered shape keep working: their dotted paths resolve, and their
manifests replay to the same weights.

`data/release-2f257d9/` holds manifests written by that release (the last with flat modules) for tiny-llama,
unquantized and in nf4; they record `model._target_: qloader.sources.tiny_llama_checkpoint`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from conftest import read_manifest
from omegaconf import OmegaConf

from qloader._legacy import MOVED, LegacyFinder
from qloader.runs import replay

RELEASE = Path(__file__).parent / "data" / "release-2f257d9"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_is_the_module_that_holds_its_code_now(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])
    assert importlib.import_module(old).__spec__.name == MOVED[old]  # the module keeps its own identity


def test_paths_recorded_in_conf_and_manifests_resolve() -> None:
    from hydra.utils import get_class, get_method

    from qloader.checkpoint.sources import local_checkpoint
    from qloader.runs.sweep import SweepSummary

    assert get_class("qloader.sweep.SweepSummary") is SweepSummary  # an old sweep's .hydra/hydra.yaml
    assert get_class("qloader.cli.CheckRunDir").__name__ == "CheckRunDir"
    assert get_method("qloader.sources.local_checkpoint") is local_checkpoint  # an old manifest's model._target_


@pytest.mark.parametrize(
    ("old", "new"), [("qloader.job", "runs/job.py"), ("qloader.probe_reference", "probe/reference.py")]
)
def test_old_module_runs_with_python_m(old: str, new: str) -> None:
    """`python -m qloader.job DIR` (runpy) runs the code of the module that holds it now."""
    code = LegacyFinder().find_spec(old).loader.get_code(old)  # a process that has not imported it yet
    assert code.co_filename.endswith(new)


@pytest.mark.parametrize("quant", ["none", "bnb-nf4"])
def test_manifest_of_the_flat_release_replays_to_the_same_fingerprint(quant: str, tmp_path, capsys) -> None:
    path = RELEASE / f"tiny-llama-{quant}.json"
    recorded = json.loads(path.read_text())
    assert recorded["config"]["model"]["_target_"] == "qloader.sources.tiny_llama_checkpoint"

    assert replay.main([str(path), "--check-only"]) == 0, capsys.readouterr().err
    assert replay.main([str(path), "--run-dir", str(tmp_path / "replay")]) == 0, capsys.readouterr().err
    now = read_manifest(tmp_path / "replay")
    assert now["status"] == "succeeded" and now["replay_of"] == str(path.resolve())
    # the same config: settings added since the release (at their defaults) are the only keys it lacks
    assert replay.rebuilt_hash(OmegaConf.create(now["config"]), recorded) == recorded["config_hash"]
    assert now["weights_fingerprint"] == recorded["weights_fingerprint"]
