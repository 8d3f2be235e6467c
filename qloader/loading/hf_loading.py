"""The seam with transformers' loading internals.

`from_pretrained` runs these same building blocks in one long function. qloader calls them
one stage at a time, so each can be measured, and a qloader load is the same model as a
`from_pretrained` load with the same settings. Every call into transformers' private loading
API lives in this module; the supported transformers range is pinned in pyproject.toml.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedConfig, PreTrainedModel
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

from qloader.checkpoint import config_files
from qloader.checkpoint.reader import Checkpoint
from qloader.core.errors import CheckpointError, ConfigError
from qloader.core.names import FALLBACK_TASK
from qloader.core.names import TASK_AUTO_CLASSES as TASKS


@dataclass(frozen=True)
class ModelChoice:
    """The model class a load builds, and how it was chosen."""

    cls: type[PreTrainedModel]
    task: str | None
    """The task whose Auto class gives `cls` ('causal-lm', ...); None for a class config.json names that no
    task's Auto class builds for this config (e.g. BertForPreTraining)."""
    requested: str
    """`model.task` as asked ('auto' included)."""
    auto_class: str | None
    """The transformers Auto class that gives the same class (`AutoModelForSeq2SeqLM`), when there is one."""
    architecture: str | None
    """The first class config.json `architectures` names (None when it names none)."""
    chosen_by: str = "model.task"
    """How: 'model.task' (an explicit task), 'architectures' (auto: config.json names it), 'fallback' (auto:
    the causal-LM class, config.json names no class transformers has), or 'auto_map' (the checkpoint's own
    code, model.trust_remote_code=true)."""

    @property
    def disagreement(self) -> str | None:
        """What to tell a user whose model.task builds another class than config.json names; None if they agree."""
        if self.architecture is None or self.cls.__name__ == self.architecture or self.requested == "auto":
            return None
        return (
            f"config.json architectures names {self.architecture}, "
            f"but model.task={self.requested} builds {self.cls.__name__}"
        )

    def suggestion(self, config: PreTrainedConfig) -> str:
        """'use model.task=X (or model.task=auto)' for the task that builds config.json's class."""
        task = task_of(config, self.architecture) if self.architecture else None
        return f"use model.task={task} (or model.task=auto)" if task else "use model.task=auto"


def _auto_class(task: str):
    import transformers

    return getattr(transformers, TASKS[task])


def _mapped_class(config: PreTrainedConfig, task: str) -> type[PreTrainedModel] | None:
    """The class the task's Auto class maps this config to (transformers' own mapping), or None."""
    try:
        return _get_model_class(config, _auto_class(task)._model_mapping)
    except (KeyError, ValueError):
        return None


def tasks_for(config: PreTrainedConfig) -> list[str]:
    """Every task whose Auto class has a model class for this config."""
    return [task for task in TASKS if _mapped_class(config, task) is not None]


def task_of(config: PreTrainedConfig, class_name: str) -> str | None:
    """The first task whose Auto class builds `class_name` for this config (config.json architectures)."""
    return next((t for t in TASKS if getattr(_mapped_class(config, t), "__name__", None) == class_name), None)


def _remote_class(config: PreTrainedConfig, reference: str) -> type[PreTrainedModel]:
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(reference, config._name_or_path)


def _named_class(config: PreTrainedConfig, name: str) -> type[PreTrainedModel] | None:
    """transformers' class of that name, when it is a model class for this config."""
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except (ImportError, RuntimeError):  # a class whose optional dependency is missing
        return None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        return None
    return cls if isinstance(config, getattr(cls, "config_class", None) or PreTrainedConfig) else None


def _choices_text(config: PreTrainedConfig, architecture: str | None = None) -> str:
    """'model.task=seq2seq-lm (the task of T5ForConditionalGeneration)', else every task that has a class."""
    if architecture and (task := task_of(config, architecture)):
        return f"model.task={task} (the task of {architecture})"
    tasks = tasks_for(config)
    if not tasks:
        return "a model.task whose Auto class has a class for it (none of qloader's tasks has)"
    return "one of " + ", ".join(f"model.task={t}" for t in tasks)


