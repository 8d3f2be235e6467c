"""Module paths of earlier releases, still importable: manifests and `.hydra/` records name them.

A manifest written before the package took its layered shape records `model._target_:
qloader.sources.tiny_llama_checkpoint`; a sweep job's `.hydra/hydra.yaml` names `qloader.sweep.SweepSummary`.
Replaying or reporting them imports those paths, which resolve here to the modules that now hold the code
(the same module objects, so `qloader.sources.cache_dir is qloader.checkpoint.sources.cache_dir`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

MOVED = {
    "qloader.errors": "qloader.core.errors",
    "qloader.choices": "qloader.core.choices",
    "qloader.stage_names": "qloader.core.names",
    "qloader.permissions": "qloader.core.permissions",
    "qloader.interrupts": "qloader.core.interrupts",
    "qloader.library_logs": "qloader.core.library_logs",
    "qloader.schema": "qloader.config.schema",
    "qloader.integrity": "qloader.checkpoint.integrity",
    "qloader.sources": "qloader.checkpoint.sources",
    "qloader.checkpoint_writer": "qloader.checkpoint.writer",
    "qloader.environment": "qloader.measure.environment",
    "qloader.fingerprint": "qloader.measure.fingerprint",
    "qloader.inventory": "qloader.measure.inventory",
    "qloader.plan": "qloader.measure.plan",
    "qloader.probe_reference": "qloader.probe.reference",
    "qloader.hf_loading": "qloader.loading.hf_loading",
    "qloader.devices": "qloader.loading.devices",
    "qloader.stages": "qloader.loading.stages",
    "qloader.manifest": "qloader.runs.manifest",
    "qloader.pipeline": "qloader.runs.pipeline",
    "qloader.sweep": "qloader.runs.sweep",
    "qloader.job": "qloader.runs.job",
    "qloader.replay": "qloader.runs.replay",
    "qloader.report": "qloader.runs.report",
    "qloader.summary": "qloader.runs.summary",
}
"""Old module path -> the module that holds its code now. (`qloader.config`, `qloader.checkpoint`,
`qloader.measure` and `qloader.probe` were modules too; those names are packages today.)"""


class _Alias(importlib.abc.Loader):
    """Hands out the module at `target` under the old name, leaving the module's own `__spec__` as it was."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target ran already, under its own name; the import system has just set the old name's spec on it,
        which would make the module look like the alias to `importlib.util.find_spec(target)`: put its own back."""
        module.__spec__ = importlib.machinery.PathFinder.find_spec(self.target, _parent_path(self.target))

    def get_code(self, fullname: str):  # `python -m qloader.job DIR` runs the target's code as __main__
        return importlib.machinery.PathFinder.find_spec(self.target, _parent_path(self.target)).loader.get_code(
            self.target
        )


def _parent_path(name: str) -> list[str]:
    return list(importlib.import_module(name.rpartition(".")[0]).__path__)


class LegacyFinder(importlib.abc.MetaPathFinder):
    """Resolves an old flat module path to its module in the layered package."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        moved = MOVED.get(fullname)
        if moved is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(moved))


def install() -> None:
    if not any(isinstance(finder, LegacyFinder) for finder in sys.meta_path):
        sys.meta_path.append(LegacyFinder())
