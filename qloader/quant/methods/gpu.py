"""Methods that need a GPU (or a package transformers 5.2x cannot use): fine-grained fp8, fbgemm fp8, mxfp4,
HIGGS, FP-Quant, EETQ and HQQ.

Each schema's fields are exactly its transformers config class's `__init__` arguments, under the same
names and defaults (tuples as lists), so every field is an override (`quant.weight_block_size=[64,64]`).
On a host without what a method needs, `validate` refuses it in one line before any shard is read,
naming the method, what it needs and what to use instead; transformers' own `validate_environment`
then covers what a GPU host may still lack (a package, a device map with CPU entries).

HQQ: transformers 5.2x has no loading path for it (its quantizer lacks `get_quantize_ops`, so every
load ends in NotImplementedError), and `HqqConfig()` itself raises ImportError without the hqq
package: qloader refuses it on every host, in `resolve` when its config cannot be built, else in `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from qloader.quant.base import QuantConfig, QuantMethod

FOUR_BIT_INSTEAD = "quant=bnb-nf4 or quant=torchao-int4"
EIGHT_BIT_INSTEAD = "quant=bnb-int8 or quant=torchao-int8wo"
HQQ_REFUSAL = f"transformers 5.2x refuses HQQ on every device; use {FOUR_BIT_INSTEAD}"
HIGGS_REFUSAL = (
    "transformers 5.2x cannot quantize HIGGS while loading, on any device (it reads only pre-quantized HIGGS "
    f"checkpoints, on a CUDA GPU with flute-kernel and fast-hadamard-transform); use {FOUR_BIT_INSTEAD}"
)


# ---------------------------------------------------------------- schemas: transformers' __init__ fields


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


@dataclass
class FbgemmFp8QuantConfig(QuantConfig):
    """Every field is a `transformers.FbgemmFp8Config` field, under the same name."""

    _target_: str | None = "transformers.FbgemmFp8Config"
    activation_scale_ub: float = 1200.0
    modules_to_not_convert: list[str] | None = None


@dataclass
class Mxfp4QuantConfig(QuantConfig):
    """Every field is a `transformers.Mxfp4Config` field, under the same name."""

    _target_: str | None = "transformers.Mxfp4Config"
    modules_to_not_convert: list[str] | None = None
    dequantize: bool = False
    """Load a pre-quantized mxfp4 checkpoint as bf16 (on any device)."""


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


@dataclass
class FpQuantQuantConfig(QuantConfig):
    """Every field is a `transformers.FPQuantConfig` field, under the same name."""

    _target_: str | None = "transformers.FPQuantConfig"
    forward_dtype: str = "nvfp4"
    """nvfp4 or mxfp4."""
    forward_method: str = "abs_max"
    """abs_max, or quest (mxfp4 only)."""
    backward_dtype: str = "bf16"
    store_master_weights: bool = False
    hadamard_group_size: int | None = None
    """null: 16 for nvfp4, 32 for mxfp4."""
    pseudoquantization: bool = False
    """Triton emulation instead of qutlass' Blackwell kernels (no speed-up)."""
    transform_init: str = "hadamard"
    modules_to_not_convert: list[str] | None = None
    """null: ['lm_head'], as in transformers."""


@dataclass
class EetqQuantConfig(QuantConfig):
    """Every field is a `transformers.EetqConfig` field, under the same name."""

    _target_: str | None = "transformers.EetqConfig"
    weights: str = "int8"
    """int8 (the only value EETQ supports)."""
    modules_to_not_convert: list[str] | None = None


@dataclass
class HqqQuantConfig(QuantConfig):
    """Every field is a `transformers.HqqConfig` field, under the same name."""

    _target_: str | None = "transformers.HqqConfig"
    nbits: int = 4
    group_size: int = 64
    view_as_float: bool = False
    axis: int | None = None
    dynamic_config: Any = None
    """A dict (layer tag -> hqq quant params) or null; typed Any as HiggsQuantConfig.tune_metadata is."""
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])


# ---------------------------------------------------------------- the shared behaviour


class DeviceMethod(QuantMethod):
    """A method that runs only where `needs` holds: refused on a host without a CUDA device, and on a GPU below
    `min_capability` (there transformers would quietly load fp8 weights unquantized, or fail later)."""

    min_capability: tuple[int, int] | None = None
    """Lowest CUDA compute capability, checked on the current device as transformers does; None: any."""
    quantized_prefixes: tuple[str, ...] = ()
    """Class-name prefixes of the modules the quantizer swaps in (the inventory counts them)."""
    scale_suffixes: tuple[str, ...] = ()
    """State names the quantize op adds beside a module's `weight` while quantizing on the fly."""
    choices: dict[str, tuple[Any, ...]] = {}
    """Fields with a closed set of values, as the config class's own check lists them."""

    def check_fields(self, quant: DictConfig) -> list[str]:
        problems = []
        for key, allowed in self.choices.items():
            if quant[key] not in allowed:
                problems.append(f"quant.{key} '{quant[key]}' is not one of {', '.join(map(str, allowed))}")
        return problems

    def build_config(self, quant: DictConfig, device: str) -> Any:
        """The config class's own checks (ValueError) become a ConfigError, a missing package (ImportError)
        the method's one-line refusal, rather than Hydra's instantiation traceback."""
        from qloader.core.errors import ConfigError, EnvironmentMismatchError

        try:
            return super().build_config(quant, device)
        except Exception as e:  # Hydra raises InstantiationException from the constructor's error
            cause = e.__cause__ if e.__cause__ is not None else e
            if isinstance(cause, ImportError):
                raise EnvironmentMismatchError(f"quant {self.quant_method}: {self.refusal(None)}") from e
            if isinstance(cause, (ValueError, TypeError)):
                raise ConfigError([f"quant ({self.config_class}): {str(cause).strip()}"]) from e
            raise

    def refusal(self, config: Any) -> str:
        return f"needs {self.needs}, and this host has no CUDA device; use {self.instead}"

    def check_environment(self, config: Any, cuda_devices: int) -> str | None:
        if getattr(config, "dequantize", False):  # transformers dequantizes to bf16 on any device
            return None
        if cuda_devices == 0:
            return self.refusal(config)
        if self.min_capability is not None:
            import torch

            have = torch.cuda.get_device_capability()
            if have < self.min_capability:
                return (
                    f"needs {self.needs}, and this host's {torch.cuda.get_device_name()} has compute capability "
                    f"{have[0]}.{have[1]}; use {self.instead}"
                )
        return None

    def quantized_class(self, module: Any) -> str | None:
        kind = type(module).__name__
        return kind if self.quantized_prefixes and kind.startswith(self.quantized_prefixes) else None

    def created_keys(self, model: Any) -> set[str]:
        """The scales the quantize op writes beside each weight it quantizes (none is in a plain checkpoint)."""
        return {
            f"{name}.{suffix}"
            for name, module in model.named_modules()
            if self.quantized_class(module)
            for suffix in self.scale_suffixes
            if suffix in dict(module.named_parameters(recurse=False))
        }