def model_class(config: PreTrainedConfig, task: str = "auto", trust_remote_code: bool = False) -> ModelChoice:
    """The class to build for `model.task`, from transformers' own Auto class mappings.

    `auto`: the class config.json `architectures` names, else the causal-LM class. Any other task: the class
    that task's Auto class picks for this config (`AutoModelForSeq2SeqLM` for seq2seq-lm). With
    trust_remote_code, the config's `auto_map` entry for that Auto class wins, as in `from_pretrained`.
    """
    task = getattr(task, "value", task)
    auto_map = (getattr(config, "auto_map", None) or {}) if trust_remote_code else {}
    architecture = next(iter(getattr(config, "architectures", None) or []), None)
    model_type = getattr(config, "model_type", None)

    def chosen(cls, task_name: str | None, how: str) -> ModelChoice:
        auto = TASKS.get(task_name) if task_name else None
        return ModelChoice(cls, task_name, task, auto, architecture, how)

    if task != "auto":
        if TASKS[task] in auto_map:
            return chosen(_remote_class(config, auto_map[TASKS[task]]), task, "auto_map")
        if (cls := _mapped_class(config, task)) is not None:
            return chosen(cls, task, "model.task")
        named = f"; config.json architectures names {architecture}" if architecture else ""
        raise ConfigError(
            [
                f"model.task={task}: transformers' {TASKS[task]} has no class for config.json model_type "
                f"'{model_type}'{named}; use {_choices_text(config, architecture)} or model.task=auto"
            ]
        )
    if architecture is not None:
        by_name = {ref.rsplit(".", 1)[-1]: (key, ref) for key, ref in auto_map.items()}
        if architecture in by_name:  # the checkpoint's own class, by the name config.json gives it
            key, ref = by_name[architecture]
            owner = next((t for t, auto in TASKS.items() if auto == key), None)
            return chosen(_remote_class(config, ref), owner, "auto_map")
        if (owner := task_of(config, architecture)) is not None:
            if TASKS[owner] in auto_map:
                return chosen(_remote_class(config, auto_map[TASKS[owner]]), owner, "auto_map")
            return chosen(_mapped_class(config, owner), owner, "architectures")
        if (cls := _named_class(config, architecture)) is not None:
            return chosen(cls, None, "architectures")
    if TASKS[FALLBACK_TASK] in auto_map:
        return chosen(_remote_class(config, auto_map[TASKS[FALLBACK_TASK]]), FALLBACK_TASK, "auto_map")
    if (cls := _mapped_class(config, FALLBACK_TASK)) is not None:
        return chosen(cls, FALLBACK_TASK, "fallback")
    names = f"names {architecture}, which transformers does not have" if architecture else "names no architectures"
    raise CheckpointError(
        f"config.json (model_type '{model_type}') {names}, and model_type '{model_type}' has no causal-LM class "
        f"in transformers; set {_choices_text(config)}"
    )


def causal_lm_class(config: PreTrainedConfig, trust_remote_code: bool = False) -> type[PreTrainedModel]:
    """The class `AutoModelForCausalLM` would pick for this config (its `auto_map` class if trusted)."""
    return model_class(config, FALLBACK_TASK, trust_remote_code).cls


