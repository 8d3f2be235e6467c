"""fbgemm fp8 (e4m3) weights with per-row scales, fp8 activations (transformers `FbgemmFp8Config`): a Hopper GPU
and fbgemm-gpu-genai."""

from __future__ import annotations

from dataclasses import dataclass

from qloader.quant.base import QuantConfig, register_method
from qloader.quant.methods.device import DeviceMethod


@dataclass
class FbgemmFp8QuantConfig(QuantConfig):
    """Every field is a `transformers.FbgemmFp8Config` field, under the same name."""

    _target_: str | None = "transformers.FbgemmFp8Config"
    activation_scale_ub: float = 1200.0
    modules_to_not_convert: list[str] | None = None


@register_method
class FbgemmFp8(DeviceMethod):
    quant_method = "fbgemm_fp8"
    config_class = "FbgemmFp8Config"
    schemas = {"fbgemm_fp8": FbgemmFp8QuantConfig}
    packages = ("fbgemm-gpu-genai",)
    needs = "a CUDA GPU with compute capability >= 9.0 (Hopper) and fbgemm-gpu-genai"
    min_capability = (9, 0)
    instead = "quant=torchao-fp8wo"
    quantized_prefixes = ("FbgemmFp8",)
    scale_suffixes = ("weight_scale", "gate_up_proj_scale", "down_proj_scale")

    def describe(self, config: dict) -> str:
        return "fbgemm fp8 (per-row)"
