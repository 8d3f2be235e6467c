"""EETQ int8 weight-only, per-channel scales (transformers `EetqConfig`): a CUDA GPU and the kernels package
(transformers 5.x runs EETQ through the Hugging Face Hub's quantization-eetq kernels)."""

from __future__ import annotations

from dataclasses import dataclass

from qloader.quant.base import QuantConfig, register_method
from qloader.quant.methods.device import EIGHT_BIT_INSTEAD, DeviceMethod


@dataclass
class EetqQuantConfig(QuantConfig):
    """Every field is a `transformers.EetqConfig` field, under the same name."""

    _target_: str | None = "transformers.EetqConfig"
    weights: str = "int8"
    """int8 (the only value EETQ supports)."""
    modules_to_not_convert: list[str] | None = None


@register_method
class Eetq(DeviceMethod):
    quant_method = "eetq"
    config_class = "EetqConfig"
    schemas = {"eetq": EetqQuantConfig}
    packages = ("kernels",)  # transformers 5.x runs EETQ through the Hub's quantization-eetq kernels
    needs = "a CUDA GPU and the kernels package (EETQ's int8 kernels come from the Hugging Face Hub)"
    instead = EIGHT_BIT_INSTEAD
    format_fields = ("weights",)
    quantized_prefixes = ("EetqLinear",)
    scale_suffixes = ("weight_scales",)
    choices = {"weights": ("int8",)}

    def describe(self, config: dict) -> str:
        return f"eetq {config.get('weights')}"
