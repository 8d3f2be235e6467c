"""Writing a loaded (quantized) model as a checkpoint, in transformers' own serialization format."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from qloader.checkpoint import Checkpoint, inspect_checkpoint

# Tokenizer files travel with the weights, copied as they are from the source checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


def check_save_fields(save: DictConfig) -> list[str]:
    if not save.enabled:
        return []
    if not save.dir:
        return ["save.enabled=true needs save.dir (a new folder for the checkpoint)"]
    target = Path(save.dir).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        return [f"save.dir '{save.dir}' already exists and is not empty; choose a new folder"]
    return []


def save_checkpoint(model, source: Path, save: DictConfig) -> Checkpoint:
    """`save_pretrained` into a temp folder beside the target, then one rename: never half-written."""
    target = Path(save.dir).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=save.max_shard_size)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        os.rename(tmp, target)  # replaces an empty target folder too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return inspect_checkpoint(target)
