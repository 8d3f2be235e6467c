"""The seven stages of a load, in the order they run.

Each stage takes the run's `LoadContext` and returns the next one. None of them measures
itself: the pipeline wraps every call (see `qloader.runs.pipeline`).
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from qloader.checkpoint import integrity
from qloader.checkpoint import writer as checkpoint_writer
from qloader.checkpoint.reader import Checkpoint, default_hash_cache, inspect_checkpoint
from qloader.checkpoint.sources import checkpoint_folder, hub_origin
from qloader.core.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    DeviceMapError,
    EnvironmentMismatchError,
    LoadError,
    NonFiniteWeightError,
)
from qloader.core.names import STAGE_NAMES
from qloader.loading import devices
from qloader.quant import merge as quant
from qloader.quant.registry import method_for_target, method_of

if TYPE_CHECKING:
    from qloader.measure.inventory import Inventory
    from qloader.measure.plan import Plan

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPES = ("bfloat16", "float16", "float32", "float64", "auto")
MODES = ("load", "plan")


log = logging.getLogger("qloader")


@dataclass(frozen=True)
class LoadContext:
    cfg: DictConfig
    overrides: tuple[str, ...] = ()
    # resolve
    checkpoint: Checkpoint | None = None
    hf_config: Any = None
    model_choice: Any = None
    """hf_loading.ModelChoice: the class model.task picks, and why."""
    quantization_config: Any = None
    pre_quantized: bool = False
    merge: list = field(default_factory=list)
    quant_choice: dict | None = None
    dtype: Any = None
    # instantiate
    quantizer: Any = None
    # validate
    environment: dict = field(default_factory=dict)
    # device_map
    device_map_request: Any = None
    device_map: dict | None = None
    offload_folder: Path | None = None
    source: Any = None
    """hf_loading.SourceFacts: the skeleton before the quantizer's swaps (checkpoint-side shapes, logical size)."""
    # preprocess
    model: Any = None
    load_config: Any = None
    plan: Plan | None = None
    # load
    kernel: Any = None
    loading_info: Any = None
    offload_index: dict | None = None
    # postprocess
    finite_check: str | None = None
    inventory: Inventory | None = None
    # save (only when save.enabled)
    saved: Checkpoint | None = None
    # probe (only when probe.enabled)
    probe: dict | None = None

    def next(self, **changes: Any) -> LoadContext:
        return dataclasses.replace(self, **changes)


def _check_fields(cfg: DictConfig) -> None:
    """Every config problem at once, before any file is read."""
    from qloader.config.schema import check_choices, missing_values, unknown_keys

    problems = unknown_keys(cfg) + missing_values(cfg) + check_choices(cfg)
    problems += quant.check_quant_fields(cfg.quant) + devices.check_device_fields(cfg.device_map)
    problems += checkpoint_writer.check_save_fields(cfg.save)
    method = method_for_target(cfg.quant.get("_target_"))
    if cfg.save.enabled and method is not None and (why := method.check_save(cfg.quant)):
        problems.append(f"save.enabled=true: {why}; load without saving (save.enabled=false) or choose another quant")
    name = DTYPE_NAMES.get(str(cfg.dtype.name), str(cfg.dtype.name))
    if name not in DTYPES:
        problems.append(f"dtype.name '{cfg.dtype.name}' is not a dtype qloader loads (one of {', '.join(DTYPES)})")
    if cfg.mode not in MODES:
        problems.append(f"mode '{cfg.mode}' is not one of {', '.join(MODES)}")
    if problems:
        raise ConfigError(problems)
    if cfg.save.enabled and cfg.mode != "plan":
        checkpoint_writer.check_save_target(cfg.save)


