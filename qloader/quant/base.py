"""What qloader needs to know about a quantization method: one small protocol, with defaults.

A method plug-in subclasses `QuantMethod`, overrides what differs, and registers itself with
`@register_method`: importing its module is what makes the method known (`qloader.quant.registry` reads
what registered). Nothing outside `qloader/quant/` names a method. Module level stays light (no torch, no
transformers): the schemas here are read when the config is composed.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

from omegaconf import DictConfig, OmegaConf


@dataclass
class QuantConfig:
    """The `quant` group's base schema: the transformers quantization-config class to build."""

    _target_: str | None = None
    """The transformers quantization-config class; null loads unquantized."""
    auto: bool = False
    """True (quant=auto): a pre-quantized checkpoint loads with its own quantization_config, as saved, and these
    settings apply only to a checkpoint that is not; false: they are merged with a pre-quantized checkpoint's."""


@dataclass
class NoQuantConfig(QuantConfig):
    _target_: str | None = None


@dataclass(frozen=True)
class MergeRow:
    """One field where the checkpoint's saved quantization config and the user's differ."""

    field: str
    checkpoint: Any
    user: Any
    used: Any


@dataclass(frozen=True)
class WeightBytes:
    """What one quantized weight will occupy once loaded: the packed data and its quant state."""

    packed: int
    state: int


LISTED_MODULES = 8
"""A forward limit's message names this many modules per reason, then counts the rest (its fix names them all)."""


@dataclass(frozen=True)
class ForwardLimit:
    """Quantized modules that load on this host but whose forward pass its kernels cannot run, and the way out."""

    modules: dict[str, str]
    """Module name -> what about it the kernel cannot take (`out_features 3 is not a multiple of 32`)."""
    why: str
    """What on this host stops them: the kernel and its rule."""
    fix: str
    """What to change so that the model runs here, as overrides."""

    def message(self) -> str:
        """One line: the modules, grouped by what about them the kernel cannot take, why, the fix."""
        groups: dict[str, list[str]] = {}
        for name in sorted(self.modules):
            groups.setdefault(self.modules[name], []).append(name)
        listed = "; ".join(f"{_listing(names)} ({what})" for what, names in groups.items())
        return (
            f"{len(self.modules)} quantized module(s) load but cannot run a forward pass on this host: {listed}; "
            f"{self.why}; {self.fix}"
        )


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - LISTED_MODULES} more" if len(names) > LISTED_MODULES else ""
    return ", ".join(names[:LISTED_MODULES]) + more


