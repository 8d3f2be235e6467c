"""The quantizer's lifecycle, in the order transformers' `get_hf_quantizer` runs it: the user's config merged
with a pre-quantized checkpoint's, the quantizer instantiated (it may change the dtype), its environment
validated, the device map updated. The stages only sequence these steps; what differs between methods comes
from their plug-in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qloader.core.errors import ConfigError, DeviceMapError, EnvironmentMismatchError
from qloader.quant.base import MergeRow, QuantMethod, _listing
from qloader.quant.merge import build_quantization_config, check_saved_config, merge_with_checkpoint
from qloader.quant.registry import method_of

log = logging.getLogger("qloader")


@dataclass(frozen=True)
class Quantization:
    """The quantization a load applies: transformers' config object (None: unquantized) and what decided it."""

    config: Any = None
    method: QuantMethod | None = None
    """The plug-in for `config` (None when unquantized); every later stage asks it, never `method_of` again."""
    pre_quantized: bool = False
    merge: list[MergeRow] = field(default_factory=list)
    """Fields where a pre-quantized checkpoint's saved config and the request differ."""
    choice: dict | None = None
    """Decisions the method took while building its config (recorded in the manifest)."""


def resolve_quantization(quant: DictConfig, device: str, hf_config: Any, config_json: Path) -> Quantization:
    """The `quant` node -> transformers' config; for a pre-quantized checkpoint, merged with its saved one as
    `AutoHfQuantizer.merge_quantization_configs` does (quant=auto: the saved one as it is), and put back on
    `hf_config` as `from_pretrained` does."""
    user = build_quantization_config(quant, device)
    saved = getattr(hf_config, "quantization_config", None)
    if saved is None:
        return _with_method(Quantization(config=user))
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    check_saved_config(saved, config_json)
    asked = not quant.get("auto", False)
    config, merge = merge_with_checkpoint(saved, user if asked else None, asked, config_json)
    hf_config.quantization_config = config
    for row in merge:
        log.warning("quant.%s: checkpoint %r, requested %r -> using %r", row.field, row.checkpoint, row.user, row.used)
    return _with_method(Quantization(config=config, pre_quantized=True, merge=merge))


def _with_method(quantization: Quantization) -> Quantization:
    method = method_of(quantization.config)
    choice = None if method is None else method.choice(quantization.config)
    return replace(quantization, method=method, choice=choice)


def add_calibration(
    quantization: Quantization, quant: DictConfig, checkpoint_path: Path, dtype: Any, device: str
) -> Quantization:
    """A method that calibrates (GPTQ), quantizing on the fly: its calibration data goes into the config now,
    before the quantizer is built; what the manifest records of it joins `choice`."""
    method = quantization.method
    if method is None or quantization.pre_quantized or not method.calibrates:
        return quantization
    calibration = method.calibration(quantization.config, quant, checkpoint_path, dtype, device)
    return replace(quantization, choice={**(quantization.choice or {}), **(calibration or {})} or None)


def instantiate_quantizer(quantization: Quantization, dtype: Any, hf_config: Any) -> tuple[Any, Any, Any]:
    """transformers' quantizer, the dtype it asks for (a method may refuse or change it), and the config with the
    quantizer's attention implementation; (None, dtype, hf_config) when unquantized."""
    if quantization.config is None:
        return None, dtype, hf_config
    from transformers.quantizers.auto import AutoHfQuantizer

    method = quantization.method
    if method.pre_quantized_only and not quantization.pre_quantized:
        raise ConfigError([_not_pre_quantized(method, hf_config)])
    method.prepare_backend()
    try:
        quantizer = AutoHfQuantizer.from_config(quantization.config, pre_quantized=quantization.pre_quantized)
        dtype = quantizer.update_dtype(dtype)  # a method may refuse the dtype (higgs and fp32)
    except ValueError as e:
        raise ConfigError([f"quantization config: {e}"]) from e
    return quantizer, dtype, quantizer.update_attn_implementation(hf_config)


def _not_pre_quantized(method: QuantMethod, hf_config: Any) -> str:
    """What transformers says as `pass pre_quantized=True`, an argument qloader has no option for."""
    folder = getattr(hf_config, "name_or_path", "") or "the checkpoint"
    return (
        f"quant {method.quant_method} loads pre-quantized checkpoints only (a config.json whose quantization_config "
        f"names {method.quant_method}), and {folder} is not one: transformers cannot quantize with "
        f"{method.quant_method} while loading; to quantize this checkpoint use another method ({method.instead}), or "
        f"load a checkpoint saved in {method.quant_method} format (model=local model.path=DIR)"
    )


