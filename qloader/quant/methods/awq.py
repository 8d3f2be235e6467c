"""AWQ: pre-quantized checkpoints (GEMM layout), loaded through transformers' AwqConfig and gptqmodel's kernels.

transformers cannot quantize with AWQ (it needs a calibrated checkpoint), so a request (`quant=awq`) only
merges with a checkpoint's own `quantization_config`; on an unquantized checkpoint transformers refuses it.
The skeleton holds the stored layout (`qweight`, `qzeros` int32 packed 8 per word, `scales` fp16), so the
plan counts its buffers as they are. On CPU, gptqmodel's kernel repacks those buffers into its own int4
layout on the first forward pass; `save_pretrained` would then write a layout no loader reads, so a save
after a forward is refused (qloader's save stage runs before the probe and writes the stored layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from qloader.quant.base import QuantConfig, QuantMethod, register_method
from qloader.quant.methods.gptq import import_backend

QUANT_STATE = ("qweight", "qzeros", "scales")
FORMATS = ("gemm", "gemv", "gemv_fast", "llm-awq")


@dataclass
class AwqQuantConfig(QuantConfig):
    """`transformers.AwqConfig` fields under the same names (only merged with a pre-quantized checkpoint)."""

    _target_: str | None = "transformers.AwqConfig"
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"
    """The packed layout (AwqConfig's legacy name for `format`): gemm, gemv, gemv_fast, llm-awq."""
    backend: str = "auto"


def _is_awq_linear(module: Any) -> bool:
    return any(cls.__name__ == "AWQuantLinear" for cls in type(module).__mro__)


@register_method
class Awq(QuantMethod):
    quant_method = "awq"
    config_class = "AwqConfig"
    schemas = {"awq": AwqQuantConfig}
    packages = ("gptqmodel",)
    module = "gptqmodel"
    extra = "gptq"
    format_fields = ("bits", "group_size", "zero_point", "version")
    pre_quantized_only = True

    def check_fields(self, quant: DictConfig) -> list[str]:
        problems = []
        if quant.bits != 4:
            problems.append(f"quant.bits {quant.bits} is not 4 (AWQ checkpoints are 4-bit)")
        if quant.version not in FORMATS:
            problems.append(f"quant.version '{quant.version}' is not one of {', '.join(FORMATS)}")
        return problems

    def build_config(self, quant: DictConfig, device: str) -> Any:
        import_backend()
        return super().build_config(quant, device)

    def prepare_backend(self) -> None:
        import_backend()

    def describe(self, config: dict) -> str:
        group = config.get("group_size")
        group_text = "per row" if group == -1 else f"group {group}"
        layout = config.get("version") or config.get("format") or "gemm"
        return f"awq {config.get('bits')}-bit ({group_text}, {layout})"

    def compared_fields(self, saved: dict, user: dict) -> tuple[str, ...]:
        return ("bits", "group_size", "zero_point", "version", "backend")

    # ---------------------------------------------------------------- the skeleton and the checkpoint

    def quant_state_names(self, quantizer: Any, name: str, module: Any) -> tuple[str, ...]:
        return QUANT_STATE if _is_awq_linear(module) else ()

    def quantized_class(self, module: Any) -> str | None:
        return type(module).__name__ if _is_awq_linear(module) else None

    # planned_bytes: None. The skeleton already holds the stored buffers (qweight, qzeros, scales).

    # ---------------------------------------------------------------- the loaded model

    def _repacked(self, model: Any) -> list[str]:
        import torch

        return [
            name
            for name, module in model.named_modules()
            if _is_awq_linear(module)
            and getattr(module, "qweight", None) is not None
            and module.qweight.dtype != torch.int32
        ]

    def check_save_model(self, model: Any) -> str | None:
        if repacked := self._repacked(model):
            return (
                f"gptqmodel repacked the AWQ weights of {len(repacked)} module(s) (first: {repacked[0]}) into its "
                "CPU kernel's layout on the first forward pass, and that layout does not reload; save before any "
                "forward pass (qloader's save stage runs before the probe)"
            )
        return None

    def save_note(self, model: Any) -> str | None:
        if self._repacked(model):
            return "gptqmodel repacked the AWQ weights into its CPU kernel's layout on the first forward pass"
        return "awq: save writes the stored GEMM layout as loaded"
