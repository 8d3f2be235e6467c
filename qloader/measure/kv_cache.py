"""Room for inference: the KV cache a decoder needs per token, on the devices its layers land on, and an estimate
of the activations of one prefill pass on the device that runs it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from qloader.measure.placement import device_of, execution_device

MAX_TOKENS = 1 << 24
"""The search for the longest context stops here (16M tokens)."""


@dataclass(frozen=True)
class LayerCache:
    device: str
    """Where the layer's cache lives: the layer's device, or the execution device for a layer offloaded to
    cpu (beside GPUs) or disk, as accelerate's hooks run it."""
    bytes_per_token: int
    """K and V: 2 x key/value heads x head_dim x the cache dtype's bytes, per token of one sequence."""
    window: int | None
    """A sliding-window layer keeps at most this many tokens; None: every token."""

    def bytes(self, batch: int, tokens: int) -> int:
        return batch * min(tokens, self.window or tokens) * self.bytes_per_token


@dataclass(frozen=True)
class Activations:
    """An estimate of the activations one prefill of batch x tokens holds at its peak, on the execution device:
    the layers run one at a time, each holding its input and residual hidden states and its MLP's gate, up and
    product (4 x hidden + 3 x intermediate values per token, in the compute dtype; attention through SDPA holds
    no tokens x tokens scores), and the logits of the last token only, in float32, as `generate` computes them."""

    device: str
    bytes_per_token: int
    fixed_bytes: int
    """Per sequence: the last token's logits (vocab x 4 bytes)."""

    def bytes(self, batch: int, tokens: int) -> int:
        return batch * (tokens * self.bytes_per_token + self.fixed_bytes)


def activations(text_config: Any, device_map: dict, dtype: Any) -> Activations:
    hidden = text_config.hidden_size
    intermediate = getattr(text_config, "intermediate_size", None) or 4 * hidden
    vocab = getattr(text_config, "vocab_size", 0) or 0
    return Activations(execution_device(device_map), (4 * hidden + 3 * intermediate) * dtype.itemsize, 4 * vocab)


@dataclass(frozen=True)
class InferenceRoom:
    batch_size: int
    seq_len: int | None
    """The context asked for (plan.seq_len); None: only the longest context that fits is computed."""
    cache_dtype: str
    kv_cache_bytes: dict[str, int]
    """Per device, the KV cache at batch_size x seq_len (empty without a seq_len)."""
    fits: bool | None
    """The model and that KV cache within every budget; None without a seq_len."""
    max_tokens: int
    """The longest context (tokens per sequence, at batch_size) whose KV cache fits beside the model."""
    kv_bytes_per_token: int
    """KV cache per token of one sequence, over all layers (sliding-window layers count while under their window)."""
    activation_bytes: dict[str, int] | None = None
    """The estimated prefill activations at batch_size x seq_len, on the execution device (`Activations`); they
    count in `fits` and `max_tokens` beside the KV cache."""
    context_limit: int | None = None
    """The model's own longest context (config.json max_position_embeddings), whatever the memory holds."""

    def as_dict(self) -> dict:
        return asdict(self)


def _attention_layers(model: nn.Module) -> list[str]:
    """The decoder layers, in order: modules of the classes the model never splits (`_no_split_modules`)."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    return [name for name, module in model.named_modules() if type(module).__name__ in classes]


def layer_caches(model: nn.Module, text_config: Any, device_map: dict, dtype: Any) -> list[LayerCache] | None:
    """One LayerCache per decoder layer; None for a model that keeps no KV cache qloader can size (encoders,
    encoder-decoders, a config without attention heads)."""

    heads = getattr(text_config, "num_attention_heads", None)
    layers = _attention_layers(model)
    if getattr(text_config, "is_encoder_decoder", False) or not heads or not layers:
        return None
    if len(layers) != getattr(text_config, "num_hidden_layers", len(layers)):
        return None
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    per_token = 2 * kv_heads * head_dim * dtype.itemsize
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * len(
        layers
    )
    main = execution_device(device_map)
    caches = []
    for name, kind in zip(layers, types, strict=False):
        placed = device_of(name, device_map)
        where = main if placed == "disk" or (placed == "cpu" and main != "cpu") else placed
        caches.append(LayerCache(where, per_token, window if kind == "sliding_attention" else None))
    return caches


def _cache_by_device(caches: list[LayerCache], batch: int, tokens: int) -> dict[str, int]:
    found: dict[str, int] = {}
    for cache in caches:
        found[cache.device] = found.get(cache.device, 0) + cache.bytes(batch, tokens)
    return found


def _needed(caches: list[LayerCache], acts: Activations | None, batch: int, tokens: int) -> dict[str, int]:
    found = _cache_by_device(caches, batch, tokens)
    if acts is not None:
        found[acts.device] = found.get(acts.device, 0) + acts.bytes(batch, tokens)
    return found


def inference_room(
    caches: list[LayerCache],
    room: dict[str, int],
    batch: int,
    seq_len: int | None,
    dtype: Any,
    context_limit: int | None = None,
    acts: Activations | None = None,
) -> InferenceRoom:
    """`room`: per device, its budget less the model's share there (a device without a budget is unbounded)."""

    def fits(tokens: int) -> bool:
        return all(size <= room.get(d, math.inf) for d, size in _needed(caches, acts, batch, tokens).items())

    low, high = 0, MAX_TOKENS
    while low < high:  # the largest token count that fits; the cache grows with the tokens
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    at_length = _cache_by_device(caches, batch, seq_len) if seq_len else {}
    return InferenceRoom(
        batch_size=batch,
        seq_len=seq_len,
        cache_dtype=str(dtype).removeprefix("torch."),
        kv_cache_bytes=at_length,
        fits=None if seq_len is None else all(n >= 0 for n in room.values()) and fits(seq_len),
        max_tokens=low if all(n >= 0 for n in room.values()) else 0,
        kv_bytes_per_token=sum(cache.bytes_per_token for cache in caches),
        activation_bytes={acts.device: acts.bytes(batch, seq_len)} if acts is not None and seq_len else None,
        context_limit=context_limit,
    )


def describe(inference: dict) -> str:
    """'fits for inference at 1 x 8,192 (KV cache 1,024.0 MiB bfloat16); longest context 120,000 tokens'."""
    from qloader.core.units import mib

    batch, seq = inference["batch_size"], inference["seq_len"]
    longest = f"longest context at batch {batch}: {inference['max_tokens']:,} tokens"
    if inference["max_tokens"] >= MAX_TOKENS:
        longest = f"longest context at batch {batch}: over {MAX_TOKENS:,} tokens"
    limit = inference.get("context_limit")
    if limit and inference["max_tokens"] > limit:
        longest += f" (the model's max_position_embeddings is {limit:,})"
    if seq is None:
        return longest
    cache = f"KV cache {mib(sum(inference['kv_cache_bytes'].values()))} {inference['cache_dtype']}"
    if inference.get("activation_bytes"):
        cache += f", activations about {mib(sum(inference['activation_bytes'].values()))}"
    verdict = "fits" if inference["fits"] else "does not fit"
    return f"{verdict} for inference at {batch} x {seq:,} ({cache}); {longest}"