def resolve(ctx: LoadContext) -> LoadContext:
    """Composed config -> checkpoint folder, transformers config, quantization config (merged if pre-quantized)."""
    from transformers import AutoConfig

    from qloader.loading import hf_loading

    _check_fields(ctx.cfg)
    quant.check_backend(ctx.cfg.quant)
    model = ctx.cfg.model
    checkpoint = inspect_checkpoint(
        checkpoint_folder(model),
        hashes=default_hash_cache(trust=not model.get("verify_hashes", False)),
        hash_files=ctx.cfg.mode != "plan",
        allow_pickle=model.allow_pickle,
    )
    if (hub := hub_origin(model, checkpoint.path)) is not None:
        checkpoint = dataclasses.replace(checkpoint, hub=hub)
    integrity.check_remote_code(checkpoint.path / "config.json", trusted=model.trust_remote_code)
    try:
        hf_config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{checkpoint.path / 'config.json'}: {e}") from e
    choice = hf_loading.model_class(hf_config, model.task, model.trust_remote_code)
    if choice.disagreement:
        log.warning("%s", choice.disagreement)
    if ctx.cfg.probe.enabled:
        from qloader.probe.fidelity import check_probe_task

        check_probe_task(choice)
    user_qconfig = quant.build_quantization_config(ctx.cfg.quant, devices.weights_device(ctx.cfg.device_map))
    qconfig, merge = user_qconfig, []
    saved = getattr(hf_config, "quantization_config", None)
    if saved is not None:  # pre-quantized: the checkpoint's config, merged with the user's if one was asked for
        saved = saved if isinstance(saved, dict) else saved.to_dict()
        config_json = checkpoint.path / "config.json"
        quant.check_saved_config(saved, config_json)
        asked = not ctx.cfg.quant.get("auto", False)  # quant=auto: the checkpoint's own config, as saved
        qconfig, merge = quant.merge_with_checkpoint(saved, user_qconfig if asked else None, asked, config_json)
        hf_config.quantization_config = qconfig
        for row in merge:
            log.warning(
                "quant.%s: checkpoint %r, requested %r -> using %r", row.field, row.checkpoint, row.user, row.used
            )
    name = DTYPE_NAMES.get(str(ctx.cfg.dtype.name), str(ctx.cfg.dtype.name))
    dtype = hf_loading.resolve_dtype(name, checkpoint, hf_config)
    quant_choice = None if qconfig is None else method_of(qconfig).choice(qconfig)
    if saved is None and qconfig is not None and method_of(qconfig).calibrates:  # on the fly: its calibration data
        device = devices.weights_device(ctx.cfg.device_map)
        calibration = method_of(qconfig).calibration(qconfig, ctx.cfg.quant, checkpoint.path, dtype, device)
        quant_choice = {**(quant_choice or {}), **(calibration or {})} or None
    return ctx.next(
        checkpoint=checkpoint,
        hf_config=hf_config,
        model_choice=choice,
        quantization_config=qconfig,
        pre_quantized=saved is not None,
        merge=merge,
        quant_choice=quant_choice,
        dtype=dtype,
    )


def instantiate_quantizer(ctx: LoadContext) -> LoadContext:
    """Merged quantization config -> transformers' quantizer object (None when unquantized)."""
    if ctx.quantization_config is None:
        return ctx
    from transformers.quantizers.auto import AutoHfQuantizer

    method_of(ctx.quantization_config).prepare_backend()
    try:
        quantizer = AutoHfQuantizer.from_config(ctx.quantization_config, pre_quantized=ctx.pre_quantized)
        dtype = quantizer.update_dtype(ctx.dtype)  # a method may refuse the dtype (higgs and fp32)
    except ValueError as e:
        raise ConfigError([f"quantization config: {e}"]) from e
    return ctx.next(quantizer=quantizer, dtype=dtype, hf_config=quantizer.update_attn_implementation(ctx.hf_config))


def validate(ctx: LoadContext) -> LoadContext:
    """Devices, library versions and memory, checked before any shard is read."""
    import torch

    from qloader.measure import environment

    request = devices.device_map_request(ctx.cfg.device_map)
    max_memory = devices.max_memory_request(ctx.cfg.device_map)
    asked = devices.cuda_devices_asked(request, max_memory)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if asked and not available:
        raise EnvironmentMismatchError(
            f"device_map '{ctx.cfg.device_map.strategy}' asks for CUDA, but this host has no CUDA device "
            f"(torch {torch.__version__}); use device_map=cpu or device_map=auto"
        )
    if asked and max(asked) >= available:
        raise EnvironmentMismatchError(
            f"device_map asks for cuda:{max(asked)}, but this host has {available} CUDA device(s)"
        )
    method = method_of(ctx.quantization_config)
    if method is not None and (why := method.check_environment(ctx.quantization_config, available)):
        raise EnvironmentMismatchError(f"quant {method.quant_method}: {why}")
    environment.check_versions(None if method is None else method.versions)
    if ctx.quantizer is not None:
        try:
            ctx.quantizer.validate_environment(device_map=request, weights_only=True)
        except (ImportError, ValueError, RuntimeError, NotImplementedError) as e:  # ModuleNotFoundError too
            raise EnvironmentMismatchError(
                f"quant {method.quant_method} ({type(ctx.quantizer).__name__}) cannot run here: "
                f"{type(e).__name__}: {str(e).strip()}; use {method.instead}"
            ) from e
    _check_pinned_hashes(ctx.cfg.model.get("expected_sha256") or {}, ctx.checkpoint)
    memory = environment.check_memory(ctx.checkpoint)
    return ctx.next(environment=memory)


