"""bitsandbytes: NF4 / FP4 (with or without double quant) and LLM.int8(), on CPU and CUDA."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from qloader.core.choices import choice_enum
from qloader.core.names import TORCH_DTYPES
from qloader.quant.base import ForwardLimit, QuantConfig, QuantMethod, WeightBytes, register_method

QUANT_TYPES = ("nf4", "fp4")
STORAGE_DTYPES = ("uint8", "int8", "bfloat16", "float16", "float32")
KERNELS = ("auto", "bnb", "fused")
"""`quant.kernel`: see `qloader.quant.bnb_kernel`."""
# bitsandbytes' 4-bit code book (16 float32) and nested-statistics layout (256-entry code, float32 offset).
CODE_4BIT_BYTES = 16 * 4
NESTED_BLOCKSIZE = 256
# Choice fields: a bad value fails while the config is composed, listing these (qloader.core.choices).
QuantType = choice_enum("QuantType", QUANT_TYPES)
ComputeDtype = choice_enum("ComputeDtype", TORCH_DTYPES)
StorageDtype = choice_enum("StorageDtype", STORAGE_DTYPES)


@dataclass
class BnbQuantConfig(QuantConfig):
    """Every field but `kernel` is a `transformers.BitsAndBytesConfig` field, under the same name."""

    _target_: str | None = "transformers.BitsAndBytesConfig"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: ComputeDtype | None = None
    """A torch dtype name (bfloat16, float16, float32); null means float32, as in transformers."""
    bnb_4bit_quant_type: QuantType = QuantType["fp4"]
    """nf4 or fp4."""
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: StorageDtype | None = None
    """A torch dtype name for the packed storage; null means uint8."""
    kernel: str = "auto"
    """CPU quantization while loading (4-bit and int8): bnb (bitsandbytes' own kernels), fused (the same
    math compiled into one loop by torch.compile; byte-identical output, several times faster, compiled
    once per machine into the qloader cache) or auto (fused when the planned elements win back its first
    call on this host). A qloader setting, not passed to the config class."""


@register_method
class Bitsandbytes(QuantMethod):
    quant_method = "bitsandbytes"
    config_class = "BitsAndBytesConfig"
    schemas = {"bnb": BnbQuantConfig}
    settings = ("kernel",)
    packages = ("bitsandbytes",)
    module = "bitsandbytes"
    module_name_fields = ("llm_int8_skip_modules",)
    disk_offload = (
        "bitsandbytes quantizes each weight in memory as it loads, and a module on disk would keep the checkpoint's "
        "unquantized weight"
    )
    format_fields = (
        "load_in_4bit",
        "load_in_8bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "bnb_4bit_quant_storage",
    )

    def check_disk_offload(self, config: Any, device_map: Any) -> str | None:
        """With llm_int8_enable_fp32_cpu_offload and an explicit map, transformers keeps the modules the map puts on
        cpu or disk unquantized: those offload as a plain model's do."""
        if getattr(config, "llm_int8_enable_fp32_cpu_offload", False) and isinstance(device_map, dict):
            return None
        return (
            f"{self.disk_offload}; to offload modules unquantized, set quant.llm_int8_enable_fp32_cpu_offload=true "
            "and write the map out with device_map=explicit"
        )

    def device_map_fix(self, config: Any, device_map: dict) -> str | None:
        """transformers' "set `llm_int8_enable_fp32_cpu_offload=True` and pass a custom `device_map`", in qloader's
        options (a map with modules on cpu beside a GPU)."""
        if config.llm_int8_enable_fp32_cpu_offload:
            return None
        return (
            "bitsandbytes quantizes the modules of a map that uses a GPU only on that GPU; give the GPU room for the "
            "whole model (raise device_map.max_memory.0), or keep the cpu modules unquantized in float32 with "
            "quant.llm_int8_enable_fp32_cpu_offload=true and the map written out as device_map=explicit "
            "'+device_map.modules={module: device, ...}'"
        )

    def check_fields(self, quant: DictConfig) -> list[str]:
        problems = []
        if quant.kernel not in KERNELS:
            problems.append(f"quant.kernel '{quant.kernel}' is not one of {', '.join(KERNELS)}")
        if quant.load_in_4bit and quant.load_in_8bit:
            problems.append(
                "quant.load_in_4bit and quant.load_in_8bit are both true; choose one (quant=bnb-nf4 or quant=bnb-int8)"
            )
        if not (quant.load_in_4bit or quant.load_in_8bit):
            problems.append(
                "quant: bitsandbytes needs quant.load_in_4bit=true or quant.load_in_8bit=true (or use quant=none)"
            )
        choices = {
            "bnb_4bit_quant_type": QUANT_TYPES,
            "bnb_4bit_compute_dtype": TORCH_DTYPES,
            "bnb_4bit_quant_storage": STORAGE_DTYPES,
        }
        for key, allowed in choices.items():
            value = quant[key]
            if value is not None and value not in allowed:
                problems.append(f"quant.{key} '{value}' is not one of {', '.join(allowed)}")
        return problems

    def describe(self, config: dict) -> str:
        if config.get("load_in_4bit"):
            double = " (double quant)" if config.get("bnb_4bit_use_double_quant") else ""
            return f"bnb {config.get('bnb_4bit_quant_type')}{double}"
        if config.get("load_in_8bit"):
            return "bnb int8"
        return "bnb"

    def compared_fields(self, saved: dict, user: dict) -> tuple[str, ...]:
        fields = BnbQuantConfig.__dataclass_fields__
        return tuple(k for k in fields if not k.startswith("_") and k not in self.settings)

    def conflicts(self, rows: list) -> list:
        conflicts = super().conflicts(rows)
        method = [row for row in conflicts if row.field in ("load_in_4bit", "load_in_8bit")]
        return method or conflicts  # 4-bit details are moot when the method differs

    def quant_state_names(self, quantizer: Any, name: str, module: Any) -> tuple[str, ...]:
        """Tensors bitsandbytes serializes beside a packed weight (transformers' `serialized_names`)."""
        config = quantizer.quantization_config
        kind = type(module).__name__
        if kind == "Linear8bitLt":
            return ("SCB",)
        if kind != "Linear4bit":
            return ()
        names = ("weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{config.bnb_4bit_quant_type}")
        if config.bnb_4bit_use_double_quant:
            names += ("weight.nested_absmax", "weight.nested_quant_map")
        return names

    def quantized_class(self, module: Any) -> str | None:
        kind = type(module).__name__
        return kind if kind in ("Linear4bit", "Linear8bitLt") else None

    def planned_bytes(self, quantizer: Any, model: Any, name: str, module: Any, param: Any) -> WeightBytes | None:
        kind = self.quantized_class(module)
        if kind is None or not name.endswith(".weight"):
            return None
        numel = param.numel()
        if kind == "Linear8bitLt":
            return WeightBytes(numel, module.out_features * 4)  # SCB: one float32 scale per row
        blocks = math.ceil(numel / module.weight.blocksize)
        if module.weight.compress_statistics:  # double quant: uint8 absmax + float32 statistics of it
            nested = math.ceil(blocks / NESTED_BLOCKSIZE)
            state = blocks + nested * 4 + NESTED_BLOCKSIZE * 4 + 4 + CODE_4BIT_BYTES
        else:
            state = blocks * 4 + CODE_4BIT_BYTES
        return WeightBytes(math.ceil(numel / 2), state)

    def forward_limit(self, quantizer: Any, model: Any, device_map: dict) -> ForwardLimit | None:
        """On a CPU with AVX512-BF16 (bitsandbytes' own test, kept per layer as `support_avx512bf16_for_cpu`),
        bitsandbytes repacks a 4-bit weight on its first inference forward: rows in blocks of `block_n`, one
        absmax per `blocksize` inputs of a row. A layer of another shape loads, but its forward fails inside."""
        block_n = cpu_repack_block_n()
        if block_n is None:
            return None
        modules = {}
        for name, module in model.named_modules():
            if self.quantized_class(module) != "Linear4bit" or placed_on(device_map, name) != "cpu":
                continue
            if not getattr(module, "support_avx512bf16_for_cpu", False):
                continue
            state = getattr(module.weight, "quant_state", None)  # loaded: the blocksize it was quantized with
            blocksize = module.weight.blocksize if state is None else state.blocksize
            if why := repack_refusal(module.out_features, module.in_features, block_n, blocksize):
                modules[name] = why
        if not modules:
            return None
        why = (
            "bitsandbytes repacks 4-bit weights for this CPU's AVX512-BF16 kernel on the first forward, which needs "
            f"out_features a multiple of {block_n} and in_features a multiple of the blocksize"
        )
        if quantizer.pre_quantized:
            fix = "the checkpoint stores them in 4-bit: run it where they go to a CUDA GPU (device_map=cuda)"
        else:
            keep = sorted({*(getattr(quantizer, "modules_to_not_convert", None) or ()), *modules})
            fix = f"to run it here, keep them unquantized: quant.llm_int8_skip_modules=[{','.join(keep)}]"
        return ForwardLimit(modules, why, fix)

    def storage_tensors(self, tensor: Any) -> Iterator[Any]:
        """The packed weight, then what bitsandbytes keeps beside it: 4-bit QuantState (nested too) or int8 SCB."""
        import torch

        yield tensor
        if (scb := getattr(tensor, "SCB", None)) is not None:
            yield scb
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                if isinstance(value := getattr(state, name, None), torch.Tensor):
                    yield value
            state = getattr(state, "state2", None)

    def loading_kernel(
        self, quant: DictConfig, model: Any = None, device_map: dict | None = None
    ) -> AbstractContextManager[Any]:
        """bitsandbytes' CPU quantization ops, fused or not (`quant.kernel`), for the load stage only."""
        from qloader.quant.bnb_kernel import quantization_kernels

        op = "int8_vectorwise_quant" if quant.load_in_8bit else "quantize_4bit"
        elements = 0 if model is None else cpu_quantized_elements(self, model, device_map or {"": "cpu"})
        return quantization_kernels(quant.kernel, elements, op, on_cpu=elements > 0)


