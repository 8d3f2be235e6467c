"""The seven stages of a load, in the order they run, then the optional `save` and `probe`.

Each stage takes the run's `LoadContext` and returns the next one; it only sequences steps that live in the
layers below (the quantizer's lifecycle in `qloader.quant.lifecycle`, transformers' loading blocks in
`qloader.loading.hf_loading`, checks in `qloader.loading.checks`). None of them measures itself: the
pipeline wraps every call (`qloader.runs.pipeline`).
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext

from omegaconf import DictConfig

from qloader.checkpoint import integrity
from qloader.checkpoint import writer as checkpoint_writer
from qloader.checkpoint.reader import default_hash_cache, inspect_checkpoint
from qloader.checkpoint.sources import checkpoint_folder, from_hub, hub_origin, hub_plan_folder
from qloader.core.errors import CheckpointError, CheckpointMismatchError, DeviceMapError, LoadError
from qloader.core.names import STAGE_NAMES, dtype_name
from qloader.loading import cache_use, checks, devices
from qloader.loading.context import LoadContext
from qloader.quant import lifecycle
from qloader.quant.merge import check_backend, missing_quant_state

log = logging.getLogger("qloader")


def resolve(ctx: LoadContext) -> LoadContext:
    """Composed config -> checkpoint folder, transformers config, model class, quantization (merged if
    pre-quantized), dtype; then the quantized cache: a hit swaps in the cached pre-quantized checkpoint. A run
    that saves locks save.dir first, until the run ends (released here if resolve fails), so a second writer is
    refused before any work."""
    checks.check_config(ctx.cfg)
    saving = ctx.cfg.save.enabled and ctx.cfg.mode != "plan"
    save_lock = checkpoint_writer.lock_save_dir(ctx.cfg.save) if saving else None
    try:
        return cache_use.consult(_resolve_model(ctx).next(save_lock=save_lock))
    except BaseException:
        if save_lock is not None:
            save_lock.release()
        raise


def _resolve_model(ctx: LoadContext) -> LoadContext:
    from qloader.loading import hf_loading

    check_backend(ctx.cfg.quant)
    planning = ctx.cfg.mode == "plan"  # a plan hashes nothing, and needs no more than config.json
    checkpoint = _inspect(ctx.cfg.model, hash_files=not planning, partial=planning)
    hf_config = hf_loading.read_config(checkpoint.path, ctx.cfg.model.trust_remote_code)
    checks.check_model_size(hf_config, checkpoint, ctx.cfg.device_map)  # before anything the size costs is built
    choice = hf_loading.model_class(hf_config, ctx.cfg.model.task, ctx.cfg.model.trust_remote_code)
    if choice.disagreement:
        log.warning("%s", choice.disagreement)
    hf_loading.check_generation_config(checkpoint.path, choice.cls)
    if ctx.cfg.probe.enabled:
        from qloader.probe.fidelity import check_probe_task

        check_probe_task(choice, checkpoint.path)
    device = devices.weights_device(ctx.cfg.device_map)
    quantization = lifecycle.resolve_quantization(ctx.cfg.quant, device, hf_config, checkpoint.path / "config.json")
    dtype = hf_loading.resolve_dtype(dtype_name(ctx.cfg.dtype.name), checkpoint, hf_config)
    quantization = lifecycle.add_calibration(quantization, ctx.cfg.quant, checkpoint.path, dtype, device)
    return ctx.next(
        checkpoint=checkpoint, hf_config=hf_config, model_choice=choice, quantization=quantization, dtype=dtype
    )


def _inspect(model: DictConfig, hash_files: bool, partial: bool = False):
    """The checkpoint the `model` source gives, its headers and hashes read; custom code refused unless trusted.
    `partial` (mode=plan): config.json alone, or some of the shards, is enough."""
    if partial and from_hub(model):  # a plan reads the hub's config.json and headers, no weight
        folder, headers_only = hub_plan_folder(model.repo_id, model.get("revision"))
    else:
        folder, headers_only = checkpoint_folder(model), False
    checkpoint = inspect_checkpoint(
        folder,
        hashes=default_hash_cache(trust=not model.get("verify_hashes", False)),
        hash_files=hash_files,
        allow_pickle=model.allow_pickle,
        partial=partial,
    )
    if (hub := hub_origin(model, checkpoint.path)) is not None:
        checkpoint = dataclasses.replace(checkpoint, hub=hub)
    if headers_only:  # the shards here are the hub's headers, with no data; the folder is named after the commit
        contents = "headers" if checkpoint.shards else checkpoint.contents
        checkpoint = dataclasses.replace(checkpoint, hub={**hub, "commit": folder.name}, contents=contents)
    integrity.check_remote_code(checkpoint.path / "config.json", trusted=model.trust_remote_code)
    return checkpoint


def instantiate_quantizer(ctx: LoadContext) -> LoadContext:
    """Merged quantization config -> transformers' quantizer object (None when unquantized)."""
    quantizer, dtype, hf_config = lifecycle.instantiate_quantizer(ctx.quantization, ctx.dtype, ctx.hf_config)
    return ctx.next(quantizer=quantizer, dtype=dtype, hf_config=hf_config)