class QuantMethod:
    """One quantization method family, keyed by transformers' `quant_method` value.

    The defaults describe a method that needs nothing beyond its transformers config: override
    only what differs. `config` below is always the transformers config object.
    """

    quant_method: ClassVar[str]
    """transformers' `quant_method` value (`BitsAndBytesConfig().quant_method`): the registry key."""
    config_class: ClassVar[str]
    """The transformers config class name (the YAML's `_target_` ends with it)."""
    schemas: ClassVar[dict[str, type]] = {}
    """Schema name -> dataclass, stored in Hydra's ConfigStore as `quant_<name>_schema`."""
    settings: ClassVar[tuple[str, ...]] = ()
    """`quant` fields that are qloader settings, never passed to the config class."""
    packages: ClassVar[tuple[str, ...]] = ()
    """Distributions whose versions the manifest records and replay compares."""
    module: ClassVar[str | None] = None
    """The module that must import for the method to run (None: nothing beyond transformers)."""
    extra: ClassVar[str | None] = None
    """The qloader extra that installs it: `pip install 'qloader[<extra>]'`."""
    needs: ClassVar[str | None] = None
    """A device the method needs (e.g. 'a CUDA GPU'); None: it runs on CPU too."""
    instead: ClassVar[str] = "quant=bnb-nf4 or quant=torchao-int8wo"
    """What to use when the host cannot run it."""
    format_fields: ClassVar[tuple[str, ...]] = ()
    """Fields that define how stored weights are packed: a pre-quantized checkpoint and a request must agree."""
    can_save: ClassVar[bool] = True
    calibrates: ClassVar[bool] = False
    """Quantizes in `postprocess` from calibration data (GPTQ) rather than weight by weight while loading."""
    module_name_fields: ClassVar[tuple[str, ...]] = ()
    """Config fields that list module names to keep unquantized (`llm_int8_skip_modules`): a name that matches no
    module of the model is a warning, with the nearest module name."""
    disk_offload: ClassVar[str | None] = (
        "transformers offloads a weight to disk as the checkpoint stores it, not as this method loads it"
    )
    """Why modules of this method cannot be placed on 'disk' (None: they can, as a plain model's can)."""
    pre_quantized_only: ClassVar[bool] = False
    """transformers cannot quantize with it while loading (AWQ, compressed-tensors): a request only merges with
    a pre-quantized checkpoint's own config, so a method sweep over unquantized checkpoints leaves it out."""

    @property
    def versions(self) -> dict[str, str]:
        """Tested version ranges of `packages`, checked in `validate` (`{"torchao": "<0.19,>=0.18"}`): the pins
        of the method's `extra` in pyproject.toml, read from the installed qloader's metadata, so they live once."""
        return dict(extra_pins(self.extra, self.packages))

    # ---------------------------------------------------------------- config

    def check_fields(self, quant: DictConfig) -> list[str]:
        """Every problem in the `quant` node, each naming the field and the value (before any file is read)."""
        return []

    def build_config(self, quant: DictConfig, device: str) -> Any:
        """The transformers config from the Hydra node; `device` is 'cuda' when weights go to a GPU, else 'cpu'."""
        from hydra.utils import instantiate

        fields = OmegaConf.masked_copy(quant, [key for key in quant if key not in self.settings])
        return instantiate(fields, _convert_="all")

    def calibration(self, config: Any, quant: DictConfig, checkpoint_path: Any, dtype: Any, device: str) -> dict | None:
        """For a method that `calibrates`, on the fly only: put the calibration data in `config` (before the
        quantizer is built; transformers calibrates in `postprocess`, in `dtype` on `device`). Returns what the
        manifest records of it."""
        return None

    def choice(self, config: Any) -> dict | None:
        """Decisions the method took while building its config (recorded in the manifest)."""
        return None

    def config_dict(self, config: Any) -> dict:
        """The fields of a transformers config object (or a checkpoint's saved dict) that a merge compares and
        `describe` reads."""
        return dict(config) if isinstance(config, dict) else config.to_dict()

    def describe(self, config: dict) -> str:
        """A short human name for a config dict (`to_dict()` or a checkpoint's `quantization_config`)."""
        return str(config.get("quant_method"))

    def compared_fields(self, saved: dict, user: dict) -> tuple[str, ...]:
        """Fields listed when a request is merged with a pre-quantized checkpoint's config."""
        return tuple(sorted(k for k in set(saved) & set(user) if not k.startswith("_") and k != "quant_method"))

    def conflicts(self, rows: list[MergeRow]) -> list[MergeRow]:
        """The differences that contradict how the checkpoint's weights are stored."""
        return [row for row in rows if row.field in self.format_fields]

    # ---------------------------------------------------------------- environment

    def check_environment(self, config: Any, cuda_devices: int) -> str | None:
        """Why this host cannot run the method (None: it can); called before transformers' own check."""
        if self.needs and cuda_devices == 0:
            return f"needs {self.needs}, and this host has none; use {self.instead}"
        if self.module is not None and importlib.util.find_spec(self.module) is None:  # a pre-quantized checkpoint's
            extra = f"'qloader[{self.extra}]'" if self.extra else self.packages[0]
            return f"needs the '{self.module}' package, which is not installed; run: pip install {extra}"
        return None

    def prepare_backend(self) -> None:
        """Import the method's library before transformers does, where importing it has process-wide effects."""

    # ---------------------------------------------------------------- the model skeleton and the checkpoint

    def quant_state_names(self, quantizer: Any, name: str, module: Any) -> tuple[str, ...]:
        """Tensors a pre-quantized checkpoint must hold for the module `name` (suffixes of its name); when any
        of them or the module's `weight` is in the checkpoint, all of them must be."""
        return ()

    def created_keys(self, model: Any) -> set[str]:
        """State keys the quantizer creates itself while loading on the fly: never expected in a checkpoint."""
        return set()

    def quantized_class(self, module: Any) -> str | None:
        """How the inventory counts `module`: the class name of a quantized module, else None."""
        return None

    def kept_reason(self, module: Any) -> str | None:
        """Why the method leaves `module` (it owns weights and is not quantized) as it is, when the method has
        its own reason to give; None: the inventory gives the generic one (output head, embedding, convolution,
        fused 3-D expert weights, ...). A method that quantizes fused MoE experts counts them in `quantized_class`."""
        return None

    def planned_bytes(self, quantizer: Any, model: Any, name: str, module: Any, param: Any) -> WeightBytes | None:
        """Bytes of the skeleton parameter `name` (of `module`) once loaded, when the method quantizes it;
        None: it stays as it is. `quantizer` is transformers' (its config: `quantizer.quantization_config`)."""
        return None

    def device_map_fix(self, config: Any, device_map: dict) -> str | None:
        """Why transformers' quantizer refused `device_map` and what to change, as qloader options (its own message
        names `from_pretrained` arguments); None: its message stands. Disk entries: `check_disk_offload`."""
        return None

    def nothing_quantized(self, quantizer: Any, model: Any) -> str | None:
        """Why the method quantized no module of `model` (a load asked for quantization, and every layer stayed as
        it was), with what to change, when the method can tell; None: the warning lists what stayed, and why."""
        return None

    def forward_limit(self, quantizer: Any, model: Any, device_map: dict) -> ForwardLimit | None:
        """The quantized modules of `model` (the skeleton after the quantizer's swaps, or the loaded model) that
        load where `device_map` places them but whose forward pass this host's kernels cannot run; None: the
        model runs here. Loading is not affected: `preprocess` warns, and the probe refuses before loading."""
        return None

    # ---------------------------------------------------------------- the loaded model

    def storage_tensors(self, tensor: Any) -> Iterator[Any]:
        """The plain tensors that hold a loaded parameter or buffer (inner tensors of a tensor subclass)."""
        yield from (t for _, t in inner_tensors(tensor))

    def loading_kernel(
        self, quant: DictConfig, model: Any = None, device_map: dict | None = None
    ) -> AbstractContextManager[Any]:
        """A context the `load` stage runs in (a faster kernel); yields a report with `as_dict()`, or None.
        `model` is the skeleton about to be loaded and `device_map` its placement (what the kernel will see)."""
        return nullcontext(None)

    def check_disk_offload(self, config: Any, device_map: Any) -> str | None:
        """Why a model quantized with `config` cannot have modules on 'disk' (None: it can); checked in `device_map`,
        before any shard is read. `device_map` is the request: a strategy ('auto') or an explicit map (a dict)."""
        return self.disk_offload

    def check_save(self, quant: DictConfig) -> str | None:
        """Why a model loaded with this `quant` node cannot be saved (None: it can); checked before any work."""
        if not self.can_save:
            return f"transformers cannot serialize {self.quant_method} models"
        return None

    def check_save_model(self, model: Any) -> str | None:
        """Why this loaded model cannot be saved as it is now (None: it can); checked in `save` before writing.
        For layouts a kernel changed after loading that would not reload (e.g. repacked weights)."""
        return None

    def save_note(self, model: Any) -> str | None:
        """What `save_pretrained` writes for this loaded model, when that needs saying (logged by `save`)."""
        return None


