"""The quantized-weights cache (cache.quantized): a hit is the model a fresh quantize-on-load gives, tensor for
tensor; any changed input is a miss; methods that cannot save are not cached, saying why; damaged entries heal;
the size cap evicts least recently used entries; one writer per entry; `qloader cache list/clear`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, read_manifest
from oracle import assert_same_weights

import qloader
from qloader.checkpoint import quantized_cache
from qloader.core.errors import ConfigError
from qloader.core.locks import OwnerLock


@pytest.fixture
def cache_root(tiny_checkpoint, tmp_path, monkeypatch) -> Path:
    """A quantized cache of this test's own (QLOADER_CACHE in tmp_path), with the cache on (the suite turns it off)."""
    monkeypatch.setenv("QLOADER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QLOADER_CACHE_QUANTIZED", "auto")
    return tmp_path / "cache" / "quantized"


class Loads:
    """qloader.load of one checkpoint folder, each in a run dir of its own."""

    def __init__(self, checkpoint: Path, tmp: Path):
        self.checkpoint, self.tmp, self.n = checkpoint, tmp, 0

    def __call__(self, *overrides: str) -> qloader.LoadResult:
        self.n += 1
        return qloader.load(
            ["model=local", f"model.path={self.checkpoint}", *overrides], run_dir=self.tmp / f"run{self.n}"
        )


@pytest.fixture
def load(cache_root, tiny_checkpoint, tmp_path) -> Loads:
    return Loads(tiny_checkpoint, tmp_path)


def cache_of(result: qloader.LoadResult) -> dict:
    return result.manifest["cache"]


@pytest.mark.parametrize("quant", ["quant=bnb-nf4", "quant=bnb-int8", "quant=torchao-int8wo"])
def test_hit_is_the_fresh_quantize_on_load(load, quant) -> None:
    miss = load(quant)
    hit = load(quant)
    assert cache_of(miss)["status"] == "miss" and cache_of(miss)["stored"] is True
    assert cache_of(hit)["status"] == "hit" and cache_of(hit)["key"] == cache_of(miss)["key"]
    assert cache_of(hit)["path"] == cache_of(miss)["path"] and cache_of(hit)["bytes"] == cache_of(miss)["bytes"]
    assert "cache" in [s["name"] for s in miss.manifest["stages"]]
    # the hit read the cached pre-quantized checkpoint; the manifest still records the input checkpoint
    assert [r.manifest["quantization"]["pre_quantized"] for r in (miss, hit)] == [False, True]
    assert hit.manifest["checkpoint"]["files"] == miss.manifest["checkpoint"]["files"]
    assert hit.manifest["config_hash"] == miss.manifest["config_hash"]
    assert hit.manifest["weights_fingerprint"] == miss.manifest["weights_fingerprint"] is not None
    assert_same_weights(hit.model, miss.model)  # quant states and torchao's inner tensors, torch.equal


def test_replay_of_a_miss_is_a_hit_and_the_same_run(load, tmp_path) -> None:
    from qloader.runs.replay import ReplayOptions, replay

    miss = load("quant=bnb-nf4")
    rows, now = replay(miss.run_dir / "manifest.json", ReplayOptions(run_dir=tmp_path / "replay"), check_only=False)
    assert cache_of(miss)["status"] == "miss" and now["cache"]["status"] == "hit"
    assert [r.item for r in rows if r.decisive and not r.equal] == []
    assert now["weights_fingerprint"] == miss.manifest["weights_fingerprint"]


def test_changed_byte_setting_or_dtype_is_a_miss(cache_root, tiny_checkpoint, tmp_path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    load = Loads(copy, tmp_path)
    first = cache_of(load("quant=bnb-nf4"))
    assert first["status"] == "miss"
    assert cache_of(load("quant=bnb-nf4"))["status"] == "hit"
    keys = {first["key"]}
    for overrides in (["quant.bnb_4bit_use_double_quant=false"], ["dtype=fp16"], ["model.verify_hashes=true"]):
        seen = cache_of(load("quant=bnb-nf4", *overrides))
        if overrides == ["model.verify_hashes=true"]:  # the same inputs, every file hashed afresh: still a hit
            assert seen["status"] == "hit" and seen["key"] == first["key"]
            continue
        assert seen["status"] == "miss" and seen["key"] not in keys, overrides
        keys.add(seen["key"])
    shard = sorted(copy.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one byte of tensor data; the header stays valid
    shard.write_bytes(bytes(data))
    changed = cache_of(load("quant=bnb-nf4"))
    assert changed["status"] == "miss" and changed["key"] not in keys
    assert changed["inputs"]["files"][shard.name] != first["inputs"]["files"][shard.name]


def test_key_records_what_went_into_it(load) -> None:
    inputs = cache_of(load("quant=bnb-nf4"))["inputs"]
    assert set(inputs) == {"files", "model_class", "quantization", "dtype", "weights_device", "versions"}
    assert inputs["quantization"]["config"]["bnb_4bit_quant_type"] == "nf4" and inputs["dtype"] == "bfloat16"
    assert {"torch", "transformers", "bitsandbytes", "qloader"} <= set(inputs["versions"])
    assert quantized_cache.cache_key(inputs) == cache_of(load("quant=bnb-nf4"))["key"]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["quant=quanto-int4"], "transformers cannot serialize quanto models"),
        (["quant=torchao-int4"], "torchao cannot serialize PrototypeInt4WeightOnlyConfig models (CPU int4)"),
        (["quant=none"], "an unquantized load (quant=none): nothing to cache"),
        (["quant=bnb-nf4", "cache.quantized=false"], "cache.quantized=false"),
    ],
)
def test_not_cached_says_why(load, cache_root, overrides, reason) -> None:
    result = load(*overrides)
    assert cache_of(result)["status"] == "not cached" and reason in cache_of(result)["reason"]
    assert not cache_root.exists() or not any(cache_root.iterdir())


