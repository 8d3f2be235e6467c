"""Faults and hostile inputs (issue #22): each is one qloader error line, early, with a true failed manifest.

Hostile config.json values are refused in `resolve` before any tensor is read; a layer count far above what
the shards hold is refused before a skeleton is built; a save the file system stops is one OutputError with
nothing left behind; a second writer to a save.dir is refused up front; a probe that cannot run is refused
in `resolve`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, read_manifest
from damage import copy_checkpoint
from omegaconf import OmegaConf

import qloader
from qloader.core.errors import CheckpointError, EnvironmentMismatchError, OutputError, ProbeError

RESTORE = "restore config.json from the model's source"


def _damaged_config(source: Path, folder: Path, edit) -> Path:
    """A copy of `source` whose config.json text is `edit(text)`."""
    path = copy_checkpoint(source, folder)
    (path / "config.json").write_text(edit((path / "config.json").read_text()))
    return path


def _field(name: str, value: str):
    """An edit that sets a top-level config.json field to a raw JSON `value` (Infinity and deep nesting included)."""

    def edit(text: str) -> str:
        config = json.loads(text)
        config[name] = "__VALUE__"
        return json.dumps(config).replace('"__VALUE__"', value)

    return edit


def _refused_in_resolve(run_dir: Path, error: str) -> dict:
    """The failed manifest of a run refused in `resolve`: its class recorded, no later stage run."""
    manifest = read_manifest(run_dir)
    assert manifest["status"] == "failed"
    assert (manifest["error"]["type"], manifest["error"]["stage"]) == (error, "resolve")
    assert [s["name"] for s in manifest["stages"]] == ["resolve"]
    assert manifest["weights_fingerprint"] is None
    return manifest


HOSTILE = {
    # id: (field, raw JSON value, what the message must say)
    "string": ("num_hidden_layers", '"2"', 'num_hidden_layers must be an integer, found "2" (a string)'),
    "null": ("num_hidden_layers", "null", "num_hidden_layers must be an integer, found null"),
    "infinity": ("num_hidden_layers", "Infinity", "num_hidden_layers must be an integer, found Infinity"),
    "nested": ("num_hidden_layers", "[" * 200_000 + "]" * 200_000, "not valid JSON (nested deeper than"),
    "quant-string": ("quantization_config", '"nf4"', "quantization_config must be a JSON object naming its"),
    "quant-list": ("quantization_config", "[1, 2]", "quantization_config must be a JSON object naming its"),
    "quant-field": ("quantization_config", '{"load_in_4bit": "yes"}', "quantization_config: load_in_4bit must be"),
}


@pytest.mark.parametrize("quant", ["auto", "none"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_config_value_is_one_checkpoint_error_naming_the_field(tiny_checkpoint, tmp_path, case, quant):
    """Raw TypeError / AttributeError / RecursionError tracebacks, and manifests recording them, before."""
    field, value, said = HOSTILE[case]
    path = _damaged_config(tiny_checkpoint, tmp_path / "ckpt", _field(field, value))
    with pytest.raises(CheckpointError) as raised:
        qloader.load(["model=local", f"model.path={path}", f"quant={quant}"], run_dir=tmp_path / "run")
    message = str(raised.value)
    assert message.startswith(f"{path / 'config.json'}: ") and said in message and RESTORE in message
    assert "\n" not in message
    assert _refused_in_resolve(tmp_path / "run", "CheckpointError")["error"]["message"] == message


def test_every_wrong_integer_field_is_named_at_once(tiny_checkpoint, tmp_path) -> None:
    def edit(text: str) -> str:
        config = json.loads(text)
        config.update(hidden_size=64.0, vocab_size=True, num_key_value_heads="4")
        return json.dumps(config)

    path = _damaged_config(tiny_checkpoint, tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError) as raised:
        qloader.load(["model=local", f"model.path={path}", "quant=none"], run_dir=tmp_path / "run")
    message = str(raised.value)
    assert "hidden_size must be an integer, found 64.0" in message
    assert "vocab_size must be an integer, found true" in message
    assert 'num_key_value_heads must be an integer or null, found "4" (a string)' in message


def test_deeply_nested_weights_index_is_one_checkpoint_error(tiny_checkpoint, tmp_path) -> None:
    """The same 200,000 nested `[` in model.safetensors.index.json: a RecursionError traceback before."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["metadata"] = "__VALUE__"
    nested = json.dumps(index).replace('"__VALUE__"', "[" * 200_000 + "]" * 200_000)
    (path / "model.safetensors.index.json").write_text(nested)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a valid weights index"):
        qloader.load(["model=local", f"model.path={path}", "quant=none"], run_dir=tmp_path / "run")
    _refused_in_resolve(tmp_path / "run", "CheckpointError")