# ---------------------------------------------------------------- registration

_registered: dict[str, QuantMethod] = {}
REGISTERED: Mapping[str, QuantMethod] = MappingProxyType(_registered)
"""Every registered plug-in by its `quant_method`, read-only and live: a plug-in imported later appears here."""

Method = TypeVar("Method", bound=type)
REQUIRED_ATTRIBUTES = {
    "quant_method": "transformers' quant_method value, e.g. quant_method = 'bitsandbytes'",
    "config_class": "the transformers config class name, e.g. config_class = 'BitsAndBytesConfig'",
}
"""Class attributes a plug-in must set, with an example of each for the refusal."""


def register_method(cls: Method) -> Method:
    """Class decorator: instantiate the plug-in and key it by `quant_method`, as transformers' `register_quantizer`
    keys quantizers, so that a method is known by importing its module (no list to keep in step)."""
    if problem := registration_problem(cls):
        raise TypeError(problem)
    taken = _registered.get(cls.quant_method)
    if taken is not None:
        raise ValueError(
            f"register_method: quant_method '{cls.quant_method}' of {qualified_name(cls)} is already registered by "
            f"{qualified_name(type(taken))}; one quant_method has one plug-in: give {cls.__name__} the quant_method "
            "of its own config class"
        )
    _registered[cls.quant_method] = cls()
    return cls