def test_cache_quantized_true_refuses_a_method_that_cannot_save(load) -> None:
    with pytest.raises(ConfigError, match="cache.quantized=true: transformers cannot serialize quanto models"):
        load("quant=quanto-int8", "cache.quantized=true")


def test_prequantized_input_is_not_cached(load, tmp_path) -> None:
    saved = tmp_path / "nf4"
    load("quant=bnb-nf4", "save.enabled=true", f"save.dir={saved}")
    again = Loads(saved, tmp_path / "again")()
    assert cache_of(again) == {**cache_of(again), "status": "not cached"}
    assert "pre-quantized already" in cache_of(again)["reason"]


def test_plan_mode_records_no_cache(load) -> None:
    assert load("quant=bnb-nf4", "mode=plan").manifest["cache"] is None


@pytest.mark.parametrize("damage", ["changed file", "no record", "missing file"])
def test_damaged_entry_is_removed_and_rebuilt_with_one_warning(load, damage, caplog) -> None:
    first = load("quant=bnb-nf4")
    entry = Path(cache_of(first)["path"])
    shard = entry / "model.safetensors"
    if damage == "changed file":
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0x01
        shard.write_bytes(bytes(data))
    elif damage == "no record":  # what a writer that bypassed the temp folder would leave
        (entry / quantized_cache.RECORD).unlink()
    else:
        shard.unlink()
    caplog.clear()
    rebuilt = load("quant=bnb-nf4")
    warnings = [r.getMessage() for r in caplog.records if "quantized cache entry" in r.getMessage()]
    assert len(warnings) == 1 and str(entry) in warnings[0] and "removed" in warnings[0], warnings
    assert cache_of(rebuilt)["status"] == "miss" and cache_of(rebuilt)["stored"] is True
    hit = load("quant=bnb-nf4")
    assert cache_of(hit)["status"] == "hit"
    assert_same_weights(hit.model, first.model)


def test_temp_folder_of_a_killed_writer_is_removed(load, cache_root, caplog) -> None:
    cache_root.mkdir(parents=True)
    half = cache_root / f".{'0' * 32}.pid999999-1{quantized_cache.WRITING}abcd"  # no such process
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half a write")
    assert cache_of(load("quant=bnb-nf4"))["stored"] is True
    assert not half.exists()
    assert any("quantized cache temp folder(s) left by a process that died" in r.getMessage() for r in caplog.records)


def test_verify_hashes_rehashes_the_entry(load, caplog) -> None:
    """A hash cache that vouches for a changed entry file (as if its identity had been restored) is believed only
    without model.verify_hashes; with it every entry file is hashed afresh and the damage found."""
    from qloader.checkpoint.reader import default_hash_cache

    entry = Path(cache_of(load("quant=bnb-nf4"))["path"])
    shard = entry / "model.safetensors"
    record = json.loads((entry / quantized_cache.RECORD).read_text())
    written = next(f["sha256"] for f in record["files"] if f["name"] == shard.name)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    hashes = default_hash_cache()
    hashes.remember(shard, written)  # the stale digest, for the file's new identity
    hashes.save()
    caplog.clear()
    verified = cache_of(load("quant=bnb-nf4", "model.verify_hashes=true"))
    assert verified["status"] == "miss" and verified["stored"] is True
    assert any("changed since it was written" in r.getMessage() for r in caplog.records)


def test_eviction_keeps_least_recently_used_out(load) -> None:
    nf4, int8 = cache_of(load("quant=bnb-nf4")), cache_of(load("quant=bnb-int8"))
    limit = nf4["bytes"] + int8["bytes"] + 1000
    assert cache_of(load("quant=bnb-nf4", f"cache.max_bytes={limit}"))["status"] == "hit"  # nf4: now the newest
    fp4 = cache_of(load("quant=bnb-fp4", f"cache.max_bytes={limit}"))
    assert fp4["stored"] is True
    kept = {row["key"] for row in quantized_cache.list_entries()}
    assert kept == {nf4["key"], fp4["key"]}  # int8, least recently used, made room
    assert sum(row["bytes"] for row in quantized_cache.list_entries()) <= limit


