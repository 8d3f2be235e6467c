"""The method plug-ins, keyed by transformers' `quant_method`; the one place that lists them."""

from __future__ import annotations

from typing import Any

from qloader.quant.base import NoQuantConfig, QuantMethod
from qloader.quant.methods.awq import Awq
from qloader.quant.methods.bnb import Bitsandbytes
from qloader.quant.methods.compressed_tensors import CompressedTensors
from qloader.quant.methods.gptq import Gptq
from qloader.quant.methods.gpu import GPU_METHODS
from qloader.quant.methods.quanto import Quanto
from qloader.quant.methods.torchao import Torchao

METHODS: dict[str, QuantMethod] = {
    m.quant_method: m for m in (Bitsandbytes(), Torchao(), Quanto(), CompressedTensors(), Gptq(), Awq(), *GPU_METHODS)
}


class OtherMethod(QuantMethod):
    """A config class no plug-in describes (a user's own `_target_`): transformers' defaults throughout."""

    def __init__(self, quant_method: str = "unknown", config_class: str = "") -> None:
        self.quant_method, self.config_class = quant_method, config_class


def _plain(value: Any) -> str:
    return str(getattr(value, "value", value))


def method_for_target(target: str | None) -> QuantMethod | None:
    """The plug-in whose config class the YAML's `_target_` names; None for quant=none."""
    if target is None:
        return None
    name = target.rsplit(".", 1)[-1]
    return next((m for m in METHODS.values() if m.config_class == name), OtherMethod(config_class=name))


def method_of(config: Any) -> QuantMethod | None:
    """The plug-in for a transformers config object or a saved `quantization_config` dict; None if unquantized."""
    if config is None:
        return None
    method = _plain(config.get("quant_method") if isinstance(config, dict) else config.quant_method)
    return METHODS.get(method) or OtherMethod(method, type(config).__name__)


def schemas() -> dict[str, type]:
    """Every `quant` schema: `none` and each plug-in's, by the name the YAML files refer to."""
    found: dict[str, type] = {"none": NoQuantConfig}
    for method in METHODS.values():
        found.update(method.schemas)
    return found


def settings() -> set[str]:
    """Every field name that is a qloader setting in some method's `quant` node."""
    return {name for method in METHODS.values() for name in method.settings}


def packages() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for method in METHODS.values() for p in method.packages))
