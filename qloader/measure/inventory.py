"""What a loaded model holds: quantized and skipped modules, and its footprint in bytes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from qloader.quant.base import QuantMethod, inner_tensors


@dataclass(frozen=True)
class KeptGroup:
    """Modules of one kind that own weights and stay unquantized, and why."""

    modules: str
    """'lm_head' for one module; '2 experts blocks' for several with the same name in different layers."""
    module_class: str
    count: int
    parameters: int
    """Their parameters (logical count; a weight tied to one counted elsewhere counts once)."""
    reason: str

    def describe(self) -> str:
        return f"{self.modules} ({self.module_class}: {self.reason})"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Inventory:
    model_class: str
    footprint_bytes: int
    """The storage of parameters, buffers and quant state (absmax, scales, SCB, inner tensors of tensor
    subclasses), each storage counted once."""
    footprint_devices: dict[str, int]
    """`footprint_bytes` by device ('cpu', 'cuda:0', 'disk' for weights offloaded to disk)."""
    parameters: int
    """Logical parameter count, tied weights once: as the model is defined, whatever its storage."""
    stored_elements: int
    """Elements of the tensors that store the parameters (a 4-bit weight's packed uint8 tensor holds half
    its logical count)."""
    quantized_parameters: int
    """Logical parameters inside quantized modules."""
    kept: list[KeptGroup]
    """Module groups that own weights and stay unquantized, with the reason (empty for quant=none)."""
    quantized_modules: dict[str, int]
    """Quantized module class -> count."""
    skipped_modules: list[str]
    """Linear layers left unquantized (lm_head, tied or skip-listed modules)."""
    missing_keys: list[str]
    unexpected_keys: list[str]
    weights_fingerprint: str | None
    """sha256 over the canonical state (see qloader.measure.fingerprint), taken before any forward pass;
    None with validate.fingerprint=false."""

    @property
    def quantized_count(self) -> int:
        return sum(self.quantized_modules.values())


def storage_tensors(model: nn.Module, method: QuantMethod | None):
    """Every plain tensor that holds the model's weights: parameters and buffers, as the method stores them."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if method is None:
            yield from (t for _, t in inner_tensors(tensor))
        else:
            yield from method.storage_tensors(tensor)


def footprint_devices(model: nn.Module, method: QuantMethod | None = None) -> dict[str, int]:
    """Real storage bytes per device, measured on the plain tensors, never on a tensor subclass's outer shape. A
    weight offloaded to disk is on the meta device in the model (its hook reads it from disk for each forward):
    it counts under 'disk', at its size there."""
    seen: set[tuple[str, int]] = set()
    totals: dict[str, int] = {}
    for tensor in storage_tensors(model, method):
        if tensor.device.type == "meta":
            device, key, size = "disk", ("disk", id(tensor)), tensor.numel() * tensor.element_size()
        else:
            storage = tensor.untyped_storage()
            device, size = str(tensor.device), storage.nbytes()
            key = (device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            totals[device] = totals.get(device, 0) + size
    return totals


def footprint_bytes(model: nn.Module, method: QuantMethod | None = None) -> int:
    """Real storage bytes, wherever the weights are (memory or disk)."""
    return sum(footprint_devices(model, method).values())


def _quantized_class(module: nn.Module, method: QuantMethod | None) -> str | None:
    return None if method is None else method.quantized_class(module)


def _generic_reason(name: str, module: nn.Module, model: nn.Module, quantizer: Any, method: QuantMethod) -> str:
    from qloader.quant.lifecycle import not_converted

    weights = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and module is output:
        return "the output head; transformers keeps it in full precision"
    if isinstance(module, nn.Embedding):
        return "an embedding table, not a Linear layer"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "a convolution, not a Linear layer"
    if any(p.dim() == 3 for p in weights):
        return "fused 3-D expert weights are not Linear"
    fp32 = {
        *(getattr(model, "_keep_in_fp32_modules", None) or []),
        *(getattr(model, "_keep_in_fp32_modules_strict", None) or []),
    }
    if fp32 & set(name.split(".")):
        return "the model keeps it in float32 (_keep_in_fp32_modules)"
    if not_converted(name, quantizer):
        return "on the quantizer's modules_to_not_convert"
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return f"{method.quant_method} leaves this {type(module).__name__} as it is"
    return "not a Linear layer"


def kept_groups(
    model: nn.Module,
    is_quantized: Callable[[str, nn.Module], bool],
    method: QuantMethod | None,
    quantizer: Any = None,
    tied: set[str] = frozenset(),
) -> list[KeptGroup]:
    """Modules owning a weight (2-D or more) that the method leaves unquantized, grouped by class, name and reason.

    `is_quantized(name, module)` is the method's verdict (the loaded module's class, or the plan's bytes);
    `tied` names parameters tied to others (counted once, where they are tied to). Empty for quant=none.
    """
    if method is None:
        return []
    seen: set[int] = set()
    groups: dict[tuple[str, str, str], list] = {}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(p.dim() >= 2 for _, p in own) or is_quantized(name, module):
            continue
        reason = method.kept_reason(module) or _generic_reason(name, module, model, quantizer, method)
        leaf = name.rsplit(".", 1)[-1] if name else type(module).__name__
        group = groups.setdefault((type(module).__name__, leaf, reason), [[], 0])
        group[0].append(name or "(the model)")
        for param_name, param in own:
            if id(param) not in seen and f"{name}.{param_name}".lstrip(".") not in tied:
                seen.add(id(param))
                group[1] += param.numel()
    return [
        KeptGroup(names[0] if len(names) == 1 else f"{len(names)} {leaf} blocks", kind, len(names), count, reason)
        for (kind, leaf, reason), (names, count) in groups.items()
    ]


def take_inventory(
    model: nn.Module,
    loading_info,
    offloaded=None,
    fingerprint: bool = True,
    method: QuantMethod | None = None,
    parameters: int | None = None,
    quantizer: Any = None,
    trust_cache: bool = True,
) -> Inventory:
    """`parameters`: the logical count (hf_loading.SourceFacts); by default the stored elements.
    `trust_cache=False` (model.verify_hashes=true): the fingerprint takes no digest from the region cache."""
    from qloader.measure.fingerprint import weights_fingerprint

    kinds = {name: _quantized_class(m, method) for name, m in model.named_modules()}
    devices = footprint_devices(model, method)
    skipped = [name for name, m in model.named_modules() if type(m) is nn.Linear and kinds[name] is None]
    stored = sum(p.numel() for p in model.parameters())
    kept = kept_groups(model, lambda name, m: kinds[name] is not None, method, quantizer)
    parameters = stored if parameters is None else parameters
    return Inventory(
        model_class=type(model).__name__,
        footprint_bytes=sum(devices.values()),
        footprint_devices=devices,
        parameters=parameters,
        stored_elements=stored,
        quantized_parameters=_quantized_parameters(model, kinds, parameters) if method else 0,
        kept=kept,
        quantized_modules=dict(Counter(kind for kind in kinds.values() if kind is not None)),
        skipped_modules=skipped,
        missing_keys=sorted(loading_info.missing_keys),
        unexpected_keys=sorted(loading_info.unexpected_keys),
        weights_fingerprint=weights_fingerprint(model, offloaded, trust_cache=trust_cache) if fingerprint else None,
    )


def _quantized_parameters(model: nn.Module, kinds: dict, parameters: int) -> int:
    """Logical parameters inside quantized modules: all parameters, less those of modules that are not quantized."""
    seen: set[int] = set()
    plain = 0
    for name, module in model.named_modules():
        if kinds[name] is not None:
            continue
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                plain += param.numel()
    return parameters - plain
