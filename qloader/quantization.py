"""The `quant` config group -> a transformers quantization config, merged with a checkpoint's own."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qloader.errors import CheckpointError, QuantizationMismatchError

QUANT_TYPES = ("nf4", "fp4")
TORCH_DTYPES = ("bfloat16", "float16", "float32", "float64")
STORAGE_DTYPES = ("uint8", "int8", "bfloat16", "float16", "float32")
QUANT_SETTINGS = ("kernel",)
"""`quant` fields that are qloader settings, not fields of the quantization-config class."""


def check_quant_fields(quant: DictConfig) -> list[str]:
    """Every problem in the `quant` group, each naming the field and the value."""
    from qloader.kernels import KERNELS

    problems = []
    if quant.kernel not in KERNELS:
        problems.append(f"quant.kernel '{quant.kernel}' is not one of {', '.join(KERNELS)}")
    if quant.get("_target_") != "transformers.BitsAndBytesConfig":
        return problems
    if quant.load_in_4bit and quant.load_in_8bit:
        problems.append(
            "quant.load_in_4bit and quant.load_in_8bit are both true; choose one (quant=bnb-nf4 or quant=bnb-int8)"
        )
    if not (quant.load_in_4bit or quant.load_in_8bit):
        problems.append(
            "quant: bitsandbytes needs quant.load_in_4bit=true or quant.load_in_8bit=true (or use quant=none)"
        )
    if quant.bnb_4bit_quant_type not in QUANT_TYPES:
        problems.append(
            f"quant.bnb_4bit_quant_type '{quant.bnb_4bit_quant_type}' is not one of {', '.join(QUANT_TYPES)}"
        )
    if quant.bnb_4bit_compute_dtype is not None and quant.bnb_4bit_compute_dtype not in TORCH_DTYPES:
        problems.append(
            f"quant.bnb_4bit_compute_dtype '{quant.bnb_4bit_compute_dtype}' is not one of {', '.join(TORCH_DTYPES)}"
        )
    if quant.bnb_4bit_quant_storage is not None and quant.bnb_4bit_quant_storage not in STORAGE_DTYPES:
        problems.append(
            f"quant.bnb_4bit_quant_storage '{quant.bnb_4bit_quant_storage}' is not one of {', '.join(STORAGE_DTYPES)}"
        )
    return problems


def build_quantization_config(quant: DictConfig):
    """Instantiate the `_target_` class (e.g. transformers.BitsAndBytesConfig); None for quant=none."""
    if quant.get("_target_") is None:
        return None
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    fields = OmegaConf.masked_copy(quant, [key for key in quant if key not in QUANT_SETTINGS])
    return instantiate(fields, _convert_="all")


@dataclass(frozen=True)
class MergeRow:
    """One field where the checkpoint's saved quantization config and the user's differ."""

    field: str
    checkpoint: Any
    user: Any
    used: Any


# BitsAndBytesConfig's public fields. Those that define how the stored weights are packed must agree
# with a pre-quantized checkpoint; for the rest the checkpoint wins, as in transformers, with a warning.
BNB_FIELDS = (
    "load_in_4bit",
    "load_in_8bit",
    "llm_int8_threshold",
    "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
)
FORMAT_FIELDS = (
    "load_in_4bit",
    "load_in_8bit",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
)


def quant_overridden(overrides: list[str]) -> bool:
    """Did the user ask for a quant setting (`quant=...`, `quant.x=...`), rather than take the default?"""
    settings = rf"^[+~]*quant\.({'|'.join(QUANT_SETTINGS)})="
    return any(re.match(r"^[+~]*quant([.=@]|$)", o) and not re.match(settings, o) for o in overrides)


def check_saved_config(saved: dict, config_json: Path) -> None:
    """A checkpoint's `quantization_config` must name a method transformers can load."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AutoHfQuantizer

    method = saved.get("quant_method")
    try:
        supported = AutoHfQuantizer.supports_quant_method(saved)
    except ValueError:
        supported = False
    if not supported:
        known = ", ".join(
            sorted({str(m).removesuffix("_4bit").removesuffix("_8bit") for m in AUTO_QUANTIZATION_CONFIG_MAPPING})
        )
        raise CheckpointError(
            f"{config_json}: quantization_config.quant_method '{method}' is not a method transformers can load "
            f"(known: {known})"
        )


