"""The quantized cache as a load uses it (`cache.quantized`): `resolve` looks the load up, and on a hit the stages
read the cached pre-quantized checkpoint instead of quantizing; on a miss the `cache` step after `postprocess`
writes the model, before any forward pass (bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on the first
one, after which `state_dict()` no longer holds what was loaded). The entries live in
`qloader.checkpoint.quantized_cache`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from qloader.checkpoint import quantized_cache
from qloader.checkpoint.reader import Checkpoint, HashCache, default_hash_cache, inspect_checkpoint
from qloader.core.errors import ConfigError, QloaderError
from qloader.loading import devices
from qloader.loading.context import LoadContext
from qloader.quant import lifecycle

KEY_PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "qloader")
"""Libraries whose versions decide the quantized bytes (with the method's own, `QuantMethod.packages`)."""
CACHE_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class CacheUse:
    """What the quantized cache did for this load, as the manifest's `cache` section records it."""

    status: str
    """hit | miss | not cached."""
    reason: str | None = None
    """Why not cached; for a miss that stored nothing, why not."""
    key: str | None = None
    inputs: dict | None = None
    """What went into the key."""
    path: str | None = None
    bytes: int | None = None
    stored: bool | None = None
    """A miss: whether this run wrote the entry."""
    entry: Any = None
    """A hit: the entry (`quantized_cache.Entry`), held until the run ends."""
    weights: Checkpoint | None = None
    """A hit: the cached checkpoint the weights are read from."""

    def as_dict(self) -> dict:
        fields = ("status", "reason", "key", "inputs", "path", "bytes", "stored")
        return {name: getattr(self, name) for name in fields}

    def release(self) -> None:
        if self.entry is not None:
            self.entry.release()


def _hashes(ctx: LoadContext) -> HashCache:
    return default_hash_cache(trust=not ctx.cfg.model.get("verify_hashes", False))


def consult(ctx: LoadContext) -> LoadContext:
    """End of `resolve`: not cached (and why), a miss, or a hit, whose pre-quantized checkpoint, config and
    quantization replace the ones to quantize (the input checkpoint stays what the manifest records)."""
    if ctx.cfg.mode == "plan" or "cache" not in ctx.cfg:
        return ctx
    if (why := not_cached_reason(ctx)) is not None:
        return ctx.next(cache=CacheUse("not cached", reason=why))
    inputs = key_inputs(ctx)
    key = quantized_cache.cache_key(inputs)
    entry = quantized_cache.open_entry(key, _hashes(ctx))
    if entry is None:
        return ctx.next(cache=CacheUse("miss", key=key, inputs=inputs))
    from qloader.loading import hf_loading

    try:
        weights = inspect_checkpoint(entry.path, hash_files=False)
        hf_config = hf_loading.read_config(entry.path, ctx.cfg.model.trust_remote_code)
        device = devices.weights_device(ctx.cfg.device_map)
        quantization = lifecycle.resolve_quantization(ctx.cfg.quant, device, hf_config, entry.path / "config.json")
    except QloaderError as e:  # an entry that reads as no checkpoint of this request: damaged
        entry.release()
        quantized_cache.discard_damaged(entry.path, str(e))
        return ctx.next(cache=CacheUse("miss", key=key, inputs=inputs))
    use = CacheUse("hit", key=key, inputs=inputs, path=str(entry.path), bytes=entry.bytes, entry=entry, weights=weights)
    return ctx.next(cache=use, hf_config=hf_config, quantization=quantization)


def not_cached_reason(ctx: LoadContext) -> str | None:
    """Why this load is not cached (None: it is); cache.quantized=true and a method that cannot save: ConfigError."""
    setting = ctx.cfg.cache.quantized
    if setting is False:
        return "cache.quantized=false"
    if ctx.quantization.config is None:
        return "an unquantized load (quant=none): nothing to cache"
    if ctx.pre_quantized:
        return "the checkpoint is pre-quantized already and loads as it is"
    if (why := ctx.method.check_save(ctx.cfg.quant)) is not None:
        if setting is True:
            raise ConfigError([f"cache.quantized=true: {why}; set cache.quantized=auto or false"])
        return why
    return None


def key_inputs(ctx: LoadContext) -> dict:
    """Everything that decides the quantized bytes: the input files' sha256, the model class, the resolved
    quantization config, the dtype, where the weights are quantized and the libraries' versions. qloader's
    fused bitsandbytes kernels write bitsandbytes' bytes exactly (tests/test_kernels.py), so `quant.kernel` is not
    part of it; neither is the device map, beyond the device the weights are quantized on."""
    quantization, method = ctx.quantization, ctx.method
    config = method.config_dict(quantization.config)
    versions = {}
    for name in (*KEY_PACKAGES, *method.packages):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    inputs = {
        "files": {f.name: f.sha256 for f in ctx.checkpoint.files},
        "model_class": f"{ctx.model_choice.cls.__module__}.{ctx.model_choice.cls.__qualname__}",
        "quantization": {"method": method.quant_method, "config": config, "choice": quantization.choice},
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "weights_device": devices.weights_device(ctx.cfg.device_map).split(":")[0],
        "versions": versions,
    }
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))  # plain JSON, as the manifest records it


def fill(ctx: LoadContext) -> LoadContext:
    """The `cache` step, after `postprocess` and before any forward pass: a miss writes its entry."""
    use = ctx.cache
    if use is None or use.status != "miss":
        return ctx
    if devices.on_disk(ctx.device_map or {}):
        return ctx.next(cache=_not_stored(use, "modules are offloaded to disk"))
    if (why := ctx.method.check_save_model(ctx.model)) is not None:
        return ctx.next(cache=dataclasses.replace(use, status="not cached", reason=why))
    from qloader.checkpoint.writer import write_checkpoint_files
    from qloader.quant.merge import describe

    record = {
        "inputs": use.inputs,
        "description": f"{ctx.model_choice.cls.__name__} {describe(ctx.quantization_config)} ({use.inputs['dtype']})",
        "source": str(ctx.checkpoint.path),
    }
    entry, why = quantized_cache.store_entry(
        use.key,
        record,
        lambda folder: write_checkpoint_files(ctx.model, ctx.checkpoint.path, folder, CACHE_SHARD_SIZE),
        ctx.inventory.footprint_bytes,
        quantized_cache.max_bytes(ctx.cfg.cache.max_bytes),
        _hashes(ctx),
    )
    if entry is None:
        return ctx.next(cache=_not_stored(use, why))
    return ctx.next(cache=dataclasses.replace(use, stored=True, path=str(entry.path), bytes=entry.bytes))


def _not_stored(use: CacheUse, why: str) -> CacheUse:
    import logging

    logging.getLogger("qloader").info("quantized cache: entry %s not stored: %s", use.key, why)
    return dataclasses.replace(use, stored=False, reason=f"not stored: {why}")