def validate(ctx: LoadContext) -> LoadContext:
    """Devices, library versions, pinned hashes and memory, checked before any shard is read."""
    from qloader.measure import environment

    hypothetical = checks.hypothetical_gpus(ctx.cfg.device_map) if ctx.cfg.mode == "plan" else []
    cuda_devices = checks.check_cuda_request(ctx.cfg.device_map, hypothetical)
    request = devices.device_map_request(ctx.cfg.device_map)
    lifecycle.check_host(ctx.quantization, cuda_devices)  # a method's own GPU check asks this host's GPUs
    environment.check_versions(None if ctx.method is None else ctx.method.versions)
    lifecycle.validate_quantizer(ctx.quantization, ctx.quantizer, devices.quantizer_request(request))
    checks.check_pinned_hashes(ctx.cfg.model.get("expected_sha256") or {}, ctx.checkpoint)
    return ctx.next(
        environment=environment.check_memory(ctx.weights_checkpoint), hypothetical_devices=tuple(hypothetical)
    )


def device_map(ctx: LoadContext) -> LoadContext:
    """The final module -> device map: the quantizer's update, then accelerate's inference if asked."""
    from qloader.loading import hf_loading
    from qloader.measure.plan import estimate

    request = hf_loading.normalize_device_map(devices.device_map_request(ctx.cfg.device_map))
    request = lifecycle.update_device_map(ctx.quantizer, request)
    offload_folder = devices.offload_folder(ctx.cfg.device_map, ctx.checkpoint.path)
    planning = ctx.cfg.mode == "plan"  # a plan records what a load would refuse, and goes on
    if isinstance(request, dict):
        _refuse_disk_offload(ctx, request, request)
        devices.check_disk(request, offload_folder, f"device_map.modules {request}")
        skeleton = {}
        if ctx.cfg.device_map.strategy == "explicit":  # the names are checked against the model's modules
            model, source = hf_loading.build_skeleton(
                ctx.model_choice.cls, ctx.hf_config, ctx.dtype, ctx.quantizer, request, ctx.weights_checkpoint
            )
            devices.check_module_names(request, model)
            skeleton = {"model": model, "source": source}
        final = devices.expand_default(request, skeleton["model"]) if skeleton else request
        if devices.on_disk(final):  # transformers' check of the map, deferred from `validate`
            lifecycle.validate_device_map(ctx.quantizer, request, final, ctx.quantization)
        return ctx.next(device_map_request=request, device_map=final, offload_folder=offload_folder, **skeleton)
    # Sizing needs the quantized skeleton (4-bit modules weigh half a byte per weight): build it on
    # the meta device here; `preprocess` goes on with it.
    sizing, source = hf_loading.build_skeleton(
        ctx.model_choice.cls, ctx.hf_config, ctx.dtype, ctx.quantizer, request, ctx.weights_checkpoint
    )
    max_memory = devices.max_memory_request(ctx.cfg.device_map)
    final = hf_loading.infer_device_map(sizing, request, dict(max_memory or {}) or None, ctx.quantizer)  # a copy:
    # accelerate converts the sizes in place, and the messages below show them as the user wrote them
    refusals = []
    try:
        if (on_disk := devices.on_disk(final)) and offload_folder is None:
            need = estimate(sizing, {"": "cpu"}, 0, None, ctx.method, ctx.quantizer).footprint_bytes
            refusal = lifecycle.disk_offload_refusal(ctx.quantization, request)
            raise DeviceMapError(devices.does_not_fit(need, request, max_memory, on_disk, refusal))
        _refuse_disk_offload(ctx, request, final, sizing)
        lifecycle.validate_device_map(ctx.quantizer, request, final, ctx.quantization)
    except DeviceMapError as e:
        if not planning:
            raise
        refusals.append(str(e))
    return ctx.next(
        device_map_request=request,
        device_map=final,
        offload_folder=offload_folder,
        model=sizing,
        source=source,
        refusals=tuple(refusals),
    )


