"""The `quant` config group -> a transformers quantization config, merged with a checkpoint's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

QUANT_TYPES = ("nf4", "fp4")
TORCH_DTYPES = ("bfloat16", "float16", "float32", "float64")
STORAGE_DTYPES = ("uint8", "int8", "bfloat16", "float16", "float32")


def check_quant_fields(quant: DictConfig) -> list[str]:
    """Every problem in the `quant` group, each naming the field and the value."""
    if quant.get("_target_") != "transformers.BitsAndBytesConfig":
        return []
    problems = []
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

    return instantiate(quant, _convert_="all")


@dataclass(frozen=True)
class MergeRow:
    """One field where the checkpoint's saved quantization config and the user's differ."""

    field: str
    checkpoint: Any
    user: Any
    used: Any


def merge_with_checkpoint(saved, user) -> tuple[Any, list[MergeRow]]:
    """Merge as transformers does (`AutoHfQuantizer.merge_quantization_configs`) and list every difference."""
    from transformers.quantizers.auto import AutoHfQuantizer

    saved_dict = saved if isinstance(saved, dict) else saved.to_dict()
    merged = AutoHfQuantizer.merge_quantization_configs(dict(saved_dict), user)
    if user is None:
        return merged, []
    user_dict, used_dict = user.to_dict(), merged.to_dict()
    rows = [
        MergeRow(key, saved_dict.get(key), user_dict.get(key), used_dict.get(key))
        for key in sorted(set(saved_dict) | set(user_dict))
        if saved_dict.get(key) != user_dict.get(key)
    ]
    return merged, rows


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
