"""FP-Quant: NVFP4 / MXFP4 weights and activations with a Hadamard transform (transformers `FPQuantConfig`): a CUDA
GPU with fp-quant, on Blackwell with qutlass or anywhere with Triton's pseudo-quantization."""

from __future__ import annotations

from dataclasses import dataclass

from qloader.quant.base import QuantConfig, register_method
from qloader.quant.methods.device import FOUR_BIT_INSTEAD, DeviceMethod


@dataclass
class FpQuantQuantConfig(QuantConfig):
    """Every field is a `transformers.FPQuantConfig` field, under the same name."""

    _target_: str | None = "transformers.FPQuantConfig"
    forward_dtype: str = "nvfp4"
    """nvfp4 or mxfp4."""
    forward_method: str = "abs_max"
    """abs_max, or quest (mxfp4 only)."""
    backward_dtype: str = "bf16"
    store_master_weights: bool = False
    hadamard_group_size: int | None = None
    """null: 16 for nvfp4, 32 for mxfp4."""
    pseudoquantization: bool = False
    """Triton emulation instead of qutlass' Blackwell kernels (no speed-up)."""
    transform_init: str = "hadamard"
    modules_to_not_convert: list[str] | None = None
    """null: ['lm_head'], as in transformers."""


@register_method
class FpQuant(DeviceMethod):
    quant_method = "fp_quant"
    config_class = "FPQuantConfig"
    schemas = {"fp_quant": FpQuantQuantConfig}
    packages = ("fp-quant", "qutlass")
    needs = "a CUDA GPU with fp-quant >= 0.3.2: Blackwell with qutlass, or quant.pseudoquantization=true (Triton)"
    instead = FOUR_BIT_INSTEAD
    format_fields = ("forward_dtype", "forward_method", "hadamard_group_size", "transform_init")
    quantized_prefixes = ("FPQuantLinear",)
    choices = {
        "forward_dtype": ("nvfp4", "mxfp4"),
        "forward_method": ("abs_max", "quest"),
        "backward_dtype": ("bf16", "mxfp8", "mxfp4"),
        "transform_init": ("hadamard", "identity", "gsr"),
    }

    def describe(self, config: dict) -> str:
        return f"fp-quant {config.get('forward_dtype')}" + (" (pseudo)" if config.get("pseudoquantization") else "")
