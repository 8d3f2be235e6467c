"""GPTQ through transformers' GPTQConfig and its backend, gptqmodel (with optimum's GPTQ quantizer).

On the fly, transformers loads the weights unquantized and calibrates in `postprocess`
(`_process_model_after_weight_loading`: optimum runs the calibration samples block by block, with a
progress bar, and packs each Linear into `qweight`, `qzeros`, `scales`, `g_idx`). qloader passes the
calibration samples as the config's `dataset`: windows of `dataset_seqlen` tokens of the text that ships
with qloader (`qloader/calibration_text.txt`), at offsets drawn with `seed`. The text's sha256 goes in the
manifest. A pre-quantized GPTQ checkpoint (one this plug-in saved) loads its packed tensors as stored.

Importing gptqmodel changes process-wide variables (HF_HOME and the HF caches to a temp folder,
PYTORCH_ALLOC_CONF, ...): qloader imports it once, itself, and puts os.environ back as it was.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qloader.quant.base import QuantConfig, QuantMethod, WeightBytes, register_method

CALIBRATION_TEXT = files("qloader.quant.methods") / "calibration_text.txt"
BITS = (2, 3, 4, 8)
QUANT_STATE = ("qweight", "qzeros", "scales", "g_idx")

log = logging.getLogger("qloader")

HALF_DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16"}
# The x86 CPU flags under which oneDNN runs half-precision matmuls natively; without them it converts in
# software, and GPTQ's calibration (the model's forward, once per quantized layer) runs several times slower.
NATIVE_HALF_FLAGS = {"torch.bfloat16": ("avx512_bf16", "amx_bf16"), "torch.float16": ("avx512_fp16", "amx_fp16")}


@dataclass
class GptqQuantConfig(QuantConfig):
    """`transformers.GPTQConfig` fields under the same names, and qloader's calibration settings."""

    _target_: str | None = "transformers.GPTQConfig"
    bits: int = 4
    group_size: int = 128
    damp_percent: float = 0.1
    desc_act: bool = False
    act_group_aware: bool = True
    sym: bool = True
    true_sequential: bool = True
    format: str = "gptq"
    backend: str = "auto"
    dataset_samples: int = 16
    """qloader setting: how many calibration samples (token windows of the shipped text)."""
    dataset_seqlen: int = 256
    """qloader setting: tokens per calibration sample."""
    seed: int = 0
    """qloader setting: the seed that draws the samples' offsets in the text."""


def calibration_text_sha256() -> str:
    return hashlib.sha256(CALIBRATION_TEXT.read_bytes()).hexdigest()


def calibration_samples(tokenizer: Any, samples: int, seqlen: int, seed: int) -> list[str]:
    """`samples` windows of `seqlen` tokens of the shipped text, at offsets drawn with `seed`, as text
    (GPTQConfig's `dataset` is a list of strings; the checkpoint's tokenizer encodes them again)."""
    import torch

    ids = tokenizer(CALIBRATION_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    span = max(len(ids) - seqlen, 0)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, span + 1, (samples,), generator=generator).tolist()
    return [tokenizer.decode(ids[start : start + seqlen]) for start in starts]


