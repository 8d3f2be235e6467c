"""The registered method plug-ins, keyed by transformers' `quant_method`, and what enumerates them.

Nothing is listed here: each plug-in registers itself (`qloader.quant.base.register_method`) when its module
is imported. Importing `qloader.quant.methods` imports every built-in; a user's plug-in registers when the
module its `_target_` names is imported (`method_for_target` does that).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import qloader.quant.methods  # noqa: F401  (importing the package registers every built-in method)
from qloader.quant.base import REGISTERED, NoQuantConfig, QuantMethod

METHODS = REGISTERED
"""quant_method -> its plug-in: a live, read-only view of every registered method."""


class OtherMethod(QuantMethod):
    """A config class no plug-in describes (a user's own `_target_`): transformers' defaults throughout."""

    def __init__(self, quant_method: str = "unknown", config_class: str = "") -> None:
        self.quant_method, self.config_class = quant_method, config_class


def _plain(value: Any) -> str:
    return str(getattr(value, "value", value))


def registered_for_class(name: str) -> QuantMethod | None:
    return next((m for m in METHODS.values() if m.config_class == name), None)


def method_for_target(target: str | None) -> QuantMethod | None:
    """The plug-in whose config class the YAML's `_target_` names; None for quant=none.

    A class no registered plug-in describes has its module imported (that is how a user's plug-in, defined
    beside its config class, registers itself) and is looked up again; then it falls back to `OtherMethod`.
    A module that cannot be found is left to Hydra's instantiation, which names it.
    """
    if target is None:
        return None
    module, _, name = target.rpartition(".")
    if (method := registered_for_class(name)) is None and module:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
        method = registered_for_class(name)
    return method or OtherMethod(config_class=name)


def method_of(config: Any) -> QuantMethod | None:
    """The plug-in for a transformers config object or a saved `quantization_config` dict; None if unquantized."""
    if config is None:
        return None
    method = _plain(config.get("quant_method") if isinstance(config, dict) else config.quant_method)
    return METHODS.get(method) or OtherMethod(method, type(config).__name__)


def schemas() -> dict[str, type]:
    """Every `quant` schema: `none` and each registered plug-in's, by the name the YAML files refer to."""
    found: dict[str, type] = {"none": NoQuantConfig}
    for method in METHODS.values():
        found.update(method.schemas)
    return found


def method_for_schema(name: str) -> QuantMethod | None:
    """The plug-in that declares the schema `name` (None for `none`); KeyError when none does."""
    if name == "none":
        return None
    owners = [m for m in METHODS.values() if name in m.schemas]
    if not owners:
        raise KeyError(name)
    return owners[0]


def settings() -> set[str]:
    """Every field name that is a qloader setting in some method's `quant` node."""
    return {name for method in METHODS.values() for name in method.settings}


def packages() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for method in METHODS.values() for p in method.packages))