def _refuse_disk_offload(ctx: LoadContext, request, final: dict, sizing=None) -> None:
    """Modules on disk with a method that cannot offload them: one DeviceMapError, before any shard is read."""
    from qloader.measure.plan import estimate

    placed = devices.on_disk(final)
    if not placed or (refusal := lifecycle.disk_offload_refusal(ctx.quantization, request)) is None:
        return
    need = 0 if sizing is None else estimate(sizing, {"": "cpu"}, 0, None, ctx.method, ctx.quantizer).footprint_bytes
    max_memory = devices.max_memory_request(ctx.cfg.device_map)
    raise DeviceMapError(devices.cannot_offload(refusal, request, max_memory, placed, need))


def preprocess(ctx: LoadContext) -> LoadContext:
    """The model skeleton on the meta device, with the method's module swaps, checked against the checkpoint's
    headers; the plan (the bytes per device); a warning for quantized modules this host cannot run."""
    from qloader.loading import hf_loading
    from qloader.measure.plan import estimate, refusal

    model, source = ctx.model, ctx.source  # `device_map` built it to size the model, from the same arguments
    if model is None:
        model, source = hf_loading.build_skeleton(
            ctx.model_choice.cls,
            ctx.hf_config,
            ctx.dtype,
            ctx.quantizer,
            ctx.device_map_request,
            ctx.weights_checkpoint,
        )
    checkpoint = ctx.weights_checkpoint
    load_config = hf_loading.load_state_config(
        model, checkpoint, ctx.device_map, ctx.dtype, ctx.quantizer, ctx.offload_folder
    )
    created = set() if ctx.method is None or ctx.pre_quantized else ctx.method.created_keys(model)
    try:
        integrity.check_tensors_fit_model(
            model,
            checkpoint.shapes,
            load_config.weight_mapping,
            ctx.quantizer,
            checkpoint.path,
            created,
            source.shapes,
            partial=checkpoint.contents != "checkpoint",
        )
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(_with_task_hint(str(e), ctx)) from e
    max_memory = devices.max_memory_request(ctx.cfg.device_map)
    plan = estimate(
        model, ctx.device_map, checkpoint.largest_shard_bytes, max_memory, ctx.method, ctx.quantizer, source
    ).with_refusals(list(ctx.refusals), offload=ctx.offload_folder is not None)
    plan = dataclasses.replace(plan, hypothetical_devices=list(ctx.hypothetical_devices))
    plan = plan.with_inference(
        model, ctx.hf_config.get_text_config(), ctx.dtype, ctx.cfg.plan.batch_size, ctx.cfg.plan.seq_len
    )
    if ctx.cfg.mode != "plan" and (why := refusal(plan)) is not None:
        raise DeviceMapError(why)
    if ctx.cfg.save.enabled and ctx.cfg.mode != "plan":
        checkpoint_writer.check_save_space(ctx.cfg.save, plan.footprint_bytes)
    unmatched = _logged(lifecycle.unmatched_module_names(ctx.quantization, model))
    warnings = ctx.warnings + _forward_limit(ctx, model) + unmatched
    if ctx.cfg.mode == "plan" and not any(e.quantized_bytes for e in plan.devices.values()):
        warnings += _nothing_quantized(ctx, model, plan.kept, planned=True)
    return ctx.next(model=model, source=source, load_config=load_config, plan=plan, warnings=warnings)


def _logged(lines: list[str]) -> tuple[str, ...]:
    for line in lines:
        log.warning("%s", line)
    return tuple(lines)


