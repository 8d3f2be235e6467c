"""HIGGS: Hadamard rotation and vector quantization on a grid (transformers `HiggsConfig`), read only from
pre-quantized checkpoints, on a CUDA GPU with the FLUTE kernels and fast-hadamard-transform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from qloader.quant.base import QuantConfig, register_method
from qloader.quant.methods.device import FOUR_BIT_INSTEAD, DeviceMethod

HIGGS_REFUSAL = (
    "transformers 5.2x cannot quantize HIGGS while loading, on any device (it reads only pre-quantized HIGGS "
    f"checkpoints, on a CUDA GPU with flute-kernel and fast-hadamard-transform); use {FOUR_BIT_INSTEAD}"
)


@dataclass
class HiggsQuantConfig(QuantConfig):
    """Every field is a `transformers.HiggsConfig` field, under the same name."""

    _target_: str | None = "transformers.HiggsConfig"
    bits: int = 4
    """2, 3 or 4."""
    p: int = 2
    """Grid dimension: 1 or 2."""
    modules_to_not_convert: list[str] | None = None
    hadamard_size: int = 512
    group_size: int = 256
    """64, 128 or 256; divides hadamard_size."""
    tune_metadata: Any = None
    """A dict (module -> FLUTE tuning data) or null; typed Any because OmegaConf 2.3 cannot merge a dict
    override into an `Optional[Dict]` field whose default is null."""


@register_method
class Higgs(DeviceMethod):
    quant_method = "higgs"
    config_class = "HiggsConfig"
    schemas = {"higgs": HiggsQuantConfig}
    packages = ("flute-kernel", "fast-hadamard-transform")
    needs = "a CUDA GPU with the FLUTE kernels (flute-kernel >= 0.4.1) and fast-hadamard-transform"
    instead = FOUR_BIT_INSTEAD
    format_fields = ("bits", "p", "hadamard_size", "group_size")
    quantized_prefixes = ("HiggsLinear",)
    choices = {"bits": (2, 3, 4), "p": (1, 2), "group_size": (64, 128, 256)}

    def check_environment(self, config: Any, cuda_devices: int) -> str | None:
        """transformers 5.2x has no HIGGS quantize op (every on-the-fly load ends in NotImplementedError): only
        a pre-quantized checkpoint, whose config carries FLUTE's per-module `tune_metadata`, can load."""
        if not getattr(config, "tune_metadata", None):
            return HIGGS_REFUSAL
        return super().check_environment(config, cuda_devices)

    def check_fields(self, quant: DictConfig) -> list[str]:
        problems = super().check_fields(quant)
        if isinstance(quant.group_size, int) and quant.group_size and quant.hadamard_size % quant.group_size:
            problems.append(
                f"quant.hadamard_size {quant.hadamard_size} is not a multiple of quant.group_size {quant.group_size}"
            )
        return problems

    def describe(self, config: dict) -> str:
        return f"higgs {config.get('bits')}-bit p={config.get('p')}"
