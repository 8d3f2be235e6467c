"""The `quant` node -> a transformers quantization config, merged with a pre-quantized checkpoint's own.

Method-agnostic: what differs between methods comes from their plug-in (`qloader.quant.registry`).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qloader.core.errors import CheckpointError, EnvironmentMismatchError, QuantizationMismatchError
from qloader.quant.base import MergeRow
from qloader.quant.registry import method_for_target, method_of

MERGE_WARNING = r"You passed `quantization_config` or equivalent parameters to `from_pretrained`"
"""transformers' warning on every merge (`AutoHfQuantizer.merge_quantization_configs`), in terms of its own API."""


def check_quant_fields(quant: DictConfig) -> list[str]:
    """Every problem in the `quant` group, each naming the field and the value."""
    method = method_for_target(quant.get("_target_"))
    return [] if method is None else method.check_fields(quant)


def check_backend(quant: DictConfig) -> None:
    """The method's library must be installed: one line naming the extra that installs it."""
    method = method_for_target(quant.get("_target_"))
    if method is None or method.module is None or importlib.util.find_spec(method.module) is not None:
        return
    extra = f"pip install 'qloader[{method.extra}]'" if method.extra else f"pip install {method.packages[0]}"
    raise EnvironmentMismatchError(
        f"quant={method.quant_method} needs the '{method.module}' package, which is not installed; run: {extra}"
    )


def build_quantization_config(quant: DictConfig, device: str = "cpu") -> Any:
    """Instantiate the `_target_` class (e.g. transformers.BitsAndBytesConfig); None for quant=none."""
    method = method_for_target(quant.get("_target_"))
    if method is None:
        return None
    # `auto` is qloader's (whether a pre-quantized checkpoint's own config wins), never the config class's; choice
    # fields reach the config class as the plain strings YAML holds, not as the schema's Enum members
    plain = OmegaConf.to_container(quant, enum_to_str=True)
    return method.build_config(OmegaConf.create({k: v for k, v in plain.items() if k != "auto"}), device)


def check_saved_config(saved: dict, config_json: Path) -> None:
    """A checkpoint's `quantization_config` must name a method transformers can load."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AutoHfQuantizer

    try:
        supported = AutoHfQuantizer.supports_quant_method(saved)
    except ValueError:
        supported = False
    if not supported:
        known = ", ".join(
            sorted({str(m).removesuffix("_4bit").removesuffix("_8bit") for m in AUTO_QUANTIZATION_CONFIG_MAPPING})
        )
        raise CheckpointError(
            f"{config_json}: quantization_config.quant_method '{saved.get('quant_method')}' is not a method "
            f"transformers can load (known: {known})"
        )
    _check_saved_fields(saved, config_json)


def _check_saved_fields(saved: dict, config_json: Path) -> None:
    """Its fields typed as transformers' config class checks them (`load_in_4bit` must be a boolean, ...): one
    line naming config.json and the field, not a TypeError from deep inside the merge."""
    from transformers.quantizers.auto import AutoQuantizationConfig

    try:
        with warnings.catch_warnings():  # what it warns about, the merge that follows warns about
            warnings.simplefilter("ignore")
            AutoQuantizationConfig.from_dict(dict(saved))
    except TypeError as e:
        raise CheckpointError(
            f"{config_json}: quantization_config: {' '.join(str(e).split())}; restore config.json from the model's "
            "source (the file is damaged or was edited)"
        ) from e


def merge_with_checkpoint(saved: dict, user, user_asked: bool, config_json: Path) -> tuple[Any, list[MergeRow]]:
    """Merge as transformers does (`AutoHfQuantizer.merge_quantization_configs`) and list every difference.

    A request that contradicts how the checkpoint's weights are stored is an error naming both sides.
    """
    from transformers.quantizers.auto import AutoHfQuantizer

    saved_method = describe(saved)
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
    method = method_of(saved_config)
    with warnings.catch_warnings():  # "the quantization_config from the model will be used": qloader reports the
        warnings.filterwarnings("ignore", message=MERGE_WARNING)  # merge itself, field by field, or refuses it
        merged = AutoHfQuantizer.merge_quantization_configs(dict(saved), user)
    saved_dict, user_dict, used_dict = method.config_dict(saved), method.config_dict(user), method.config_dict(merged)
    rows = [
        MergeRow(key, saved_dict.get(key), user_dict.get(key), used_dict.get(key))
        for key in method.compared_fields(saved_dict, user_dict)
        if saved_dict.get(key) != user_dict.get(key)
    ]
    if conflicts := method.conflicts(rows):
        sides = "; ".join(f"quant.{r.field}: checkpoint {r.checkpoint}, requested {r.user}" for r in conflicts)
        raise QuantizationMismatchError(
            f"{config_json} is pre-quantized with {saved_method}, which the request contradicts: {sides}"
        )
    return merged, rows


def missing_quant_state(model, tensors: dict[str, Path], quantizer, limit: int = 8) -> list[str]:
    """Quant-state tensors a pre-quantized checkpoint lacks, each named with the shard that holds its module's
    weight (or the module's first tensor that is there). Read from the headers: nothing is materialized."""
    method = method_of(quantizer.quantization_config)
    missing = []
    for name, module in model.named_modules():
        names = method.quant_state_names(quantizer, name, module)
        present = [f"{name}.{s}" for s in ("weight", *names) if f"{name}.{s}" in tensors]
        for suffix in names if present else ():
            if f"{name}.{suffix}" not in tensors:
                missing.append(f"{tensors[present[0]]}: tensor '{name}.{suffix}' is missing")
    return missing[:limit] + ([f"... and {len(missing) - limit} more"] if len(missing) > limit else [])


def describe(config: Any) -> str:
    """A short human name: 'bnb nf4 (double quant)', 'torchao int8 weight-only', 'none'."""
    method = method_of(config)
    if method is None:
        return "none"
    return method.describe(method.config_dict(config))