def _nothing_quantized(ctx: LoadContext, model, kept: list, planned: bool = False) -> tuple[str, ...]:
    """A load that asked for quantization and quantized no module: its footprint is the unquantized one. One
    warning, saying why when the plug-in can tell (else what stayed, with the inventory's reasons)."""
    if ctx.method is None or ctx.pre_quantized:
        return ()
    from qloader.quant.merge import describe

    why = ctx.method.nothing_quantized(ctx.quantizer, model)
    if why is None:
        more = f"; {len(kept) - 3} more" if len(kept) > 3 else ""
        why = "kept: " + "; ".join(group.describe() for group in kept[:3]) + more
    did = "would leave every layer as it is" if planned else "left every layer as it was"
    return _logged(
        [
            f"nothing {'would be' if planned else 'was'} quantized: {describe(ctx.quantization_config)} {did}, so the "
            f"footprint is the unquantized one; {why}"
        ]
    )


def _forward_limit(ctx: LoadContext, model) -> tuple[str, ...]:
    """Quantized modules that will load but whose forward pass this host cannot run: a warning, or, when the
    probe is to run one, a ProbeError now, before any shard is read."""
    limit = None if ctx.method is None else ctx.method.forward_limit(ctx.quantizer, model, ctx.device_map)
    if limit is None:
        return ()
    line = f"quant {ctx.method.quant_method}: {limit.message()}"
    if ctx.cfg.probe.enabled and ctx.cfg.mode != "plan":
        from qloader.probe.fidelity import refuse_forward_limit

        refuse_forward_limit(line)
    log.warning("%s", line)
    return (line,)


def _with_task_hint(message: str, ctx: LoadContext) -> str:
    """A mismatch message, with what to change when model.task built another class than config.json names."""
    choice = ctx.model_choice
    if choice is None or not choice.disagreement:
        return message
    return f"{message}. {choice.disagreement}: {choice.suggestion(ctx.hf_config)}"


def load(ctx: LoadContext) -> LoadContext:
    """Stream the shards, quantizing each weight as it is read, and place it on its device."""
    from qloader.loading import hf_loading

    checkpoint = ctx.weights_checkpoint
    if ctx.pre_quantized and (missing := missing_quant_state(ctx.model, checkpoint.tensors, ctx.quantizer)):
        raise CheckpointError(f"pre-quantized checkpoint is incomplete: {'; '.join(missing)}")
    placed = (None, None) if ctx.pre_quantized else (ctx.model, ctx.device_map)  # what the kernel will quantize
    kernels = nullcontext(None) if ctx.method is None else ctx.method.loading_kernel(ctx.cfg.quant, *placed)
    try:
        with kernels as kernel, hf_loading.shard_progress(checkpoint) as on_batch:
            info, offload_index = hf_loading.load_shards(ctx.model, checkpoint, ctx.load_config, on_batch)
    except (OSError, RuntimeError, ValueError) as e:
        raise LoadError(f"{checkpoint.path}: {type(e).__name__}: {e}") from e
    return ctx.next(kernel=kernel, loading_info=info, offload_index=offload_index)


def postprocess(ctx: LoadContext) -> LoadContext:
    """Finish the model as from_pretrained does (tie weights, eval, dispatch), check it, take its inventory."""
    from qloader.loading import hf_loading
    from qloader.measure.inventory import take_inventory

    info, checkpoint = ctx.loading_info, ctx.weights_checkpoint
    try:
        hf_loading.finalize(ctx.model, ctx.load_config, info, ctx.quantizer, ctx.offload_index)
    except RuntimeError as e:  # transformers' own load report: size mismatches, conversion errors
        raise LoadError(f"{checkpoint.path}: {e}") from e
    if info.missing_keys or info.unexpected_keys:  # `preprocess` checked the headers; this checks the load itself
        message = (
            f"{checkpoint.path}: loading left {len(info.missing_keys)} weight(s) missing "
            f"({integrity.listing(info.missing_keys)}) and {len(info.unexpected_keys)} unexpected "
            f"({integrity.listing(info.unexpected_keys)})"
        )
        raise CheckpointMismatchError(_with_task_hint(message, ctx))
    if stranded := hf_loading.stranded_on_meta(ctx.model):
        raise LoadError(_stranded_message(ctx, stranded))
    offloaded = hf_loading.offloaded_weights(ctx.load_config, ctx.offload_index)
    storage = None if ctx.method is None else ctx.method.storage_tensors
    finite_check = integrity.check_finite(
        ctx.model, ctx.cfg.validate, checkpoint.path, checkpoint.parameters, offloaded, storage
    )
    trust_cache = not ctx.cfg.model.get("verify_hashes", False)  # verify_hashes: no digest from any cache
    inventory = take_inventory(
        ctx.model,
        info,
        offloaded,
        ctx.cfg.validate.fingerprint,
        ctx.method,
        ctx.source.parameters,
        ctx.quantizer,
        trust_cache,
    )
    warnings = ctx.warnings
    if inventory.quantized_count == 0:
        warnings += _nothing_quantized(ctx, ctx.model, inventory.kept)
    return ctx.next(finite_check=finite_check, inventory=inventory, warnings=warnings)