def check_host(quantization: Quantization, cuda_devices: int) -> None:
    """Can this host run the method at all: the plug-in's own check (a device it needs, its package)."""
    method = quantization.method
    if method is not None and (why := method.check_environment(quantization.config, cuda_devices)):
        raise EnvironmentMismatchError(f"quant {method.quant_method}: {why}")


def validate_quantizer(quantization: Quantization, quantizer: Any, device_map: Any) -> None:
    """transformers' own environment check of the quantizer, for the requested device map."""
    method = quantization.method
    if method is None:
        return
    try:
        quantizer.validate_environment(device_map=device_map, weights_only=True)
    except (ImportError, ValueError, RuntimeError, NotImplementedError) as e:  # ModuleNotFoundError too
        raise EnvironmentMismatchError(
            f"quant {method.quant_method} ({type(quantizer).__name__}) cannot run here: "
            f"{type(e).__name__}: {str(e).strip()}; use {method.instead}"
        ) from e


def update_device_map(quantizer: Any, request: Any) -> Any:
    """The device map request as the quantizer adjusts it (transformers' `update_device_map`)."""
    return request if quantizer is None else quantizer.update_device_map(request)


def validate_device_map(quantizer: Any, request: Any, final: dict, quantization: Quantization | None = None) -> None:
    """The quantizer's check of the inferred map (bitsandbytes refuses CPU or disk entries it cannot run); its
    refusal in qloader's terms when the method's plug-in gives them (transformers' names its own API)."""
    if quantizer is None:
        return
    try:
        quantizer.validate_environment(device_map=final)
    except ValueError as e:
        config = quantizer.quantization_config if quantization is None else quantization.config
        raise DeviceMapError(_device_map_refusal(request, final, e, config)) from e


def _device_map_refusal(request: Any, final: dict, error: ValueError, config: Any) -> str:
    method = method_of(config)
    placed: dict[str, list[str]] = {}
    for module, device in final.items():
        placed.setdefault(f"cuda:{device}" if isinstance(device, int) else str(device), []).append(
            module or "(the whole model)"
        )
    where = "; ".join(f"{_listing(sorted(modules))} on {device}" for device, modules in placed.items())
    if method is not None and (fix := method.device_map_fix(config, final)):
        return f"device_map '{request}' places {where}: quant {method.quant_method} refuses it: {fix}"
    return f"device_map '{request}' -> {final}: {error}"


def disk_offload_refusal(quantization: Quantization, request: Any) -> str | None:
    """'quant X cannot offload to disk: why' when the method cannot have modules on disk with this device map
    request; None when it can (an unquantized load can)."""
    method = quantization.method
    if method is None or (why := method.check_disk_offload(quantization.config, request)) is None:
        return None
    return f"quant {method.quant_method} cannot offload to disk: {why}"


def unmatched_module_names(quantization: Quantization, model: Any) -> list[str]:
    """One warning per name in the method's skip lists (`module_name_fields`) that matches no module of `model`, as
    transformers matches them (`should_convert_module`): a typo that silently keeps nothing, and, since a list
    replaces transformers' default skips, quantizes what the default kept."""
    import difflib

    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    method = quantization.method
    if method is None or quantization.pre_quantized:
        return []
    names = [name for name, _ in model.named_modules() if name]
    known = sorted({*names, *(name.rsplit(".", 1)[-1] for name in names)})
    names += [name for name, _ in model.named_parameters()]  # some quantizers match parameter names too (torchao)
    lines = []
    for field_name in method.module_name_fields:
        patterns = list(getattr(quantization.config, field_name, None) or [])
        unmatched = [pattern for pattern in patterns if not _matches_a_module(pattern, names, should_convert_module)]
        for pattern in unmatched:
            near = difflib.get_close_matches(pattern, known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            lines.append(f"quant.{field_name}: '{pattern}' matches no module of {type(model).__name__}{hint}")
        defaults = get_keys_to_not_convert(model)
        dropped = [k for k in defaults if _is_linear(model, k) and should_convert_module(k, patterns)]
        if unmatched and dropped:
            lines[-1] += (
                f" (the list replaces transformers' default skips: {', '.join(sorted(dropped))}, which the default "
                "keeps unquantized, is no longer skipped)"
            )
    return lines


def _matches_a_module(pattern: str, names: list[str], should_convert_module: Any) -> bool:
    import re

    try:
        return any(not should_convert_module(name, [pattern]) for name in names)
    except re.error:  # not a valid regex: transformers' own match would fail on it too
        return False


def _is_linear(model: Any, name: str) -> bool:
    from torch import nn

    try:
        return isinstance(model.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def not_converted(name: str, quantizer: Any) -> bool:
    """The module is on the quantizer's `modules_to_not_convert` (transformers' own pattern matching)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = getattr(quantizer, "modules_to_not_convert", None)
    return bool(patterns) and not should_convert_module(name, patterns)
