"""A quantization method defined outside qloader: int8 weights, one symmetric scale per output channel, rounded to
nearest (RTN), quantized while the checkpoint loads.

Three registrations make it a method like any built-in one: its config class with transformers
(`register_quantization_config`), its quantizer (`register_quantizer`: swaps each Linear for `RtnInt8Linear` on
the meta skeleton, then quantizes each weight as it is read, through `get_quantize_ops`), and its qloader plug-in
(`register_method`). A YAML names the config class by `_target_: custom_method.RtnInt8Config`; importing this
module (qloader does, to look the `_target_` up) registers all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from qloader.quant.base import QuantConfig, QuantMethod, register_method

QUANT_METHOD = "rtn_int8"
INT8_MAX = 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per row): each row divided by its absmax / 127 and rounded to nearest."""
    rows = weight.float()
    scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX
    return torch.round(rows / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


# ---------------------------------------------------------------- transformers' side: config, module, quantizer


@register_quantization_config(QUANT_METHOD)
class RtnInt8Config(QuantizationConfigMixin):
    """Per-output-channel symmetric int8 weights; `modules_to_not_convert` as in transformers' configs."""

    def __init__(self, modules_to_not_convert: list[str] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.modules_to_not_convert = modules_to_not_convert


class RtnInt8Linear(nn.Module):
    """A Linear holding int8 weights and a float32 scale per output channel; computes in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight.float() * self.weight_scale).to(x.dtype)
        return nn.functional.linear(x, weight, self.bias)


class RtnInt8Quantize(ConversionOps):
    """The quantize op transformers runs on each weight `param_needs_quantization` selects, as it is read."""

    def __init__(self, hf_quantizer: HfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, full_layer_name: str | None = None, **kwargs: Any) -> dict:
        (value,) = input_dict.values()
        weight = value[0] if isinstance(value, list) else value
        quantized, scale = quantize_rows(weight)
        return {full_layer_name: quantized, f"{full_layer_name}_scale": scale.to(weight.device)}


@register_quantizer(QUANT_METHOD)
class RtnInt8HfQuantizer(HfQuantizer):
    requires_calibration = False

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        """Every Linear not kept (the output head, `modules_to_not_convert`) becomes an `RtnInt8Linear`."""
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules
        )
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and should_convert_module(name, self.modules_to_not_convert):
                with torch.device("meta"):
                    swapped = RtnInt8Linear(
                        module.in_features, module.out_features, module.bias is not None, module.weight.dtype
                    )
                model.set_submodule(name, swapped)

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, RtnInt8Linear) and tensor_name == "weight" and not self.pre_quantized

    def get_quantize_ops(self) -> ConversionOps:
        return RtnInt8Quantize(self)

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


# ---------------------------------------------------------------- qloader's side: schema and plug-in


@dataclass
class RtnInt8QuantConfig(QuantConfig):
    """Every field is a `custom_method.RtnInt8Config` field, under the same name."""

    _target_: str | None = "custom_method.RtnInt8Config"
    modules_to_not_convert: list[str] | None = None


@register_method
class RtnInt8(QuantMethod):
    quant_method = QUANT_METHOD
    config_class = "RtnInt8Config"
    schemas = {"rtn_int8": RtnInt8QuantConfig}
    can_save = False

    def describe(self, config: dict) -> str:
        return "rtn int8 (per output channel)"

    def quantized_class(self, module: Any) -> str | None:
        return "RtnInt8Linear" if isinstance(module, RtnInt8Linear) else None

    def created_keys(self, model: Any) -> set[str]:
        """The scales the quantize op writes beside each weight: never in a plain checkpoint."""
        return {f"{name}.weight_scale" for name, module in model.named_modules() if self.quantized_class(module)}
