"""What a loaded model holds: quantized and skipped modules, and its footprint in bytes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from qloader.quant.base import QuantMethod, inner_tensors


@dataclass(frozen=True)
class Inventory:
    model_class: str
    footprint_bytes: int
    """The storage of parameters, buffers and quant state (absmax, scales, SCB, inner tensors of tensor
    subclasses), each storage counted once."""
    parameters: int
    quantized_modules: dict[str, int]
    """Quantized module class -> count."""
    skipped_modules: list[str]
    """Linear layers left unquantized (lm_head, tied or skip-listed modules)."""
    missing_keys: list[str]
    unexpected_keys: list[str]
    weights_fingerprint: str | None
    """sha256 over the canonical state (see qloader.fingerprint), taken before any forward pass;
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


def footprint_bytes(model: nn.Module, method: QuantMethod | None = None) -> int:
    """Real storage bytes: measured on the plain tensors, never on a tensor subclass's outer shape."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in storage_tensors(model, method):
        if tensor.device.type == "meta":  # offloaded to disk: holds no memory
            continue
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def _quantized_class(module: nn.Module, method: QuantMethod | None) -> str | None:
    return None if method is None else method.quantized_class(module)


def take_inventory(
    model: nn.Module, loading_info, offloaded=None, fingerprint: bool = True, method: QuantMethod | None = None
) -> Inventory:
    from qloader.fingerprint import weights_fingerprint

    kinds = {name: _quantized_class(m, method) for name, m in model.named_modules()}
    skipped = [name for name, m in model.named_modules() if type(m) is nn.Linear and kinds[name] is None]
    return Inventory(
        model_class=type(model).__name__,
        footprint_bytes=footprint_bytes(model, method),
        parameters=sum(p.numel() for p in model.parameters()),
        quantized_modules=dict(Counter(kind for kind in kinds.values() if kind is not None)),
        skipped_modules=skipped,
        missing_keys=sorted(loading_info.missing_keys),
        unexpected_keys=sorted(loading_info.unexpected_keys),
        weights_fingerprint=weights_fingerprint(model, offloaded) if fingerprint else None,
    )
