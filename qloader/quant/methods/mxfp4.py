"""MXFP4 (4-bit, a shared 8-bit exponent per 32) for GPT-OSS MoE experts only (transformers `Mxfp4Config`): a CUDA
GPU with triton and kernels; a pre-quantized mxfp4 checkpoint also loads dequantized to bf16 on any device."""

from __future__ import annotations

from dataclasses import dataclass

from qloader.quant.base import QuantConfig, register_method
from qloader.quant.methods.device import FOUR_BIT_INSTEAD, DeviceMethod


@dataclass
class Mxfp4QuantConfig(QuantConfig):
    """Every field is a `transformers.Mxfp4Config` field, under the same name."""

    _target_: str | None = "transformers.Mxfp4Config"
    modules_to_not_convert: list[str] | None = None
    dequantize: bool = False
    """Load a pre-quantized mxfp4 checkpoint as bf16 (on any device)."""


@register_method
class Mxfp4(DeviceMethod):
    quant_method = "mxfp4"
    config_class = "Mxfp4Config"
    schemas = {"mxfp4": Mxfp4QuantConfig}
    packages = ("triton", "kernels")
    needs = "a CUDA GPU with compute capability >= 7.5, triton >= 3.4 and kernels (it quantizes GPT-OSS experts only)"
    min_capability = (7, 5)
    instead = FOUR_BIT_INSTEAD
    quantized_prefixes = ("Mxfp4GptOssExperts",)

    def describe(self, config: dict) -> str:
        return "mxfp4" + (" (dequantized)" if config.get("dequantize") else "")