def _check_pinned_hashes(expected: dict, checkpoint: Checkpoint) -> None:
    found = {f.name: f.sha256 for f in checkpoint.files}
    problems = [
        f"{checkpoint.path / name}: sha256 {found.get(name, 'missing file')}, expected {digest}"
        for name, digest in expected.items()
        if found.get(name) != digest
    ]
    if problems:
        raise CheckpointError(f"model.expected_sha256 does not match: {'; '.join(problems)}")


def device_map(ctx: LoadContext) -> LoadContext:
    """The final module -> device map: the quantizer's update, then accelerate's inference if asked."""
    from qloader.loading import hf_loading

    request = hf_loading.normalize_device_map(devices.device_map_request(ctx.cfg.device_map))
    if ctx.quantizer is not None:
        request = ctx.quantizer.update_device_map(request)
    offload_folder = devices.offload_folder(ctx.cfg.device_map, ctx.checkpoint.path)
    if isinstance(request, dict):
        _check_disk(request, offload_folder, f"device_map.modules {request}")
        return ctx.next(device_map_request=request, device_map=request, offload_folder=offload_folder)
    # Sizing needs the quantized skeleton (4-bit modules weigh half a byte per weight): build it on
    # the meta device here; `preprocess` goes on with it.
    model_cls = ctx.model_choice.cls
    sizing, source = hf_loading.build_skeleton(
        model_cls, ctx.hf_config, ctx.dtype, ctx.quantizer, request, ctx.checkpoint
    )
    max_memory = devices.max_memory_request(ctx.cfg.device_map)
    final = hf_loading.infer_device_map(sizing, request, max_memory, ctx.quantizer)
    if (on_disk := _on_disk(final)) and offload_folder is None:
        raise DeviceMapError(_does_not_fit(ctx, sizing, request, max_memory, on_disk))
    if ctx.quantizer is not None:
        try:
            ctx.quantizer.validate_environment(device_map=final)
        except ValueError as e:
            raise DeviceMapError(f"device_map '{request}' -> {final}: {e}") from e
    return ctx.next(
        device_map_request=request, device_map=final, offload_folder=offload_folder, model=sizing, source=source
    )


def _on_disk(device_map: dict) -> list[str]:
    return sorted(module for module, device in device_map.items() if device == "disk")


def _check_disk(device_map: dict, offload_folder: Path | None, what: str) -> None:
    if (on_disk := _on_disk(device_map)) and offload_folder is None:
        raise DeviceMapError(
            f"{what} places {integrity.listing(on_disk)} on disk; set device_map.offload_folder to allow it"
        )


def _does_not_fit(ctx: LoadContext, sizing, request: str, max_memory: dict | None, unplaced: list[str]) -> str:
    from qloader.core.units import mib
    from qloader.loading import hf_loading
    from qloader.measure.plan import budgets_in_bytes, estimate

    method = method_of(ctx.quantization_config)
    need = estimate(sizing, {"": "cpu"}, 0, None, method, ctx.quantizer).footprint_bytes
    if max_memory:
        have = sum(budgets_in_bytes(max_memory).values())
        budget = f"with max_memory {max_memory}: the model does not fit; it needs about {mib(need)} and the budget"
    else:  # accelerate measured the devices: say what it found, not 'a budget of 0'
        found = hf_loading.available_memory()
        have = sum(found.values())
        where = ", ".join(f"{device} {mib(size)}" for device, size in found.items())
        budget = (
            f"with no max_memory set: the model does not fit the memory available ({where}); it needs about "
            f"{mib(need)} and the available memory"
        )
    return (
        f"device_map '{request}' {budget} allows {mib(have)} (short by {mib(max(need - have, 0))}). "
        f"{len(unplaced)} module(s) could not be placed: {', '.join(m or '(the whole model)' for m in unplaced[:8])}. "
        "Raise max_memory; qloader offloads to disk only when device_map.offload_folder is set"
    )