# ---------------------------------------------------------------- the methods


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


class FbgemmFp8(DeviceMethod):
    quant_method = "fbgemm_fp8"
    config_class = "FbgemmFp8Config"
    schemas = {"fbgemm_fp8": FbgemmFp8QuantConfig}
    packages = ("fbgemm-gpu-genai",)
    needs = "a CUDA GPU with compute capability >= 9.0 (Hopper) and fbgemm-gpu-genai"
    min_capability = (9, 0)
    instead = "quant=torchao-fp8wo"
    quantized_prefixes = ("FbgemmFp8",)
    scale_suffixes = ("weight_scale", "gate_up_proj_scale", "down_proj_scale")

    def describe(self, config: dict) -> str:
        return "fbgemm fp8 (per-row)"


class Mxfp4(DeviceMethod):
    quant_method = "mxfp4"
    config_class = "Mxfp4Config"
    schemas = {"mxfp4": Mxfp4QuantConfig}
    packages = ("triton", "kernels")
    needs = "a CUDA GPU with compute capability >= 7.5, triton >= 3.4 and kernels (it quantizes GPT-OSS experts only)"
    min_capability = (7, 5)
    instead = FOUR_BIT_INSTEAD
    quantized_prefixes = ("Mxfp4GptOssExperts",)

    def describe(self, config: dict) -> str:
        return "mxfp4" + (" (dequantized)" if config.get("dequantize") else "")


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


class FpQuant(DeviceMethod):
    quant_method = "fp_quant"
    config_class = "FPQuantConfig"
    schemas = {"fp_quant": FpQuantQuantConfig}
    packages = ("fp-quant", "qutlass")
    needs = "a CUDA GPU with fp-quant >= 0.3.2: Blackwell with qutlass, or quant.pseudoquantization=true (Triton)"
    instead = FOUR_BIT_INSTEAD
    format_fields = ("forward_dtype", "forward_method", "hadamard_group_size", "transform_init")
    quantized_prefixes = ("FPQuantLinear",)
    choices = {
        "forward_dtype": ("nvfp4", "mxfp4"),
        "forward_method": ("abs_max", "quest"),
        "backward_dtype": ("bf16", "mxfp8", "mxfp4"),
        "transform_init": ("hadamard", "identity", "gsr"),
    }

    def describe(self, config: dict) -> str:
        return f"fp-quant {config.get('forward_dtype')}" + (" (pseudo)" if config.get("pseudoquantization") else "")


class Eetq(DeviceMethod):
    quant_method = "eetq"
    config_class = "EetqConfig"
    schemas = {"eetq": EetqQuantConfig}
    packages = ("kernels",)  # transformers 5.x runs EETQ through the Hub's quantization-eetq kernels
    needs = "a CUDA GPU and the kernels package (EETQ's int8 kernels come from the Hugging Face Hub)"
    instead = EIGHT_BIT_INSTEAD
    format_fields = ("weights",)
    quantized_prefixes = ("EetqLinear",)
    scale_suffixes = ("weight_scales",)
    choices = {"weights": ("int8",)}

    def describe(self, config: dict) -> str:
        return f"eetq {config.get('weights')}"


class Hqq(DeviceMethod):
    quant_method = "hqq"
    config_class = "HqqConfig"
    schemas = {"hqq": HqqQuantConfig}
    packages = ("hqq",)
    needs = "a transformers release that can load HQQ (5.2x cannot, on any device) and hqq >= 0.2.1"
    instead = FOUR_BIT_INSTEAD
    quantized_prefixes = ("HQQLinear",)

    def refusal(self, config: Any) -> str:
        return HQQ_REFUSAL

    def check_environment(self, config: Any, cuda_devices: int) -> str | None:
        return HQQ_REFUSAL

    def describe(self, config: dict) -> str:
        params = config.get("quant_config") or {}
        nbits = (params.get("weight_quant_params") or {}).get("nbits") if isinstance(params, dict) else None
        return "hqq" if nbits is None else f"hqq {nbits}-bit"


GPU_METHODS = (FineGrainedFp8(), FbgemmFp8(), Mxfp4(), Higgs(), FpQuant(), Eetq(), Hqq())
