"""What a loaded model holds: quantized and skipped modules, and its footprint in bytes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt")


@dataclass(frozen=True)
class Inventory:
    model_class: str
    footprint_bytes: int
    """Parameters, buffers and quant-state tensors (absmax, code, SCB...), tied storage counted once."""
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


def quant_state_tensors(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensors bitsandbytes keeps beside a packed weight: 4-bit QuantState (nested too) or int8 SCB."""
    if (scb := getattr(param, "SCB", None)) is not None:
        yield scb
    state = getattr(param, "quant_state", None)
    while state is not None:
        for name in ("absmax", "code", "offset"):
            if isinstance(value := getattr(state, name, None), torch.Tensor):
                yield value
        state = getattr(state, "state2", None)


def footprint_bytes(model: nn.Module) -> int:
    seen: set[tuple[str, int]] = set()
    total = 0
    tensors = [t for p in model.parameters() for t in (p, *quant_state_tensors(p))] + list(model.buffers())
    for tensor in tensors:
        if tensor.device.type == "meta":  # offloaded to disk: holds no memory
            continue
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def take_inventory(model: nn.Module, loading_info, offloaded=None, fingerprint: bool = True) -> Inventory:
    from qloader.fingerprint import weights_fingerprint

    classes = Counter(type(m).__name__ for m in model.modules() if type(m).__name__ in QUANTIZED_CLASSES)
    skipped = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    return Inventory(
        model_class=type(model).__name__,
        footprint_bytes=footprint_bytes(model),
        parameters=sum(p.numel() for p in model.parameters()),
        quantized_modules=dict(classes),
        skipped_modules=skipped,
        missing_keys=sorted(loading_info.missing_keys),
        unexpected_keys=sorted(loading_info.unexpected_keys),
        weights_fingerprint=weights_fingerprint(model, offloaded) if fingerprint else None,
    )
