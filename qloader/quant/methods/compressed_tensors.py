"""compressed-tensors: pre-quantized checkpoints (W4A16 / W8A16 pack-quantized, naive int / float formats).

transformers loads such a checkpoint compressed: each quantized Linear keeps the stored tensors
(`weight_packed`, `weight_scale`, `weight_shape`, a `weight_zero_point` when asymmetric) and a
forward pre-hook decompresses the whole model to the skeleton's dtype on the first forward pass.
The skeleton already holds the stored layout, so the plan counts its parameters as they are.
Nothing is quantized on the fly: a request (`quant=compressed-tensors`) only sets the loading
attributes of a pre-quantized checkpoint (`dequantize`, `use_optimized_inference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from qloader.quant.base import QuantConfig, QuantMethod, WeightBytes, register_method

# Attributes transformers lets a request change on a pre-quantized checkpoint (`get_loading_attributes`).
LOADING_ATTRIBUTES = {"dequantize": False, "use_optimized_inference": False}


@dataclass
class CompressedTensorsQuantConfig(QuantConfig):
    """The loading attributes of `transformers.CompressedTensorsConfig`, under the same names."""

    _target_: str | None = "transformers.CompressedTensorsConfig"
    dequantize: bool = False
    """Dequantize every weight while loading (a dense model) instead of keeping the stored layout."""
    use_optimized_inference: bool = False
    """FP8 kernels where the hardware has them (CUDA SM89+); ignored elsewhere."""


def _bits(args: dict | None) -> str:
    if not args:
        return "16"
    kind = "FP" if args.get("type") == "float" else ""
    return f"{kind}{args.get('num_bits')}"


def _scheme_name(group: dict) -> str:
    """W4A16, W8A16, W8A8, WFP8AFP8 ... from one config group's weights and input activations."""
    return f"W{_bits(group.get('weights'))}A{_bits(group.get('input_activations'))}"


def _honouring_tqdm_disable(bar: Any) -> Any:
    """`bar` (tqdm), disabled whenever TQDM_DISABLE is set, as tqdm reads it (any non-empty value)."""
    import os

    def start(*args: Any, disable: bool | None = False, **kwargs: Any) -> Any:
        return bar(*args, disable=True if os.environ.get("TQDM_DISABLE") else disable, **kwargs)

    start.honours_tqdm_disable = True
    return start