def registration_problem(cls: Any) -> str | None:
    """Why `cls` cannot be registered as a method plug-in (None: it can)."""
    name = qualified_name(cls) if isinstance(cls, type) else repr(cls)
    if not isinstance(cls, type) or not issubclass(cls, QuantMethod):
        return f"register_method: {name} is not a QuantMethod subclass; subclass qloader.quant.base.QuantMethod"
    for attribute, example in REQUIRED_ATTRIBUTES.items():
        if not isinstance(getattr(cls, attribute, None), str) or not getattr(cls, attribute):
            return f"register_method: {name} has no `{attribute}`; set it as a class attribute ({example})"
    return None


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.cache
def extra_pins(extra: str | None, packages: tuple[str, ...]) -> dict[str, str]:
    """`packages`' version ranges from the installed qloader's requirements: those of `extra`, and the core
    dependencies (which every extra installs too). Empty when qloader runs from a checkout it was not installed
    from: nothing then says which versions it was tested with."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        requirements = [Requirement(line) for line in metadata.requires("qloader") or ()]
    except metadata.PackageNotFoundError:
        return {}
    wanted = {canonicalize_name(name) for name in packages}
    return {
        req.name: str(req.specifier)
        for req in requirements
        if canonicalize_name(req.name) in wanted
        and (req.marker is None or req.marker.evaluate({"extra": extra or ""}))
    }


# ---------------------------------------------------------------- tensor helpers every method shares


def linear_only(method: str, model: Any) -> str | None:
    """For a method that converts `nn.Linear` only: a model whose projections are GPT-2's Conv1D has nothing for it."""
    conv1d = sum(type(module).__name__ == "Conv1D" for module in model.modules())
    if not conv1d:
        return None
    return (
        f"{method} converts nn.Linear layers only, and this model's {conv1d} projections are Conv1D (GPT-2 style), "
        "as in plain transformers; bitsandbytes quantizes Conv1D: use quant=bnb-nf4, quant=bnb-fp4 or quant=bnb-int8"
    )


def inner_tensors(tensor: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(name, plain tensor) for a tensor, its subclass's inner tensors flattened recursively.

    torchao and optimum-quanto weights are traceable tensor subclasses: their storage is the inner
    tensors that `__tensor_flatten__` names; the outer tensor owns none (and `abs()` on it may fail).
    """
    if not hasattr(type(tensor), "__tensor_flatten__"):
        yield prefix, tensor
        return
    names, _ = tensor.__tensor_flatten__()
    for name in names:
        yield from inner_tensors(getattr(tensor, name), f"{prefix}.{name}" if prefix else name)


def flatten_context(tensor: Any) -> str:
    """The non-tensor attributes of a tensor subclass (block size, qtype, ...), as a stable string."""
    if not hasattr(type(tensor), "__tensor_flatten__"):
        return ""
    names, ctx = tensor.__tensor_flatten__()
    inner = ";".join(f"{n}:{flatten_context(getattr(tensor, n))}" for n in names)
    return f"{type(tensor).__name__}{ctx!r}[{inner}]"


def element_size(dtype: Any) -> int:
    """Bytes per element of a torch dtype."""
    return dtype.itemsize


def groups(n: int, size: int) -> int:
    return math.ceil(n / size)
