"""HQQ (transformers `HqqConfig`), refused on every host.

transformers 5.2x has no loading path for it (its quantizer lacks `get_quantize_ops`, so every load ends in
NotImplementedError), and `HqqConfig()` itself raises ImportError without the hqq package: qloader refuses it
on every host, in `resolve` when its config cannot be built, else in `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qloader.quant.base import QuantConfig, register_method
from qloader.quant.methods.device import FOUR_BIT_INSTEAD, DeviceMethod

HQQ_REFUSAL = f"transformers 5.2x refuses HQQ on every device; use {FOUR_BIT_INSTEAD}"


@dataclass
class HqqQuantConfig(QuantConfig):
    """Every field is a `transformers.HqqConfig` field, under the same name."""

    _target_: str | None = "transformers.HqqConfig"
    nbits: int = 4
    group_size: int = 64
    view_as_float: bool = False
    axis: int | None = None
    dynamic_config: Any = None
    """A dict (layer tag -> hqq quant params) or null; typed Any as HiggsQuantConfig.tune_metadata is."""
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])


@register_method
class Hqq(DeviceMethod):
    quant_method = "hqq"
    config_class = "HqqConfig"
    schemas = {"hqq": HqqQuantConfig}
    packages = ("hqq",)
    needs = "a transformers release that can load HQQ (5.2x cannot, on any device) and hqq >= 0.2.1"
    instead = FOUR_BIT_INSTEAD
    quantized_prefixes = ("HQQLinear",)

    def refusal(self, config: Any) -> str:
        return HQQ_REFUSAL

    def check_environment(self, config: Any, cuda_devices: int) -> str | None:
        return HQQ_REFUSAL

    def describe(self, config: dict) -> str:
        params = config.get("quant_config") or {}
        nbits = (params.get("weight_quant_params") or {}).get("nbits") if isinstance(params, dict) else None
        return "hqq" if nbits is None else f"hqq {nbits}-bit"
