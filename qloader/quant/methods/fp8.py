"""Fine-grained fp8 (e4m3) weights in blocks, fp8 activations (transformers `FineGrainedFP8Config`): a CUDA GPU
with compute capability >= 8.9; a pre-quantized fp8 checkpoint also loads dequantized to bf16 on any device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from qloader.quant.base import QuantConfig, register_method
from qloader.quant.methods.device import DeviceMethod


@dataclass
class Fp8QuantConfig(QuantConfig):
    """Every field is a `transformers.FineGrainedFP8Config` field, under the same name."""

    _target_: str | None = "transformers.FineGrainedFP8Config"
    activation_scheme: str = "dynamic"
    """dynamic or static."""
    weight_block_size: list[int] | None = field(default_factory=lambda: [128, 128])
    """[rows, cols] of one scale block; null: one scale per tensor. Weights not divisible by it stay unquantized."""
    dequantize: bool = False
    """Load a pre-quantized fp8 checkpoint as bf16 (on any device)."""
    modules_to_not_convert: list[str] | None = None
    modules_to_convert: list[str] | None = None
    scale_fmt: str = "float"
    """float (float32 scales) or ue8m0 (power-of-two scales in one byte)."""
    expert_dtype: str = "fp8"
    """fp8 or fp4 (MoE experts)."""


@register_method
class FineGrainedFp8(DeviceMethod):
    quant_method = "fp8"
    config_class = "FineGrainedFP8Config"
    schemas = {"fp8": Fp8QuantConfig}
    packages = ("kernels",)  # the fp8 matmul kernels come from the Hub through `kernels`
    needs = "a CUDA GPU with compute capability >= 8.9 (Ada/Hopper)"
    min_capability = (8, 9)  # below it transformers loads the weights unquantized, with a warning
    instead = "quant=torchao-fp8wo (or, for a pre-quantized fp8 checkpoint, quant.dequantize=true: bf16 weights)"
    format_fields = ("activation_scheme", "weight_block_size", "scale_fmt", "expert_dtype")
    quantized_prefixes = ("FP8",)
    choices = {
        "activation_scheme": ("dynamic", "static"),
        "scale_fmt": ("float", "ue8m0"),
        "expert_dtype": ("fp8", "fp4"),
    }

    def check_fields(self, quant: DictConfig) -> list[str]:
        problems = super().check_fields(quant)
        block = quant.weight_block_size
        if block is not None and (len(block) != 2 or any(not isinstance(n, int) or n <= 0 for n in block)):
            problems.append(f"quant.weight_block_size {list(block)} is not two positive integers (or null)")
        return problems

    def created_keys(self, model: Any) -> set[str]:
        """`weight_scale_inv` (an expert projection's `<name>_scale_inv`) for each weight the quantize op can
        tile with the module's block size. One it cannot tile (64 rows in 128x128 blocks) is passed through
        unquantized and its scale stays missing: `preprocess` names it before any shard is read."""
        keys = set()
        for name, module in model.named_modules():
            if not self.quantized_class(module):
                continue
            params = dict(module.named_parameters(recurse=False))
            for scale in (p for p in params if p.endswith("scale_inv")):
                weight = params.get("weight" if scale == "weight_scale_inv" else scale.removesuffix("_scale_inv"))
                if weight is not None and weight.dim() >= 2:
                    rows, cols = weight.shape[-2:]
                    block = getattr(module, "block_size", None) or (rows, cols)
                    if rows % block[0] == 0 and cols % block[1] == 0:
                        keys.add(f"{name}.{scale}")
        return keys

    def describe(self, config: dict) -> str:
        block = config.get("weight_block_size")
        shape = "per tensor" if block is None else "block " + "x".join(str(n) for n in block)
        scheme = config.get("activation_scheme", "dynamic")
        return f"fp8 {shape}, {scheme} activations" + (" (dequantized)" if config.get("dequantize") else "")