def import_backend() -> None:
    """Import gptqmodel and optimum's GPTQ once, restoring every environment variable their import changes.

    gptqmodel compiles its CPU packing extension on first use into `~/.cache/gptqmodel` unless told otherwise:
    qloader points it at its own cache (`$QLOADER_CACHE/gptqmodel`), unless the user set the variable.
    """
    from qloader.core.cache import cache_dir

    os.environ.setdefault("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(cache_dir() / "gptqmodel" / "torch_extensions"))
    saved = dict(os.environ)
    try:
        import gptqmodel  # noqa: F401
        import optimum.gptq  # noqa: F401
    finally:
        changed = {k for k in set(saved) | set(os.environ) if saved.get(k) != os.environ.get(k)}
        for key in changed:
            if key in saved:
                os.environ[key] = saved[key]
            else:
                os.environ.pop(key, None)


@register_method
class Gptq(QuantMethod):
    quant_method = "gptq"
    config_class = "GPTQConfig"
    schemas = {"gptq": GptqQuantConfig}
    settings = ("dataset_samples", "dataset_seqlen", "seed")
    packages = ("gptqmodel", "optimum")
    module = "gptqmodel"
    extra = "gptq"
    format_fields = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")
    calibrates = True

    def check_fields(self, quant: DictConfig) -> list[str]:
        problems = []
        if quant.bits not in BITS:
            problems.append(f"quant.bits {quant.bits} is not one of {', '.join(map(str, BITS))}")
        if quant.group_size != -1 and quant.group_size <= 0:
            problems.append(f"quant.group_size {quant.group_size} must be positive or -1 (one group per row)")
        for key in ("dataset_samples", "dataset_seqlen"):
            if quant[key] < 1:
                problems.append(f"quant.{key} {quant[key]} must be at least 1")
        return problems

    def build_config(self, quant: DictConfig, device: str) -> Any:
        from qloader.core.errors import EnvironmentMismatchError

        if importlib.util.find_spec("optimum.gptq") is None:  # optimum-quanto's `optimum` namespace alone
            raise EnvironmentMismatchError(
                "quant=gptq needs optimum's GPTQ quantizer ('optimum.gptq'), which is not installed; "
                "run: pip install 'qloader[gptq]'"
            )
        import_backend()
        return super().build_config(quant, device)

    def prepare_backend(self) -> None:
        import_backend()

    def calibration(
        self, config: Any, quant: DictConfig, checkpoint_path: Path, dtype: Any, device: str
    ) -> dict | None:
        """Fill the config's `dataset` with the shipped text's samples; the manifest records how they were drawn."""
        from transformers import AutoTokenizer

        from qloader.core.errors import CheckpointError

        try:
            tokenizer = AutoTokenizer.from_pretrained(checkpoint_path)
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"{checkpoint_path}: GPTQ calibration needs the checkpoint's tokenizer, and none loads: {e}"
            ) from e
        config.dataset = calibration_samples(tokenizer, quant.dataset_samples, quant.dataset_seqlen, quant.seed)
        log.info(
            "gptq: calibrating in postprocess on %d samples x %d tokens of the shipped text (seed %d)",
            quant.dataset_samples,
            quant.dataset_seqlen,
            quant.seed,
        )
        if device == "cpu" and str(dtype) in HALF_DTYPES and not cpu_has_native_half_matmul(str(dtype)):
            log.warning(
                "gptq: calibrating in %s on a CPU without native %s matmul (no %s in /proc/cpuinfo): "
                "dtype=fp32 calibrates about 4x faster here",
                HALF_DTYPES[str(dtype)],
                HALF_DTYPES[str(dtype)],
                " / ".join(NATIVE_HALF_FLAGS[str(dtype)]),
            )
        return {
            "calibration_text": CALIBRATION_TEXT.name,
            "calibration_text_sha256": calibration_text_sha256(),
            "dataset_samples": quant.dataset_samples,
            "dataset_seqlen": quant.dataset_seqlen,
            "seed": quant.seed,
        }

    def config_dict(self, config: Any) -> dict:
        """The calibration samples are recorded by their count and sha256, not as text."""
        found = dict(config) if isinstance(config, dict) else config.to_dict()
        if isinstance(dataset := found.get("dataset"), list):
            digest = hashlib.sha256("\n\0".join(map(str, dataset)).encode()).hexdigest()
            found["dataset"] = f"{len(dataset)} samples, sha256 {digest}"
        return found

    def describe(self, config: dict) -> str:
        group = config.get("group_size")
        group_text = "per row" if group == -1 else f"group {group}"
        order = ", act-order" if config.get("desc_act") else ""
        return f"gptq {config.get('bits')}-bit ({group_text}{order})"

    def compared_fields(self, saved: dict, user: dict) -> tuple[str, ...]:
        return ("bits", "group_size", "sym", "desc_act", "damp_percent", "true_sequential", "backend")

    def conflicts(self, rows: list) -> list:
        return [row for row in rows if row.field in ("bits", "group_size", "sym", "desc_act")]

    # ---------------------------------------------------------------- the skeleton and the checkpoint

    def quant_state_names(self, quantizer: Any, name: str, module: Any) -> tuple[str, ...]:
        return QUANT_STATE if self.quantized_class(module) else ()

    def quantized_class(self, module: Any) -> str | None:
        return type(module).__name__ if hasattr(module, "qweight") and hasattr(module, "g_idx") else None

    def planned_bytes(self, quantizer: Any, model: Any, name: str, module: Any, param: Any) -> WeightBytes | None:
        """On the fly, every Linear weight in the repeated blocks becomes qweight + qzeros + scales + g_idx;
        a pre-quantized skeleton already holds those buffers (counted as they are)."""
        import torch

        if quantizer.pre_quantized or not isinstance(module, torch.nn.Linear) or not name.endswith(".weight"):
            return None
        from optimum.gptq.utils import get_block_name_with_pattern

        if not name.startswith(get_block_name_with_pattern(model) + "."):
            return None
        config = quantizer.quantization_config
        rows, cols = module.out_features, module.in_features
        groups = 1 if config.group_size == -1 else math.ceil(cols / config.group_size)
        packed = math.ceil(cols * config.bits / 32) * rows * 4  # qweight: int32, `bits` per weight
        qzeros = groups * math.ceil(rows * config.bits / 32) * 4  # int32
        scales = groups * rows * 2  # float16
        g_idx = cols * 4  # int32
        shifts = (32 // config.bits) * 4 if 32 % config.bits == 0 else 0  # the kernel's int32 bit-shift table
        return WeightBytes(packed, qzeros + scales + g_idx + shifts)


def cpu_has_native_half_matmul(dtype: str = "torch.bfloat16", cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU lists a flag for native `dtype` matmuls (True where /proc/cpuinfo cannot tell)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return flags is None or any(flag in flags for flag in NATIVE_HALF_FLAGS[dtype])