def test_generation_config_that_is_not_an_object_is_refused_in_resolve(tiny_checkpoint, tmp_path) -> None:
    """It failed in `postprocess`, after the whole load, with `TypeError: 'list' object is not a mapping`."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"generation_config\.json: expected a JSON object, found a list"):
        qloader.load(["model=local", f"model.path={path}", "quant=none"], run_dir=tmp_path / "run")
    _refused_in_resolve(tmp_path / "run", "CheckpointError")


def test_billion_layer_config_is_refused_in_resolve_from_the_headers(tiny_checkpoint, tmp_path) -> None:
    """A 2-layer checkpoint whose config.json says 1e9 layers grew the `device_map` stage (a meta skeleton of a
    billion layers) to 9 GB over 300 s; it is refused in `resolve`, before anything is built."""
    path = _damaged_config(tiny_checkpoint, tmp_path / "ckpt", _field("num_hidden_layers", "1000000000"))
    with pytest.raises(CheckpointError) as raised:
        qloader.load(["model=local", f"model.path={path}", "quant=none"], run_dir=tmp_path / "run")
    assert re.search(
        r"config\.json: num_hidden_layers is 1,000,000,000, but the shards' headers hold 2 layer\(s\) "
        r"\(model\.layers\.0 … model\.layers\.1\)",
        str(raised.value),
    )
    _refused_in_resolve(tmp_path / "run", "CheckpointError")


def test_layer_count_margin_keeps_shared_layer_models() -> None:
    """ALBERT declares 24 layers and stores one set of weights: no contradiction; a thousand over two is one."""
    from qloader.checkpoint.config_files import check_layer_count, implied_parameters

    shapes = {"albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.weight": (8, 4), "embed.weight": (10, 4)}
    check_layer_count({"num_hidden_layers": 24}, shapes, Path("config.json"))
    with pytest.raises(CheckpointError, match="num_hidden_layers is 1,000, but the shards' headers hold 1 layer"):
        check_layer_count({"num_hidden_layers": 1000}, shapes, Path("config.json"))
    assert implied_parameters(3, shapes) == 32 * 3 + 40


def test_model_larger_than_the_host_is_refused_in_resolve_with_the_numbers(tiny_checkpoint, tmp_path, monkeypatch):
    """From the parameter count the headers and config.json give, before anything is built (it failed later, in
    `validate`, on the largest shard, or not at all)."""
    import shutil
    from collections import namedtuple

    from qloader.measure import environment

    monkeypatch.setattr(environment, "_meminfo", lambda key: 1024)
    monkeypatch.setattr(environment, "_gpus", lambda: [])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(2048, 2048, 0))
    with pytest.raises(EnvironmentMismatchError) as raised:
        qloader.load(["model=tiny-llama", "quant=none"], run_dir=tmp_path / "run")
    assert re.search(
        r"config\.json describes a model of about [\d,]+ parameters: at least [\d.]+ KiB even at one bit per parameter "
        r"\(less than any quantization stores\), but this host has 1\.0 KiB of memory and 0\.0 B free on disk at '",
        str(raised.value),
    )
    _refused_in_resolve(tmp_path / "run", "EnvironmentMismatchError")


def test_probe_without_a_tokenizer_is_refused_in_resolve(tiny_checkpoint, tmp_path) -> None:
    """It failed in the `probe` stage, after the whole load."""
    with pytest.raises(ProbeError, match=rf"probe: checkpoint '{re.escape(str(tiny_checkpoint))}' has no tokenizer"):
        qloader.load(["model=tiny-llama", "quant=none", "probe=quick"], run_dir=tmp_path / "run")
    _refused_in_resolve(tmp_path / "run", "ProbeError")


# ---------------------------------------------------------------- save.dir: full disks and concurrent writers


def _save(tmp_path: Path, *extra: str) -> list[str]:
    return ["model=tiny-llama", "quant=none", "save.enabled=true", f"save.dir={tmp_path / 'out' / 'ckpt'}", *extra]


def _nothing_left(tmp_path: Path) -> None:
    """No temp folder, no save.dir, no lock file: the save's parent folder, which the run made, is gone or empty."""
    out = tmp_path / "out"
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def _failing_write(error: Exception):
    """transformers' safetensors writer, stopped by the file system after part of a shard was written."""

    def save_file(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"\0" * 1000)
        raise error

    return save_file


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        "Error while serializing: I/O error: No space left on device (os error 28)",  # safetensors' own
    ],
    ids=["oserror", "safetensors"],
)
def test_save_to_a_full_disk_is_one_output_error_leaving_nothing(tmp_path, monkeypatch, error) -> None:
    """It was a SafetensorError traceback."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    error = SafetensorError(error) if isinstance(error, str) else error
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _failing_write(error))
    with pytest.raises(OutputError) as raised:
        qloader.load(_save(tmp_path), run_dir=tmp_path / "run")
    assert str(raised.value) == (
        f"save.dir '{tmp_path / 'out' / 'ckpt'}': writing the checkpoint failed (ENOSPC: No space left on device); "
        "nothing was written there; free some space or choose another save.dir"
    )
    error = read_manifest(tmp_path / "run")["error"]
    assert (error["type"], error["stage"], error["message"]) == ("OutputError", "save", str(raised.value))
    _nothing_left(tmp_path)


def test_save_past_the_file_size_limit_is_one_output_error_leaving_nothing(tmp_path, monkeypatch) -> None:
    """`ulimit -f` (RLIMIT_FSIZE, SIGXFSZ ignored as Python does) while the shards are written: safetensors' real
    EFBIG. It was a SafetensorError traceback."""
    from transformers import PreTrainedModel

    save_pretrained = PreTrainedModel.save_pretrained

    def limited(self, *args, **kwargs):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # below any tiny-llama shard, above config.json
        try:
            return save_pretrained(self, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", limited)
    with pytest.raises(OutputError, match=r"writing the checkpoint failed \(EFBIG: File too large\); nothing was") as e:
        qloader.load(_save(tmp_path, "save.max_shard_size=1MB"), run_dir=tmp_path / "run")
    assert str(e.value).endswith("(ulimit -f) stopped it; raise the limit, or set save.max_shard_size below it")
    assert read_manifest(tmp_path / "run")["error"]["stage"] == "save"
    _nothing_left(tmp_path)


def _lock(save_dir: Path):
    from qloader.checkpoint.writer import lock_save_dir

    return lock_save_dir(OmegaConf.create({"enabled": True, "dir": str(save_dir), "max_shard_size": "5GB"}))


def test_second_writer_to_a_save_dir_is_refused_in_resolve_naming_the_first(tmp_path) -> None:
    """The second run failed with `OSError: Directory not empty` after its whole load."""
    save_dir = tmp_path / "out" / "ckpt"
    held = _lock(save_dir)  # the first writer: this process, holding the lock as a run does from `resolve` on
    lock_file = save_dir.with_name("ckpt.lock")
    owner = lock_file.read_text()
    try:
        with pytest.raises(OutputError) as raised:
            qloader.load(_save(tmp_path), run_dir=tmp_path / "run")
        assert re.fullmatch(
            rf"save\.dir '{re.escape(str(save_dir))}' is being written by another run \(pid {os.getpid()}, started "
            rf"\S+; lock file {re.escape(str(lock_file))}\); wait for that run to finish, or choose another save\.dir",
            str(raised.value),
        )
        _refused_in_resolve(tmp_path / "run", "OutputError")
        assert lock_file.read_text() == owner and not save_dir.exists()  # the refused run left the lock as it was
    finally:
        held.release()
    assert not lock_file.exists()


def test_lock_of_a_dead_run_is_taken_over_with_one_warning_and_removed_at_the_end(tmp_path, caplog) -> None:
    """A run killed while it held the lock (its pid since reused: another start time) blocks no later run."""
    lock_file = tmp_path / "out" / "ckpt.lock"
    lock_file.parent.mkdir()
    dead = {"pid": os.getpid(), "owner": f".pid{os.getpid()}-1", "host": socket.gethostname(), "token": "x"}
    lock_file.write_text(json.dumps(dead))
    with caplog.at_level(logging.WARNING, logger="qloader"):
        result = qloader.load(_save(tmp_path, "validate.fingerprint=false"), run_dir=tmp_path / "run")
    taken = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    died = f"taking over the lock of pid {os.getpid()}, a run that died ({lock_file})"
    assert taken == [f"save.dir '{tmp_path / 'out' / 'ckpt'}': {died}"]
    assert result.manifest["status"] == "succeeded" and (tmp_path / "out" / "ckpt" / "config.json").is_file()
    assert not lock_file.exists()


def test_lock_is_released_when_resolve_refuses_the_run(tiny_checkpoint, tmp_path) -> None:
    path = _damaged_config(tiny_checkpoint, tmp_path / "src", _field("num_hidden_layers", "null"))
    save_dir = tmp_path / "out" / "a" / "ckpt"
    overrides = ["model=local", f"model.path={path}", "save.enabled=true", f"save.dir={save_dir}"]
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError):
        qloader.load(overrides, run_dir=tmp_path / "run")
    _nothing_left(tmp_path)  # neither the lock file nor the parent folder the lock needed


def test_load_result_save_takes_the_same_lock(tmp_path) -> None:
    result = qloader.load(["model=tiny-llama", "quant=none", "validate.fingerprint=false"], run_dir=tmp_path / "run")
    held = _lock(tmp_path / "out" / "ckpt")
    try:
        with pytest.raises(OutputError, match=rf"is being written by another run \(pid {os.getpid()}"):
            result.save(tmp_path / "out" / "ckpt")
    finally:
        held.release()
    assert result.save(tmp_path / "out" / "ckpt")["files"] and not (tmp_path / "out" / "ckpt.lock").exists()


HOLDER = """
import sys
from omegaconf import OmegaConf
from qloader.checkpoint.writer import lock_save_dir
lock_save_dir(OmegaConf.create({"enabled": True, "dir": sys.argv[1], "max_shard_size": "5GB"}))
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_lock_held_by_another_process_refuses_then_its_death_frees_it(tmp_path, caplog) -> None:
    """A second process holds save.dir's lock: this run is refused naming that pid; killed with SIGKILL (as the
    OOM killer does), its lock is taken over by the next run, with one warning."""
    save_dir = tmp_path / "out" / "ckpt"
    command = [sys.executable, "-c", HOLDER, str(save_dir)]
    holder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=rf"is being written by another run \(pid {holder.pid}, started"):
            qloader.load(_save(tmp_path), run_dir=tmp_path / "refused")
        _refused_in_resolve(tmp_path / "refused", "OutputError")
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with caplog.at_level(logging.WARNING, logger="qloader"):
        result = qloader.load(_save(tmp_path, "validate.fingerprint=false"), run_dir=tmp_path / "run")
    assert [r for r in caplog.records if f"taking over the lock of pid {holder.pid}" in r.getMessage()]
    assert result.manifest["status"] == "succeeded" and not save_dir.with_name("ckpt.lock").exists()


# ---------------------------------------------------------------- the README's Python example


@pytest.mark.smollm2
def test_readme_python_example_runs(tmp_path, smollm2_checkpoint) -> None:
    """With model=tiny-llama (no tokenizer), its `result.tokenizer()` raised CheckpointError."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"From Python:\n\n```python\n(.*?)```", readme, re.S)[1]
    assert 'run_dir="outputs/api-demo"' in block
    namespace: dict = {}
    exec(block.replace('run_dir="outputs/api-demo"', f"run_dir={str(tmp_path / 'run')!r}"), namespace)
    tokenizer = namespace["result"].tokenizer()
    assert tokenizer("The capital of France")["input_ids"]