def test_entry_larger_than_max_bytes_is_not_stored(load, cache_root) -> None:
    result = cache_of(load("quant=bnb-nf4", "cache.max_bytes=1KB"))
    assert result["status"] == "miss" and result["stored"] is False
    assert "is larger than cache.max_bytes" in result["reason"]
    assert quantized_cache.list_entries() == []


def test_a_write_that_fails_leaves_nothing_and_the_load_goes_on(load, cache_root, monkeypatch) -> None:
    from qloader.checkpoint import writer

    def full_disk(model, source, folder, max_shard_size) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "write_checkpoint_files", full_disk)
    result = load("quant=bnb-nf4")
    cache = cache_of(result)
    assert result.manifest["status"] == "succeeded" and cache["status"] == "miss" and cache["stored"] is False
    assert "writing it failed (OSError: [Errno 28] No space left on device)" in cache["reason"]
    assert list(cache_root.iterdir()) == []  # no entry, no temp folder, no lock file


def test_one_writer_per_entry(load, cache_root) -> None:
    """While another run holds the entry's lock (this process stands in for it), a miss loads and stores nothing."""
    key = cache_of(load("quant=bnb-int8"))
    shutil.rmtree(key["path"])
    with OwnerLock(cache_root / key["key"], "quantized cache entry", "wait"):
        again = cache_of(load("quant=bnb-int8"))
    assert again["status"] == "miss" and again["stored"] is False and "another run is writing it" in again["reason"]
    assert not Path(key["path"]).exists()


def test_entry_in_use_is_never_evicted_or_cleared(load, tmp_path) -> None:
    entry = cache_of(load("quant=bnb-nf4"))
    # a hash cache of its own: it is saved by replacing its file (never a shared path such as /dev/null)
    held = quantized_cache.open_entry(entry["key"], quantized_cache.HashCache(tmp_path / "hashes.json"))
    assert held is not None
    try:
        assert quantized_cache.evict(0) == []
        removed, kept = quantized_cache.clear()
        assert removed == [] and [row["key"] for row in kept] == [entry["key"]]
    finally:
        held.release()
    removed, _ = quantized_cache.clear()
    assert [row["key"] for row in removed] == [entry["key"]]


def cache_command(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from qloader import cli

    out, argv, code = io.StringIO(), sys.argv, 0
    sys.argv = ["qloader", "cache", *args]
    try:
        with contextlib.redirect_stdout(out):
            cli.main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return code, out.getvalue()


def test_cache_list_and_clear(load, cache_root) -> None:
    assert cache_command("list") == (0, f"quantized cache {cache_root}: empty\n")
    nf4, int8 = cache_of(load("quant=bnb-nf4")), cache_of(load("quant=bnb-int8"))
    code, listing = cache_command("list")
    assert code == 0 and "2 entries, least recently used first" in listing
    lines = listing.splitlines()
    assert nf4["key"] in lines[1] and "bnb nf4 (double quant)" in lines[1] and int8["key"] in lines[2]
    code, cleared = cache_command("clear")
    assert code == 0 and "removed 2 entries" in cleared
    assert cache_command("list")[1].endswith(": empty\n") and list(cache_root.iterdir()) == []


@pytest.mark.slow  # processes of their own: two loads at once, and the import check
def test_two_runs_at_once_write_once_and_never_read_half(tiny_checkpoint, tmp_path) -> None:
    env = {**os.environ, "QLOADER_CACHE": str(tmp_path / "cache"), "QLOADER_CACHE_QUANTIZED": "auto"}
    command = [sys.executable, "-m", "qloader", "model=local", f"model.path={tiny_checkpoint}", "quant=bnb-nf4"]
    runs = [
        subprocess.Popen(
            [*command, f"hydra.run.dir={tmp_path / f'run{n}'}"],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for n in range(2)
    ]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    records = [read_manifest(tmp_path / f"run{n}") for n in range(2)]
    caches = [r["cache"] for r in records]
    assert sum(bool(c["stored"]) for c in caches) == 1, caches  # one wrote it
    for cache in caches:  # the other quantized too, found it being written or written, or read it whole
        assert cache["status"] == "hit" or cache["stored"] or "another run" in cache["reason"], cache
    assert records[0]["weights_fingerprint"] == records[1]["weights_fingerprint"]
    entries = list((tmp_path / "cache" / "quantized").iterdir())
    assert [p.name for p in entries if p.is_dir()] == [caches[0]["key"]]  # no temp folder left
    third = subprocess.run([*command, f"hydra.run.dir={tmp_path / 'run3'}"], cwd=REPO, env=env, capture_output=True)
    assert third.returncode == 0 and read_manifest(tmp_path / "run3")["cache"]["status"] == "hit"


@pytest.mark.slow
def test_cache_command_imports_no_torch(tmp_path) -> None:
    code = (
        "import sys; sys.argv = ['qloader', 'cache', 'list']\n"
        "from qloader import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported torch'\n"
    )
    env = {**os.environ, "QLOADER_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"quantized cache {tmp_path / 'quantized'}: empty\n"
