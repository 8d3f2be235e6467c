"""A fingerprint of a loaded model's weights: sha256 over its state, in a stable order."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn


def weights_fingerprint(model: nn.Module, offloaded: Mapping[str, torch.Tensor] | None = None) -> str:
    """sha256 over every state_dict entry, sorted by name: name, dtype, shape, then the raw bytes.

    `state_dict()` is the canonical serialized form: parameters and buffers, and for bitsandbytes
    layers the packed weights with every quant-state tensor (absmax, quant_map, nested statistics,
    int8 SCB) and the quant-state fields, which bitsandbytes packs into a tensor of their own.
    Weights offloaded to disk (on the meta device in the model) are read from `offloaded`.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.device.type == "meta" and offloaded is not None:
            tensor = offloaded[name]
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy() if tensor.numel() else b""))
    return digest.hexdigest()