def read_config(path: Path, trust_remote_code: bool) -> PreTrainedConfig:
    """config.json as `AutoConfig` reads it; unreadable or invalid is one CheckpointError naming the file (and the
    field: its integer fields and quantization_config are checked first, qloader.checkpoint.config_files)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    config_json = path / "config.json"
    config_files.check_config_fields(config_files.read_json_object(config_json), config_json)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_json}: {_unknown_model_type(config_json) or e}") from e
    except (TypeError, AttributeError, RecursionError, StrictDataclassError) as e:  # a field transformers refused
        reason = " ".join(str(e).split())
        raise CheckpointError(f"{config_json}: {type(e).__name__}: {reason}; {config_files.RESTORE}") from e


def _unknown_model_type(config_json: Path) -> str | None:
    """'model_type 'x' is not an architecture transformers 5.0 knows; ...' when that is why AutoConfig refused it."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_files.read_json_object(config_json).get("model_type")
    if model_type is None or model_type in CONFIG_MAPPING:
        return None
    return (
        f"model_type '{model_type}' is not an architecture transformers {transformers.__version__} knows; upgrade "
        "transformers, or, if the checkpoint ships its own modeling code (auto_map), set model.trust_remote_code=true"
    )


def check_generation_config(path: Path, model_cls: type[PreTrainedModel]) -> None:
    """generation_config.json as `postprocess` will read it (a model that generates), read now: a damaged one
    fails here, in one line naming it, not after the whole load."""
    from transformers import GenerationConfig

    file = path / "generation_config.json"
    if not file.is_file() or not model_cls.can_generate():
        return
    config_files.read_json_object(file)
    try:
        with warnings.catch_warnings():  # what it warns about, postprocess warns about once more
            warnings.simplefilter("ignore")
            GenerationConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, TypeError, AttributeError) as e:  # OSError: postprocess goes on without it
        raise CheckpointError(f"{file}: {type(e).__name__}: {' '.join(str(e).split())}") from e


@contextmanager
def shard_progress(checkpoint: Checkpoint) -> Iterator[Callable[[int, int], None]]:
    """A progress bar over the checkpoint's tensors; yields the `on_batch(shard_index, tensors)` that moves it."""
    from tqdm.auto import tqdm

    shards = checkpoint.shards
    with tqdm(total=len(checkpoint.tensors), desc=f"load 0/{len(shards)} shards", unit="tensor", leave=False) as bar:

        def on_batch(index: int, tensors: int) -> None:
            bar.set_description(f"load {index + 1}/{len(shards)} shards")
            bar.update(tensors)

        yield on_batch


def available_memory() -> dict[str, int]:
    """device -> bytes, as accelerate measures them when `max_memory` is not given."""
    return {str(device): int(size) for device, size in get_max_memory(None).items()}


def resolve_dtype(name: str, checkpoint: Checkpoint, config: PreTrainedConfig) -> torch.dtype:
    """`dtype=` as from_pretrained reads it ('auto': config.json's dtype, else the weights')."""
    files = [str(s) for s in checkpoint.shards]
    if name == "auto" and not files and getattr(config, "dtype", None) is None:
        raise CheckpointError(
            f"{checkpoint.path / 'config.json'}: dtype=auto reads torch_dtype (or dtype) from config.json, which has "
            "none, and there are no weights here to read it from; set dtype=bf16 (or fp16, fp32)"
        )
    _, dtype = _get_dtype(name, files, config, checkpoint.sharded_metadata, None, True, None)
    return dtype


def normalize_device_map(request: str | dict) -> str | dict:
    """'cpu' -> {'': device('cpu')}, 'cuda' -> {'': device('cuda:0')}; strategies stay strings."""
    return check_and_set_device_map(request)


@dataclass(frozen=True)
class SourceFacts:
    """The skeleton as transformers defines it, before the quantizer swaps modules: what the checkpoint holds."""

    shapes: dict[str, tuple[int, ...]]
    """state_dict key -> shape: the checkpoint-side shape (a GPT-2 Conv1D weight is [in, out] here, while the
    quantized skeleton holds the transposed Linear4bit)."""
    parameters: int
    """Logical parameter count, tied weights once (a 4-bit weight's stored tensor holds half as many elements)."""
    bytes: int
    """Parameters and buffers at the skeleton's dtype, tied weights once: the unquantized footprint."""


