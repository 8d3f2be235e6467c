"""The seam with transformers' loading internals.

`from_pretrained` runs these same building blocks in one long function. qloader calls them
one stage at a time, so each can be measured, and a qloader load is the same model as a
`from_pretrained` load with the same settings. Every call into transformers' private loading
API lives in this module; the supported transformers range is pinned in pyproject.toml.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, convert_and_load_state_dict_in_model
from transformers.integrations.accelerate import (
    accelerate_disk_offload,
    accelerate_dispatch,
    check_and_set_device_map,
    expand_device_map,
    get_balanced_memory,
    get_max_memory,
    infer_auto_device_map,
)
from transformers.modeling_utils import LoadStateDictConfig, _get_dtype, caching_allocator_warmup
from transformers.models.auto.auto_factory import _get_model_class
from transformers.monkey_patching import patch_output_recorders
from transformers.utils import ContextManagers
from transformers.utils import logging as hf_logging
from transformers.utils.loading_report import LoadStateDictInfo

from qloader.checkpoint import Checkpoint
from qloader.errors import CheckpointError


def causal_lm_class(config: PreTrainedConfig, trust_remote_code: bool = False) -> type[PreTrainedModel]:
    """The class `AutoModelForCausalLM` would pick for this config (its `auto_map` class if trusted)."""
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], config._name_or_path)
    try:
        return _get_model_class(config, AutoModelForCausalLM._model_mapping)
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"config.json model_type '{config.model_type}' has no causal-LM class in transformers"
        ) from e


def resolve_dtype(name: str, checkpoint: Checkpoint, config: PreTrainedConfig) -> torch.dtype:
    """`dtype=` as from_pretrained reads it ('auto': config.json's dtype, else the weights')."""
    files = [str(s) for s in checkpoint.shards]
    _, dtype = _get_dtype(name, files, config, checkpoint.sharded_metadata, None, True, None)
    return dtype


def normalize_device_map(request: str | dict) -> str | dict:
    """'cpu' -> {'': device('cpu')}, 'cuda' -> {'': device('cuda:0')}; strategies stay strings."""
    return check_and_set_device_map(request)


def build_skeleton(
    model_cls: type[PreTrainedModel],
    config: PreTrainedConfig,
    dtype: torch.dtype,
    quantizer,
    device_map_request: str | dict | None,
    checkpoint: Checkpoint,
) -> PreTrainedModel:
    """The model on the meta device, with quantized modules swapped in (no weights touched)."""
    config = copy.deepcopy(config)
    config.name_or_path = str(checkpoint.path)
    init = model_cls.get_init_context(dtype, quantizer is not None, False, None)
    with ContextManagers(init):
        model = model_cls(config)
        patch_output_recorders(model)
        if quantizer is not None:
            quantizer.preprocess_model(
                model=model,
                dtype=dtype,
                device_map=device_map_request,
                checkpoint_files=[str(s) for s in checkpoint.shards],
                use_kernels=False,
            )
    return model


def infer_device_map(model: PreTrainedModel, strategy: str, max_memory: dict | None, quantizer) -> dict:
    """`_get_device_map` without its closing quantizer check, so that the caller can first name the
    modules that did not fit; the caller runs `quantizer.validate_environment(device_map=...)`."""
    no_split = model._no_split_modules
    if strategy == "sequential":
        budget = get_max_memory(max_memory)
    else:
        low_zero = strategy == "balanced_low_0"
        budget = get_balanced_memory(
            model, max_memory=max_memory, no_split_module_classes=no_split, hf_quantizer=quantizer, low_zero=low_zero
        )
    if quantizer is not None:
        budget = quantizer.adjust_max_memory(budget)
    return infer_auto_device_map(
        model,
        max_memory=budget,
        no_split_module_classes=no_split,
        hf_quantizer=quantizer,
        no_placement_params=getattr(model, "_no_placement_params", None),
    )


def load_state_config(
    model: PreTrainedModel, checkpoint: Checkpoint, device_map, dtype, quantizer, offload_folder: Path | None = None
):
    return LoadStateDictConfig(
        disk_offload_folder=None if offload_folder is None else str(offload_folder),
        pretrained_model_name_or_path=str(checkpoint.path),
        sharded_metadata=checkpoint.sharded_metadata,
        device_map=device_map,
        dtype=dtype,
        dtype_plan=model._get_dtype_plan(dtype),
        hf_quantizer=quantizer,
        weights_only=True,
        weight_mapping=get_model_conversion_mapping(model, None, quantizer),
        use_safetensors=checkpoint.format == "safetensors",
    )


def _owner(key: str, modules: set[str]) -> str:
    """The deepest module a checkpoint key belongs to ('l.0.q.weight.absmax' -> 'l.0.q')."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if (prefix := ".".join(parts[:end])) in modules:
            return prefix
    return key


