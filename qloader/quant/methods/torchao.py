"""torchao: int8 weight-only, int8 dynamic-activation, float8 weight-only and int4 weight-only.

The torchao config object is declared in YAML with its own `_target_` (`quant.quant_type`), so
every field of it is an override too (`quant.quant_type.group_size=64`). Loaded weights are torchao
tensor subclasses (`Int8Tensor`, `Float8Tensor`, `Int4OpaqueTensor`): their storage is their inner
tensors, which the base protocol's helpers measure, hash and check.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig

from qloader.quant.base import QuantConfig, QuantMethod, WeightBytes, linear_only, register_method

# Short names for the manifest and the sweep table; other torchao configs go by their class name.
NAMES = {
    "Int8WeightOnlyConfig": "int8 weight-only",
    "Int8DynamicActivationInt8WeightConfig": "int8 dynamic activation, int8 weight",
    "Float8WeightOnlyConfig": "float8 weight-only",
    "PrototypeInt4WeightOnlyConfig": "int4 weight-only (CPU)",
    "Int4WeightOnlyConfig": "int4 weight-only",
}
INT4_GROUP_SIZES = (32, 64, 128, 256)
"""The group sizes torchao's int4 weight-only configs take."""
# Configs whose models torchao 0.18 cannot serialize (no safetensors support for their tensors).
UNSAVEABLE = ("PrototypeInt4WeightOnlyConfig",)


@dataclass
class TorchaoQuantConfig(QuantConfig):
    """Every field but `cuda_quant_type` is a `transformers.TorchAoConfig` field, under the same name."""

    _target_: str | None = "transformers.TorchAoConfig"
    quant_type: Any = MISSING
    """The torchao config, with its own `_target_` (e.g. torchao.quantization.Int8WeightOnlyConfig)."""
    cuda_quant_type: Any = None
    """A qloader setting: the torchao config used instead of quant_type when the weights go to a CUDA
    device (torchao-int4: Int4WeightOnlyConfig on CUDA, the CPU int4 config elsewhere)."""
    modules_to_not_convert: list[str] | None = None
    include_input_output_embeddings: bool = False
    untie_embedding_weights: bool = False


def _class_name(node: Any) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(node, DictConfig) else ""


@register_method
class Torchao(QuantMethod):
    quant_method = "torchao"
    config_class = "TorchAoConfig"
    schemas = {"torchao": TorchaoQuantConfig}
    settings = ("cuda_quant_type",)
    packages = ("torchao",)
    module = "torchao"
    extra = "torchao"
    format_fields = ("quant_type",)
    module_name_fields = ("modules_to_not_convert",)
    disk_offload = (
        "torchao quantizes each weight in memory as it loads; transformers' torchao loader fails on a map with "
        "modules on disk"
    )

    def check_fields(self, quant: DictConfig) -> list[str]:
        if not _class_name(quant.quant_type):
            return ["quant.quant_type needs a torchao config with its `_target_` (e.g. quant=torchao-int8wo)"]
        return []

    def build_config(self, quant: DictConfig, device: str) -> Any:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        node = OmegaConf.masked_copy(quant, [key for key in quant if key not in self.settings])
        if device == "cuda" and quant.cuda_quant_type is not None:
            node.quant_type = quant.cuda_quant_type
        return instantiate(node, _convert_="all")

    def choice(self, config: Any) -> dict | None:
        kind = type(config.quant_type)
        return {"quant_type": f"{kind.__module__}.{kind.__name__}"}

    def describe(self, config: dict) -> str:
        quant_type = config.get("quant_type")
        if isinstance(quant_type, dict):  # to_dict(): {"default": {"_type": "Int8WeightOnlyConfig", ...}}
            quant_type = (quant_type.get("default") or {}).get("_type", quant_type.get("_type"))
        elif not isinstance(quant_type, str):
            quant_type = type(quant_type).__name__
        return f"torchao {NAMES.get(quant_type, quant_type)}"

    def compared_fields(self, saved: dict, user: dict) -> tuple[str, ...]:
        return ("quant_type", "modules_to_not_convert", "include_input_output_embeddings", "untie_embedding_weights")

    def quant_state_names(self, quantizer: Any, name: str, module: Any) -> tuple[str, ...]:
        """The inner tensors torchao wrote for this module's weight (`_weight_qdata`, `_weight_scale`, ...),
        as the checkpoint's own safetensors metadata lists them."""
        meta = (getattr(quantizer, "metadata", None) or {}).get(f"{name}.weight")
        if meta is None:
            return ()
        try:
            names = json.loads(meta).get("_tensor_data_names") or []
        except (TypeError, ValueError):
            return ()
        return tuple(f"_weight_{inner}" for inner in names)

    def quantized_class(self, module: Any) -> str | None:
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(type(weight), "__tensor_flatten__"):
            return None
        return f"{type(module).__name__}({type(weight).__name__})"

    def planned_bytes(self, quantizer: Any, model: Any, name: str, module: Any, param: Any) -> WeightBytes | None:
        if not quantizer.param_needs_quantization(model, name):  # pre-quantized too: torchao swaps no module,
            return None  # the checkpoint's quantized tensor takes the Linear weight's place
        rows, cols = param.shape[0], math.prod(param.shape[1:])
        config = quantizer.quantization_config.quant_type
        kind = type(config).__name__
        if kind in ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig"):
            block_rows, block_cols = _block(config.granularity, rows, cols)
            blocks = math.ceil(rows / block_rows) * math.ceil(cols / block_cols)
            return WeightBytes(rows * cols, blocks * (4 + 1))  # float32 scale + int8 zero point per block
        if kind == "Float8WeightOnlyConfig":
            return WeightBytes(rows * cols, rows * 4)  # float32 scale per row
        if kind in ("PrototypeInt4WeightOnlyConfig", "Int4WeightOnlyConfig"):
            if cols % config.group_size:  # torchao leaves such weights as they are
                return None
            scales = rows * (cols // config.group_size) * 2 * param.element_size()  # scale and zero point
            return WeightBytes(math.ceil(rows * cols / 2), scales)
        size = quantizer.quantized_element_size or param.element_size()  # transformers' own estimate
        return WeightBytes(math.ceil(rows * cols * size), 0)

    def nothing_quantized(self, quantizer: Any, model: Any) -> str | None:
        if why := linear_only("torchao", model):
            return why
        group = getattr(quantizer.quantization_config.quant_type, "group_size", None)
        widths = sorted({m.in_features for m in model.modules() if type(m).__name__ == "Linear"})
        if not isinstance(group, int) or not widths or any(width % group == 0 for width in widths):
            return None
        fits = [size for size in INT4_GROUP_SIZES if all(width % size == 0 for width in widths)]
        fix = f"use group_size={fits[-1]}" if fits else "use quant=torchao-int8wo (no int4 group size divides them)"
        return (
            f"the int4 group_size {group} divides no Linear layer's in_features ({', '.join(map(str, widths))}), and "
            f"torchao leaves such weights as they are; {fix} (quant.quant_type.group_size)"
        )

    def check_save(self, quant: DictConfig) -> str | None:
        if (kind := _class_name(quant.quant_type)) in UNSAVEABLE:
            return f"torchao cannot serialize {kind} models (CPU int4); use quant=torchao-int8wo to save"
        return None


def _block(granularity: Any, rows: int, cols: int) -> tuple[int, int]:
    """The (rows, cols) block one scale covers: per row (the default), per tensor, or per group."""
    kind = type(granularity).__name__
    if kind == "PerTensor":
        return rows, cols
    if kind == "PerGroup":
        return 1, granularity.group_size
    return 1, cols