@register_method
class CompressedTensors(QuantMethod):
    quant_method = "compressed-tensors"
    config_class = "CompressedTensorsConfig"
    schemas = {"compressed_tensors": CompressedTensorsQuantConfig}
    packages = ("compressed-tensors",)
    module = "compressed_tensors"
    extra = "compressed-tensors"
    format_fields = ("config_groups", "format", "ignore", "kv_cache_scheme", "quantization_status")
    pre_quantized_only = True
    disk_offload = (
        "compressed-tensors runs its layers from memory; a model with modules on disk fails its first forward "
        "pass in transformers"
    )

    def prepare_backend(self) -> None:
        """compressed-tensors passes `disable=` to its "Applying quantization config" bar, which overrides tqdm's
        TQDM_DISABLE: that bar honours it again (process-wide; set at import time, read when a bar starts)."""
        from compressed_tensors.quantization.lifecycle import apply

        if not getattr(apply.tqdm, "honours_tqdm_disable", False):
            apply.tqdm = _honouring_tqdm_disable(apply.tqdm)

    def config_dict(self, config: Any) -> dict:
        """`to_dict()` holds only the stored format; the loading attributes are compared (and recorded) too."""
        found = dict(config) if isinstance(config, dict) else config.to_dict()
        if isinstance(config, dict):
            return {**LOADING_ATTRIBUTES, **found}
        return {**found, **config.get_loading_attributes()}

    def describe(self, config: dict) -> str:
        groups = config.get("config_groups") or {}
        schemes = sorted({_scheme_name(g) for g in groups.values() if isinstance(g, dict)}) or ["(no scheme)"]
        formats = sorted({str(g.get("format") or config.get("format")) for g in groups.values() if isinstance(g, dict)})
        details = [", ".join(formats)] if formats else []
        if config.get("dequantize"):
            details.append("dequantized on load")
        return f"compressed-tensors {' + '.join(schemes)}" + (f" ({'; '.join(details)})" if details else "")

    def check_fields(self, quant: DictConfig) -> list[str]:
        return []

    # ---------------------------------------------------------------- the skeleton and the checkpoint

    def _scheme(self, quantizer: Any, name: str, module: Any) -> tuple[Any, str | None]:
        """The module's quantization scheme and storage format; (None, None) when it is not quantized."""
        scheme = getattr(module, "quantization_scheme", None)
        config = quantizer.quantization_config.quantization_config
        if config is None:
            return None, None
        if scheme is None and quantizer.quantization_config.dequantize:  # dense skeleton: match the config's targets
            from compressed_tensors.utils import is_match

            groups = list(config.config_groups.values())
            scheme = next((g for g in groups if is_match(name, module, g.targets, config.ignore or ())), None)
        if scheme is None:
            return None, None
        fmt = getattr(scheme, "format", None) or config.format
        return scheme, str(getattr(fmt, "value", fmt))

    def quant_state_names(self, quantizer: Any, name: str, module: Any) -> tuple[str, ...]:
        """The tensors the module's compressor stores (`compression_param_names`), beside or instead of `weight`."""
        scheme, fmt = self._scheme(quantizer, name, module)
        if scheme is None or fmt in (None, "dense"):
            return ()
        from compressed_tensors.compressors import BaseCompressor

        compressor = BaseCompressor.get_value_from_registry(fmt)
        return tuple(n for n in compressor.compression_param_names(scheme) if n != "weight")

    def quantized_class(self, module: Any) -> str | None:
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            return None
        fmt = getattr(scheme, "format", None)
        return f"{type(module).__name__}({getattr(fmt, 'value', fmt) or 'quantized'})"

    def planned_bytes(self, quantizer: Any, model: Any, name: str, module: Any, param: Any) -> WeightBytes | None:
        """The skeleton already holds the stored tensors (`weight_packed` int32, scales, `weight_shape`): their bytes
        as they are, the packed weight as quantized data and the rest as quant state."""
        module_name, _, tensor = name.rpartition(".")
        if getattr(module, "quantization_scheme", None) is None or not quantizer.pre_quantized:
            return None  # a dense skeleton (decompressed on load) is counted as it is
        scheme, fmt = self._scheme(quantizer, module_name, module)
        if scheme is None or fmt in (None, "dense"):
            return None
        stored = param.numel() * param.element_size()
        if tensor == "weight_packed" or (tensor == "weight" and not param.dtype.is_floating_point):
            return WeightBytes(stored, 0)
        return WeightBytes(0, stored) if tensor in self.quant_state_names(quantizer, module_name, module) else None

    # ---------------------------------------------------------------- the loaded model

    def check_save(self, quant: DictConfig) -> str | None:
        return None

    def save_note(self, model: Any) -> str | None:
        """What `save_pretrained` writes for this model as it is now: the stored layout until the first forward
        pass, a decompressed checkpoint after it (compressed-tensors decompresses the whole model then)."""
        from compressed_tensors.quantization import QuantizationStatus

        statuses = {
            getattr(m, "quantization_status", None) for m in model.modules() if hasattr(m, "quantization_scheme")
        }
        if not statuses:
            return None
        if QuantizationStatus.DECOMPRESSED in statuses:
            dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
            return (
                f"compressed-tensors decompressed the weights on the first forward pass: save writes a decompressed "
                f"{dtype} checkpoint (quantization_status 'decompressed'), not the compressed layout it loaded"
            )
        return "compressed-tensors: save writes the compressed layout as loaded"
