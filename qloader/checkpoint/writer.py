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
from qloader.core.locks import OwnerLock
from qloader.core.names import TOKENIZER_FILES
from qloader.core.permissions import follow_umask
from qloader.core.units import mib

log = logging.getLogger("qloader")
SAVING = ".saving-"
"""In a save's temp folder name, `.<save.dir name>.pid<pid>-<start>.saving-<random>`, beside save.dir."""


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
    from safetensors import SafetensorError

    try:
        return save_checkpoint(model, source, save)
    except (OSError, SafetensorError) as e:  # a full disk, a file size limit: the temp folder is gone already
        raise OutputError(write_failure(save, e)) from e


def write_failure(save: DictConfig, error: Exception) -> str:
    """One line for a save that the file system stopped: the cause (errno) and what to change."""
    import errno
    import re

    code = getattr(error, "errno", None)
    if code is None and (found := re.search(r"os error (\d+)", str(error))):  # safetensors' Rust I/O error
        code = int(found[1])
    cause = f"{errno.errorcode.get(code, code)}: {os.strerror(code)}" if code else f"{type(error).__name__}: {error}"
    if code == errno.EFBIG:
        fix = "a file size limit (ulimit -f) stopped it; raise the limit, or set save.max_shard_size below it"
    elif code in (errno.ENOTEMPTY, errno.EEXIST):
        fix = "another writer filled it meanwhile; choose another save.dir"
    else:
        fix = "free some space or choose another save.dir"
    return f"save.dir '{save.dir}': writing the checkpoint failed ({cause}); nothing was written there; {fix}"


def lock_save_dir(save: DictConfig) -> OwnerLock:
    """One writer per save.dir: a lock file beside it (`<save.dir>.lock`) from before loading until the run ends,
    so that a second run saving there is refused up front, naming the first (qloader.core.locks.OwnerLock)."""
    from qloader.core.errors import ConfigError

    target = Path(save.dir).expanduser().resolve()
    lock = OwnerLock(target, "save.dir", "wait for that run to finish, or choose another save.dir").acquire()
    if problems := check_save_fields(save):  # a run that held the lock may have filled save.dir meanwhile
        lock.release()
        raise ConfigError(problems)
    return lock


def save_checkpoint(model, source: Path, save: DictConfig) -> Checkpoint:
    """`save_pretrained` into a temp folder beside the target, then one rename: never half-written.

    The folder and its files get the modes the user's umask gives (mkdtemp alone would make them private).
    """
    from qloader.core.cache import owner_tag

    target = Path(save.dir).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_saves(target.parent)
    # the owner's pid and start time in the name: a later save can tell it was abandoned (`remove_dead_saves`)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{owner_tag()}{SAVING}", dir=target.parent))
    try:
        write_checkpoint_files(model, source, tmp, save.max_shard_size)
        follow_umask(tmp)
        os.rename(tmp, target)  # replaces an empty target folder too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return inspect_checkpoint(target)


def write_checkpoint_files(model, source: Path, folder: Path, max_shard_size: str) -> None:
    """`save_pretrained` into `folder`, with the source checkpoint's tokenizer files beside it."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def remove_dead_saves(parent: Path) -> list[Path]:
    """Temp folders of saves into `parent` whose process died mid-write (kill -9, the OOM killer): removed,
    with one warning. A save that is still running keeps its own."""
    from qloader.core.cache import remove_dead_temps

    if not parent.is_dir():
        return []
    return remove_dead_temps([p for p in parent.glob(f".*{SAVING}*") if p.is_dir()], "save temp folder(s)")


def check_save_target(save: DictConfig) -> None:
    """save.dir must be creatable and writable: known before any work, not after the whole load. Temp
    folders that killed saves left beside it are removed first: they may hold the space this save needs."""
    target = Path(save.dir).expanduser().absolute()
    remove_dead_saves(target.parent)
    check_writable_dir(target, "save.dir", fix="choose another save.dir")


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