def shard_batches(model: PreTrainedModel, keys_per_shard: dict[Path, list[str]], weight_mapping) -> list[list]:
    """Group checkpoint keys into one batch per shard, keeping each module's tensors together.

    A pre-quantized module's packed weight and quant-state tensors may sit in different shards;
    its whole group loads with the shard where it first appears. Models whose conversions fuse
    tensors across modules (e.g. MoE experts) load in one batch.
    """
    if any(isinstance(t, WeightConverter) for t in weight_mapping or []):
        return [[(shard, key) for shard, keys in keys_per_shard.items() for key in keys]]
    modules = {name for name, _ in model.named_modules()}
    batch_of_owner: dict[str, int] = {}
    batches: list[list] = [[] for _ in keys_per_shard]
    for index, (shard, keys) in enumerate(keys_per_shard.items()):
        for key in keys:
            batches[batch_of_owner.setdefault(_owner(key, modules), index)].append((shard, key))
    return batches


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Mute transformers' own per-call progress bar; the load stage shows one bar for the whole load."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _lazy_tensors(stack: ExitStack, shard: Path, fmt: str) -> Callable[[str], object]:
    """name -> the tensor, read only when it is materialized: mmap, as from_pretrained reads shards."""
    if fmt == "pickle":
        from qloader.checkpoint import load_pickle_shard

        return load_pickle_shard(shard).__getitem__
    return stack.enter_context(safe_open(shard, framework="pt", device="cpu", backend="mmap")).get_slice


def load_shards(
    model: PreTrainedModel,
    checkpoint: Checkpoint,
    load_config: LoadStateDictConfig,
    on_batch: Callable[[int, int], None] = lambda index, tensors: None,
) -> tuple[LoadStateDictInfo, dict | None]:
    """Stream the shards: each batch is read lazily (mmap), quantized on the fly and placed.

    Returns the load report and, when modules sit on 'disk', accelerate's offload index.
    """
    expected = set(model.state_dict())
    offload_index = None
    if load_config.device_map is not None and "disk" in load_config.device_map.values():
        offload_index = accelerate_disk_offload(
            model,
            load_config.disk_offload_folder,
            [str(s) for s in checkpoint.shards],
            load_config.device_map,
            checkpoint.sharded_metadata,
            load_config.weight_mapping,
        )
    if load_config.device_map is not None:
        caching_allocator_warmup(
            model, expand_device_map(load_config.device_map, list(expected)), load_config.hf_quantizer
        )
    loaded: set[str] = set()
    unexpected: set[str] = set()
    mismatched: set = set()
    errors: list[str] = []
    with ExitStack() as stack, _quiet_transformers():
        handles = {s: _lazy_tensors(stack, s, checkpoint.format) for s in checkpoint.shards}
        keys_per_shard: dict[Path, list[str]] = {s: [] for s in checkpoint.shards}
        for key, shard in checkpoint.tensors.items():  # read from the headers in `resolve`
            keys_per_shard[shard].append(key)
        for index, batch in enumerate(shard_batches(model, keys_per_shard, load_config.weight_mapping)):
            state_dict = {key: handles[shard](key) for shard, key in batch}
            info, offload_index = convert_and_load_state_dict_in_model(
                model=model, state_dict=state_dict, load_config=load_config, disk_offload_index=offload_index
            )
            # every expected key is in each call's state dict, so what a call did not miss, it loaded
            loaded |= expected - info.missing_keys
            unexpected |= info.unexpected_keys
            mismatched |= info.mismatched_keys
            errors += info.error_msgs
            on_batch(index, len(batch))
    info = LoadStateDictInfo(
        missing_keys=expected - loaded,
        unexpected_keys=unexpected,
        mismatched_keys=mismatched,
        error_msgs=errors,
        conversion_errors={},
        skipped_pp_keys=set(),
    )
    return info, offload_index


def finalize(
    model: PreTrainedModel,
    load_config: LoadStateDictConfig,
    info: LoadStateDictInfo,
    quantizer,
    offload_index: dict | None = None,
) -> None:
    """What from_pretrained does after the weights: tie, init missing, eval, generation config, dispatch."""
    PreTrainedModel._finalize_model_loading(model, load_config, info)
    model.eval()
    if model.can_generate():
        model.adjust_generation_fn(
            generation_config=None,
            from_auto_class=True,
            from_pipeline=None,
            pretrained_model_name_or_path=load_config.pretrained_model_name_or_path,
            cache_dir=None,
            force_download=False,
            proxies=None,
            local_files_only=True,
            token=None,
            revision=None,
            subfolder="",
            trust_remote_code=False,
        )
    device_map = load_config.device_map
    if device_map is not None and len(set(device_map.values())) > 1:
        accelerate_dispatch(model, quantizer, device_map, load_config.disk_offload_folder, offload_index, False)
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)


def offloaded_weights(load_config: LoadStateDictConfig, offload_index: dict | None):
    """name -> tensor for the weights placed on 'disk', read one at a time (accelerate's loader)."""
    if not offload_index:
        return None
    from accelerate.utils import OffloadedWeightsLoader

    return OffloadedWeightsLoader(save_folder=load_config.disk_offload_folder, index=offload_index)