def cpu_quantized_elements(method: QuantMethod, model: Any, device_map: dict) -> int:
    """Elements of the weights the method quantizes that are placed on the CPU (the skeleton may be on meta)."""
    return sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if method.quantized_class(module) is not None and placed_on(device_map, name) == "cpu"
    )


def placed_on(device_map: dict, name: str) -> str:
    """The device `device_map` places module `name` on (its own entry, or its closest parent's)."""
    while name and name not in device_map:
        name = name.rpartition(".")[0]
    return str(device_map.get(name, "cpu"))


def cpu_repack_block_n() -> int | None:
    """The rows per block of bitsandbytes' AVX512-BF16 CPU layout (None: this bitsandbytes does not repack)."""
    import inspect

    from bitsandbytes import functional

    repack = getattr(functional, "_convert_weight_packed_for_cpu", None)
    return None if repack is None else inspect.signature(repack).parameters["block_n"].default


def repack_refusal(out_features: int, in_features: int, block_n: int, blocksize: int) -> str | None:
    """Why bitsandbytes' CPU repacking cannot take a [out_features, in_features] 4-bit weight (None: it can)."""
    problems = []
    if out_features % block_n:
        problems.append(f"out_features {out_features} is not a multiple of {block_n}")
    if in_features % blocksize:
        problems.append(f"in_features {in_features} is not a multiple of the blocksize {blocksize}")
    return " and ".join(problems) or None
