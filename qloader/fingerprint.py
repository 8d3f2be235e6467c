"""A fingerprint of a loaded model's weights: sha256 over its state, in a stable order."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from qloader.quant.base import flatten_context, inner_tensors


def _plain_entry(name: str, tensor: torch.Tensor) -> str:
    tensor = tensor.detach().to("cpu").contiguous()
    data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else b""
    return f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{hashlib.sha256(data).hexdigest()}\n"


def _entry(name: str, tensor: torch.Tensor) -> str:
    """One line per plain tensor; a tensor subclass (torchao, quanto) as its inner tensors and attributes."""
    if not (context := flatten_context(tensor)):
        return _plain_entry(name, tensor)
    inner = "".join(_plain_entry(f"{name}/{part}", t) for part, t in inner_tensors(tensor))
    return f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{context}\n{inner}"


def weights_fingerprint(model: nn.Module, offloaded: Mapping[str, torch.Tensor] | None = None) -> str:
    """sha256 over one line per state_dict entry, sorted by name: name, dtype, shape, sha256 of the bytes.

    `state_dict()` is the canonical serialized form: parameters and buffers, and for bitsandbytes
    layers the packed weights with every quant-state tensor (absmax, quant_map, nested statistics,
    int8 SCB) and the quant-state fields, which bitsandbytes packs into a tensor of their own. A tensor
    subclass (torchao, optimum-quanto) counts as its inner tensors plus its attributes (block size, qtype).
    Weights offloaded to disk (on the meta device in the model) are read from `offloaded`.
    Entries are hashed on every core at once: hashlib releases the GIL while it hashes.
    """
    entries = sorted(model.state_dict().items())
    if offloaded is not None:
        entries = [(n, offloaded[n] if t.device.type == "meta" else t) for n, t in entries]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=cores) as pool:
        lines = pool.map(lambda entry: _entry(*entry), entries)
        return hashlib.sha256("".join(lines).encode()).hexdigest()