def _stranded_message(ctx: LoadContext, stranded: list[str]) -> str:
    """Weights left on the meta device with nothing to load them: a model that cannot run is never a success."""
    way_out = ""
    if devices.on_disk(ctx.device_map or {}):
        way_out = (
            "; load it with every module in memory (raise device_map.max_memory, or map the disk entries of "
            "device_map.modules to cpu)"
        )
    return (
        f"{ctx.checkpoint.path}: after loading, {len(stranded)} weight(s) hold no value (on the meta device, and no "
        f"offload hook loads them): {integrity.listing(stranded)}; the model cannot run a forward pass{way_out}"
    )


def cache(ctx: LoadContext) -> LoadContext:
    """After the seven, before `save` and `probe` (and so before any forward pass): a cache miss stores the model
    in the quantized cache (`qloader.loading.cache_use`)."""
    return cache_use.fill(ctx)


def save(ctx: LoadContext) -> LoadContext:
    """Optional, after the seven: write the loaded model as a checkpoint plain `from_pretrained` reads."""
    saved = checkpoint_writer.save_loaded_model(ctx.model, ctx.quantization_config, ctx.checkpoint.path, ctx.cfg.save)
    return ctx.next(saved=saved)


def probe(ctx: LoadContext) -> LoadContext:
    """Optional, last: fidelity of the loaded model (perplexity, agreement and KL vs unquantized, a sample) and its
    generation speed, with the peak memory while generating measured around it from here."""
    from qloader.core.units import mib
    from qloader.measure.inventory import footprint_bytes
    from qloader.measure.memory import peak_window
    from qloader.probe.fidelity import run_probe

    # on a cache hit the input checkpoint is not pre-quantized: the probe compares with it as on a miss
    pre_quantized = ctx.pre_quantized and not ctx.cache_hit
    result = run_probe(
        ctx.model, ctx.checkpoint, ctx.dtype, pre_quantized, ctx.cfg.probe, ctx.model_choice, memory_window=peak_window
    )
    # The probe's forward pass may change what the weights occupy (compressed-tensors decompresses the
    # whole model on its first forward): record the storage really held after it.
    after = footprint_bytes(ctx.model, ctx.method)
    result["footprint_after_bytes"] = after
    if ctx.inventory is not None and after != ctx.inventory.footprint_bytes:
        note = None if ctx.method is None else ctx.method.save_note(ctx.model)
        log.warning(
            "probe: the forward pass changed the weights' storage from %s to %s%s",
            mib(ctx.inventory.footprint_bytes),
            mib(after),
            f" ({note})" if note else "",
        )
    return ctx.next(probe=result)


STAGES = (resolve, instantiate_quantizer, validate, device_map, preprocess, load, postprocess)


def stages_for(cfg: DictConfig) -> list[tuple[str, object]]:
    """The seven stages, then `cache` (unless cache.quantized=false), `save` and `probe` when enabled; `mode=plan`
    stops after `preprocess`."""
    stages = list(zip(STAGE_NAMES, STAGES, strict=True))
    if cfg.mode == "plan":
        return stages[: STAGE_NAMES.index("preprocess") + 1]
    stages += [("cache", cache)] if cfg.get("cache") is not None and cfg.cache.quantized is not False else []
    stages += [("save", save)] if cfg.save.enabled else []
    return stages + [("probe", probe)] if cfg.probe.enabled else stages