def _compared_fields(saved: dict, user) -> tuple[str, ...]:
    if type(user).__name__ == "BitsAndBytesConfig":
        return BNB_FIELDS
    return tuple(sorted(k for k in set(saved) & set(user.to_dict()) if not k.startswith("_") and k != "quant_method"))


def merge_with_checkpoint(saved: dict, user, user_asked: bool, config_json: Path) -> tuple[Any, list[MergeRow]]:
    """Merge as transformers does (`AutoHfQuantizer.merge_quantization_configs`) and list every difference.

    A request that contradicts how the checkpoint's weights are stored is an error naming both sides.
    """
    from transformers.quantizers.auto import AutoHfQuantizer

    saved_method = describe_dict(saved)
    if user_asked and user is None:
        raise QuantizationMismatchError(
            f"{config_json} is pre-quantized ({saved_method}), but quant=none asks for unquantized weights; "
            "drop the quant override to load it as saved"
        )
    saved_config = AutoHfQuantizer.merge_quantization_configs(dict(saved), None)
    if user is None:
        return saved_config, []
    if type(user) is not type(saved_config):
        raise QuantizationMismatchError(
            f"{config_json} is pre-quantized with {saved_method}, but quant asks for {describe(user)}"
        )
    merged = AutoHfQuantizer.merge_quantization_configs(dict(saved), user)
    user_dict, used_dict = user.to_dict(), merged.to_dict()
    rows = [
        MergeRow(key, saved.get(key), user_dict.get(key), used_dict.get(key))
        for key in _compared_fields(saved, user)
        if saved.get(key) != user_dict.get(key)
    ]
    conflicts = [row for row in rows if row.field in FORMAT_FIELDS]
    method_conflicts = [row for row in conflicts if row.field in ("load_in_4bit", "load_in_8bit")]
    conflicts = method_conflicts or conflicts  # 4-bit details are moot when the method differs
    if conflicts:
        sides = "; ".join(f"quant.{r.field}: checkpoint {r.checkpoint}, requested {r.user}" for r in conflicts)
        raise QuantizationMismatchError(
            f"{config_json} is pre-quantized with {saved_method}, which the request contradicts: {sides}"
        )
    return merged, rows


def _required_quant_state(module, qconfig) -> tuple[str, ...]:
    """Tensors bitsandbytes serializes beside a packed weight (transformers' `serialized_names`)."""
    kind = type(module).__name__
    if kind == "Linear8bitLt":
        return ("SCB",)
    if kind != "Linear4bit":
        return ()
    names = ("weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{qconfig.bnb_4bit_quant_type}")
    if qconfig.bnb_4bit_use_double_quant:
        names += ("weight.nested_absmax", "weight.nested_quant_map")
    return names


def missing_quant_state(model, tensors: dict[str, Path], qconfig, limit: int = 8) -> list[str]:
    """Quant-state tensors a pre-quantized checkpoint lacks, each named with the shard that holds its weight."""
    missing = []
    for name, module in model.named_modules():
        weight = f"{name}.weight"
        for suffix in _required_quant_state(module, qconfig):
            if weight in tensors and f"{name}.{suffix}" not in tensors:
                missing.append(f"{tensors[weight]}: tensor '{name}.{suffix}' is missing")
    return missing[:limit] + ([f"... and {len(missing) - limit} more"] if len(missing) > limit else [])


def describe_dict(config: dict) -> str:
    """`describe` for a saved `quantization_config` dict."""
    if config.get("load_in_4bit"):
        double = " (double quant)" if config.get("bnb_4bit_use_double_quant") else ""
        return f"bnb {config.get('bnb_4bit_quant_type')}{double}"
    if config.get("load_in_8bit"):
        return "bnb int8"
    return str(config.get("quant_method"))


def describe(qconfig) -> str:
    """A short human name: 'bnb nf4 (double quant)', 'bnb int8', 'none'."""
    if qconfig is None:
        return "none"
    if getattr(qconfig, "load_in_4bit", False):
        double = " (double quant)" if qconfig.bnb_4bit_use_double_quant else ""
        return f"bnb {qconfig.bnb_4bit_quant_type}{double}"
    if getattr(qconfig, "load_in_8bit", False):
        return "bnb int8"
    return str(getattr(qconfig, "quant_method", type(qconfig).__name__))
