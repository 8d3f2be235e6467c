"""The shared base of the methods that need a GPU (or a package transformers 5.2x cannot use): fine-grained
fp8, fbgemm fp8, mxfp4, HIGGS, FP-Quant, EETQ and HQQ, one module each beside this one.

Each schema's fields are exactly its transformers config class's `__init__` arguments, under the same
names and defaults (tuples as lists), so every field is an override (`quant.weight_block_size=[64,64]`).
On a host without what a method needs, `validate` refuses it in one line before any shard is read,
naming the method, what it needs and what to use instead; transformers' own `validate_environment`
then covers what a GPU host may still lack (a package, a device map with CPU entries).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from qloader.quant.base import QuantMethod

FOUR_BIT_INSTEAD = "quant=bnb-nf4 or quant=torchao-int4"
EIGHT_BIT_INSTEAD = "quant=bnb-int8 or quant=torchao-int8wo"


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