def _source_facts(model: PreTrainedModel) -> SourceFacts:
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    params = [p for name, p in model.named_parameters() if name not in tied]
    buffers = list(model.buffers())
    return SourceFacts(
        shapes={key: tuple(t.shape) for key, t in model.state_dict().items()},
        parameters=sum(p.numel() for p in params),
        bytes=sum(t.numel() * t.element_size() for t in params + buffers),
    )


def build_skeleton(
    model_cls: type[PreTrainedModel],
    config: PreTrainedConfig,
    dtype: torch.dtype,
    quantizer,
    device_map_request: str | dict | None,
    checkpoint: Checkpoint,
) -> tuple[PreTrainedModel, SourceFacts]:
    """The model on the meta device, with quantized modules swapped in (no weights touched), and the facts
    of the skeleton as it was before the swap."""
    config = copy.deepcopy(config)
    config.name_or_path = str(checkpoint.path)
    init = model_cls.get_init_context(dtype, quantizer is not None, False, None)
    with ContextManagers(init):
        model = model_cls(config)
        patch_output_recorders(model)
        facts = _source_facts(model)
        if quantizer is not None:
            quantizer.preprocess_model(
                model=model,
                dtype=dtype,
                device_map=device_map_request,
                checkpoint_files=[str(s) for s in checkpoint.shards] or None,  # None: a plan from config.json alone
                use_kernels=False,
            )
    return model, facts


@contextmanager
def _quiet_about_absent_devices() -> Iterator[None]:
    """accelerate warns 'Device N is not available' for each GPU a budget names that this host lacks: a plan for
    other hardware names them on purpose (the manifest records them as hypothetical)."""
    import logging

    class Absent(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "is not available, available devices are" not in record.getMessage()

    logger, absent = logging.getLogger("accelerate.utils.modeling"), Absent()
    logger.addFilter(absent)
    try:
        yield
    finally:
        logger.removeFilter(absent)


def infer_device_map(model: PreTrainedModel, strategy: str, max_memory: dict | None, quantizer) -> dict:
    """`_get_device_map` without its closing quantizer check, so that the caller can first name the
    modules that did not fit; the caller runs `quantizer.validate_environment(device_map=...)`. GPUs the budgets
    name need not be here: accelerate places modules by the budgets alone."""
    with _quiet_about_absent_devices():
        return _infer_device_map(model, strategy, max_memory, quantizer)


def _infer_device_map(model: PreTrainedModel, strategy: str, max_memory: dict | None, quantizer) -> dict:
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
        from qloader.checkpoint.reader import load_pickle_shard

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
    # as from_pretrained: hooks for a map over several devices, or with modules on disk (a hook loads each
    # offloaded weight for its module's forward)
    if device_map is not None and (len(set(device_map.values())) > 1 or "disk" in device_map.values()):
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


def stranded_on_meta(model: PreTrainedModel) -> list[str]:
    """Parameters and buffers on the meta device that no accelerate hook loads for the forward pass: they hold no
    value anywhere, so the model cannot run. An offloaded weight is on meta too, but its module's hook reads it."""
    keys: dict[int, set[str]] = {}  # the offload maps' keys, read once per map
    stranded = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta" and not _hook_loads(model, name, keys):
            stranded.append(name)
    return stranded


def _hook_loads(model: PreTrainedModel, name: str, keys: dict[int, set[str]]) -> bool:
    """An offloading AlignDevicesHook on the tensor's module whose weights map holds it (accelerate keys the map
    by the full name; the hook sees it through a PrefixedDataset of the module's name)."""
    module_name, _, leaf = name.rpartition(".")
    hook = getattr(model.get_submodule(module_name), "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        weights = getattr(one, "weights_map", None)
        if not getattr(one, "offload", False) or weights is None:
            continue
        prefix, source = getattr(weights, "prefix", ""), getattr(weights, "dataset", weights)
        if id(source) not in keys:
            keys[id(source)] = set(source)
        if prefix + leaf in keys[id(source)]:
            return True
    return False
