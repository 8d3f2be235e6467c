"""optimum-quanto: int8, int4 and float8 weights (QLinear modules), on CPU and CUDA; transformers cannot save them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from qloader.quant.base import QuantConfig, QuantMethod, WeightBytes, linear_only, register_method

WEIGHTS = ("int8", "int4", "int2", "float8")
BITS = {"int8": 8, "float8": 8, "int4": 4, "int2": 2}


@dataclass
class QuantoQuantConfig(QuantConfig):
    """Every field is a `transformers.QuantoConfig` field, under the same name."""

    _target_: str | None = "transformers.QuantoConfig"
    weights: str = "int8"
    """int8 | int4 | int2 | float8."""
    activations: str | None = None
    """transformers loads quanto models with unquantized activations only (null)."""
    modules_to_not_convert: list[str] | None = None


@register_method
class Quanto(QuantMethod):
    quant_method = "quanto"
    config_class = "QuantoConfig"
    schemas = {"quanto": QuantoQuantConfig}
    packages = ("optimum-quanto",)
    module = "optimum.quanto"
    extra = "quanto"
    format_fields = ("weights", "activations")
    can_save = False
    module_name_fields = ("modules_to_not_convert",)
    disk_offload = (
        "optimum-quanto quantizes each weight in memory as it loads; transformers refuses a quanto map with "
        "modules on disk"
    )

    def check_fields(self, quant: DictConfig) -> list[str]:
        problems = []
        if quant.weights not in WEIGHTS:
            problems.append(f"quant.weights '{quant.weights}' is not one of {', '.join(WEIGHTS)}")
        if quant.activations is not None:
            problems.append(
                f"quant.activations '{quant.activations}': transformers quantizes only quanto weights; set it to null"
            )
        return problems

    def describe(self, config: dict) -> str:
        return f"quanto {config.get('weights')}"

    def check_save(self, quant: DictConfig) -> str | None:
        return (
            f"transformers cannot serialize quanto models (quant.weights={quant.weights}); "
            "use quant=torchao-int8wo or quant=torchao-fp8wo to save"
        )

    def nothing_quantized(self, quantizer: Any, model: Any) -> str | None:
        return linear_only("optimum-quanto", model)

    def created_keys(self, model: Any) -> set[str]:
        """QLinear's activation scales: the quantizer sets them while loading, no checkpoint has them."""
        return {
            f"{name}.{scale}"
            for name, module in model.named_modules()
            if self.quantized_class(module)
            for scale in ("input_scale", "output_scale")
        }

    def quantized_class(self, module: Any) -> str | None:
        kind = type(module).__name__
        return kind if kind.startswith("Q") and hasattr(module, "weight_qtype") else None

    def planned_bytes(self, quantizer: Any, model: Any, name: str, module: Any, param: Any) -> WeightBytes | None:
        if not self.quantized_class(module) or not name.endswith(".weight"):
            return None
        rows, cols = param.shape[0], math.prod(param.shape[1:])
        bits = BITS[quantizer.quantization_config.weights]
        scale = param.element_size()
        # The quantizer replaces the activation scales (counted as buffers at the skeleton's dtype) by float32.
        scales = sum(4 - getattr(module, s).element_size() for s in ("input_scale", "output_scale"))
        if bits == 8:  # per-row scale in the weight's dtype
            return WeightBytes(rows * cols, rows * scale + scales)
        # sub-byte: packed data, and a scale and a shift per group (per row when ungrouped)
        group = module.weight_group_size or cols
        return WeightBytes(math.ceil(rows * cols * bits / 8), 2 * rows * (cols // group) * scale + scales)
