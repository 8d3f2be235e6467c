"""Writing a loaded (quantized) model as a checkpoint, in transformers' own serialization format."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from qloader.checkpoint.reader import Checkpoint, inspect_checkpoint
from qloader.core.errors import OutputError
from qloader.core.files import check_writable_dir, existing_ancestor
from qloader.core.names import TOKENIZER_FILES
from qloader.core.permissions import follow_umask
from qloader.core.units import mib

log = logging.getLogger("qloader")


def check_save_fields(save: DictConfig) -> list[str]:
    if not save.enabled:
        return []
    if not save.dir:
        return ["save.enabled=true needs save.dir (a new folder for the checkpoint)"]
    target = Path(save.dir).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        return [f"save.dir '{save.dir}' already exists and is not empty; choose a new folder"]
    return []


def save_loaded_model(model, quantization_config, source: Path, save: DictConfig) -> Checkpoint:
    """The `save` stage and `LoadResult.save`: refuse what the method cannot serialize, then write."""
    from qloader.core.errors import ConfigError
    from qloader.quant.registry import method_of

    method = method_of(quantization_config)
    if method is not None and (why := method.check_save_model(model)):
        raise ConfigError([f"save.enabled=true: {why}; load without saving (save.enabled=false)"])
    if method is not None and (note := method.save_note(model)):
        log.info("save: %s", note)
    return save_checkpoint(model, source, save)


def save_checkpoint(model, source: Path, save: DictConfig) -> Checkpoint:
    """`save_pretrained` into a temp folder beside the target, then one rename: never half-written.

    The folder and its files get the modes the user's umask gives (mkdtemp alone would make them private).
    """
    target = Path(save.dir).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=save.max_shard_size)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        follow_umask(tmp)
        os.rename(tmp, target)  # replaces an empty target folder too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return inspect_checkpoint(target)


def check_save_target(save: DictConfig) -> None:
    """save.dir must be creatable and writable: known before any work, not after the whole load."""
    target = Path(save.dir).expanduser().absolute()
    try:
        check_writable_dir(target, "save.dir")
    except OutputError as e:
        raise OutputError(f"{e}; choose another save.dir") from None


def check_save_space(save: DictConfig, footprint_bytes: int) -> None:
    """The saved checkpoint holds about the planned footprint: refuse before any tensor is read if it cannot fit."""
    import shutil

    existing = existing_ancestor(Path(save.dir).expanduser().absolute())
    free = shutil.disk_usage(existing).free
    if free < footprint_bytes:
        raise OutputError(
            f"save.dir '{save.dir}': the checkpoint needs about {mib(footprint_bytes)} (the planned footprint), "
            f"but '{existing}' has {mib(free)} free; free some space or choose another save.dir"
        )