def preprocess(ctx: LoadContext) -> LoadContext:
    """The model skeleton on the meta device, with Linear -> Linear4bit / Linear8bitLt swapped in,
    and the plan: the bytes it will take per device."""
    from qloader.loading import hf_loading
    from qloader.measure.plan import estimate

    model, source = ctx.model, ctx.source  # `device_map` built it to size the model, from the same arguments
    if model is None:
        model, source = hf_loading.build_skeleton(
            ctx.model_choice.cls, ctx.hf_config, ctx.dtype, ctx.quantizer, ctx.device_map_request, ctx.checkpoint
        )
    load_config = hf_loading.load_state_config(
        model, ctx.checkpoint, ctx.device_map, ctx.dtype, ctx.quantizer, ctx.offload_folder
    )
    method = method_of(ctx.quantization_config)
    created = set() if method is None or ctx.pre_quantized else method.created_keys(model)
    try:
        integrity.check_tensors_fit_model(
            model,
            ctx.checkpoint.shapes,
            load_config.weight_mapping,
            ctx.quantizer,
            ctx.checkpoint.path,
            created,
            source.shapes,
        )
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(_with_task_hint(str(e), ctx)) from e
    max_memory = devices.max_memory_request(ctx.cfg.device_map)
    plan = estimate(
        model, ctx.device_map, ctx.checkpoint.largest_shard_bytes, max_memory, method, ctx.quantizer, source
    )
    if ctx.cfg.save.enabled and ctx.cfg.mode != "plan":
        checkpoint_writer.check_save_space(ctx.cfg.save, plan.footprint_bytes)
    return ctx.next(model=model, source=source, load_config=load_config, plan=plan)


def _with_task_hint(message: str, ctx: LoadContext) -> str:
    """A mismatch message, with what to change when model.task built another class than config.json names."""
    choice = ctx.model_choice
    if choice is None or not choice.disagreement:
        return message
    return f"{message}. {choice.disagreement}: {choice.suggestion(ctx.hf_config)}"


def load(ctx: LoadContext) -> LoadContext:
    """Stream the shards, quantizing each weight as it is read, and place it on its device."""
    from tqdm.auto import tqdm

    from qloader.loading import hf_loading

    method = method_of(ctx.quantization_config)
    if ctx.pre_quantized:
        missing = quant.missing_quant_state(ctx.model, ctx.checkpoint.tensors, ctx.quantizer)
        if missing:
            raise CheckpointError(f"pre-quantized checkpoint is incomplete: {'; '.join(missing)}")
    placed = (None, None) if ctx.pre_quantized else (ctx.model, ctx.device_map)  # what the kernel will quantize
    shards = ctx.checkpoint.shards
    total = len(ctx.checkpoint.tensors)  # the bar counts checkpoint tensors, as `on_batch` does
    with tqdm(total=total, desc=f"load 0/{len(shards)} shards", unit="tensor", leave=False) as bar:

        def on_batch(index: int, tensors: int) -> None:
            bar.set_description(f"load {index + 1}/{len(shards)} shards")
            bar.update(tensors)

        try:
            kernels = nullcontext(None) if method is None else method.loading_kernel(ctx.cfg.quant, *placed)
            with kernels as kernel:
                info, offload_index = hf_loading.load_shards(ctx.model, ctx.checkpoint, ctx.load_config, on_batch)
        except (OSError, RuntimeError, ValueError) as e:
            raise LoadError(f"{ctx.checkpoint.path}: {type(e).__name__}: {e}") from e
    return ctx.next(kernel=kernel, loading_info=info, offload_index=offload_index)


def postprocess(ctx: LoadContext) -> LoadContext:
    """Finish the model as from_pretrained does (tie weights, eval, dispatch) and take its inventory."""
    from qloader.loading import hf_loading
    from qloader.measure.inventory import take_inventory

    info = ctx.loading_info
    try:
        hf_loading.finalize(ctx.model, ctx.load_config, info, ctx.quantizer, ctx.offload_index)
    except RuntimeError as e:  # transformers' own load report: size mismatches, conversion errors
        raise LoadError(f"{ctx.checkpoint.path}: {e}") from e
    if info.missing_keys or info.unexpected_keys:  # `preprocess` checked the headers; this checks the load itself
        message = (
            f"{ctx.checkpoint.path}: loading left {len(info.missing_keys)} weight(s) missing "
            f"({integrity.listing(info.missing_keys)}) and {len(info.unexpected_keys)} unexpected "
            f"({integrity.listing(info.unexpected_keys)})"
        )
        raise CheckpointMismatchError(_with_task_hint(message, ctx))
    offloaded = hf_loading.offloaded_weights(ctx.load_config, ctx.offload_index)
    method = method_of(ctx.quantization_config)
    finite_check = _check_finite(ctx.model, ctx.cfg.validate, ctx.checkpoint, offloaded, method)
    inventory = take_inventory(
        ctx.model, info, offloaded, ctx.cfg.validate.fingerprint, method, ctx.source.parameters, ctx.quantizer
    )
    return ctx.next(finite_check=finite_check, inventory=inventory)


def _check_finite(model, validate_cfg: DictConfig, checkpoint: Checkpoint, offloaded, method) -> str:
    """`validate.finite`: fail on any NaN or Inf weight; 'auto' checks models up to finite_max_parameters."""
    size = checkpoint.parameters
    if validate_cfg.finite is False or (validate_cfg.finite == "auto" and size > validate_cfg.finite_max_parameters):
        return "skipped"
    if bad := integrity.nonfinite_weights(model, offloaded, None if method is None else method.storage_tensors):
        raise NonFiniteWeightError(
            f"{checkpoint.path}: {len(bad)} weight(s) hold NaN or Inf after loading: {integrity.listing(bad)}. "
            "Set validate.finite=false to load it anyway"
        )
    return "passed"


def save(ctx: LoadContext) -> LoadContext:
    """Optional, after the seven: write the loaded model as a checkpoint plain `from_pretrained` reads."""
    saved = checkpoint_writer.save_loaded_model(ctx.model, ctx.quantization_config, ctx.checkpoint.path, ctx.cfg.save)
    return ctx.next(saved=saved)


def probe(ctx: LoadContext) -> LoadContext:
    """Optional, last: fidelity of the loaded model (perplexity, agreement and KL vs unquantized, a sample)."""
    from qloader.core.units import mib
    from qloader.measure.inventory import footprint_bytes
    from qloader.probe.fidelity import run_probe

    result = run_probe(ctx.model, ctx.checkpoint, ctx.dtype, ctx.pre_quantized, ctx.cfg.probe, ctx.model_choice)
    # The probe's forward pass may change what the weights occupy (compressed-tensors decompresses the
    # whole model on its first forward): record the storage really held after it.
    method = method_of(ctx.quantization_config)
    after = footprint_bytes(ctx.model, method)
    result["footprint_after_bytes"] = after
    if ctx.inventory is not None and after != ctx.inventory.footprint_bytes:
        log.warning(
            "probe: the forward pass changed the weights' storage from %s to %s%s",
            mib(ctx.inventory.footprint_bytes),
            mib(after),
            f" ({note})" if method is not None and (note := method.save_note(ctx.model)) else "",
        )
    return ctx.next(probe=result)


STAGES = (resolve, instantiate_quantizer, validate, device_map, preprocess, load, postprocess)


def stages_for(cfg: DictConfig) -> list[tuple[str, object]]:
    """The seven stages, then `save` and `probe` when enabled; `mode=plan` stops after `preprocess`."""
    stages = list(zip(STAGE_NAMES, STAGES, strict=True))
    if cfg.mode == "plan":
        return stages[: STAGE_NAMES.index("preprocess") + 1]
    stages += [("save", save)] if cfg.save.enabled else []
    return stages + [("probe", probe)] if cfg.probe.enabled else stages
