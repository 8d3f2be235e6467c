"""Every cache under $QLOADER_CACHE heals: damaged, wrong-typed or abandoned files are one warning, then removed
or rebuilt, and never give a wrong result. Each test points QLOADER_CACHE at a tmp_path folder of its own."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_manifest, run_cli
from damage import copy_checkpoint, shards

import qloader
from qloader.measure.fingerprint import weights_fingerprint
from qloader.quant import bnb_kernel
from qloader.runs import replay

FORGED = "f" * 64


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty qloader cache of this test's own: the session's cache is never damaged."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("QLOADER_CACHE", str(folder))
    return folder


@pytest.fixture
def checkpoint(tiny_checkpoint, cache, tmp_path) -> Path:
    """A private copy of tiny-llama (7 shards), free to change."""
    return copy_checkpoint(tiny_checkpoint, tmp_path / "checkpoint")


def local(folder: Path, *overrides: str) -> list[str]:
    """A local checkpoint, unquantized unless `overrides` name a quant."""
    quant = [] if any(o.startswith("quant=") for o in overrides) else ["quant=none"]
    return ["model=local", f"model.path={folder}", *quant, *overrides]


def warnings_about(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and what in r.getMessage()]


def true_fingerprint(model) -> str:
    """The fingerprint hashed from the weights' bytes, no cache involved."""
    return weights_fingerprint(model, reuse_file_hashes=False)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    done = subprocess.Popen([sys.executable, "-c", ""])
    done.wait()
    return done.pid


def dead_tag() -> str:
    """The owner tag (`qloader.core.cache.owner_tag`) of a process that has ended."""
    return f".pid{dead_pid()}-0"


def rewrite_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def damage(entries: dict) -> dict:
    """Every digest set to "f"*64 (a region entry of the flat release is the digest itself)."""
    return {key: {**entry, "sha256": FORGED} if isinstance(entry, dict) else FORGED for key, entry in entries.items()}


def forge(entries: dict) -> dict:
    """Every digest set to "f"*64, its checksum recomputed: damage no checksum can see (a forged cache)."""
    forged = damage(entries)
    for key, entry in forged.items():
        if isinstance(entry, dict) and "check" in entry:
            from qloader.core.cache import entry_check

            entry["check"] = entry_check(key, entry)
    return forged


# ---------------------------------------------------------------- region digests (region-sha256.json)


def test_damaged_region_digests_are_never_used(checkpoint, cache, tmp_path, caplog) -> None:
    first = qloader.load(local(checkpoint), run_dir=tmp_path / "a")
    truth = true_fingerprint(first.model)
    assert first.manifest["weights_fingerprint"] == truth
    regions = cache / "region-sha256.json"
    rewrite_json(regions, damage)
    caplog.clear()
    again = qloader.load(local(checkpoint), run_dir=tmp_path / "b")
    assert again.manifest["weights_fingerprint"] == truth
    assert len(warnings_about(caplog, "region digest cache")) == 1
    from qloader.measure.fingerprint import read_region_cache

    entries, sound = read_region_cache(regions)
    assert sound and entries and FORGED not in {e["sha256"] for e in entries.values()}


@pytest.mark.parametrize("content", ["[]", "null", '{"a": "b"}', "truncated", "a directory"])
def test_a_malformed_region_cache_is_one_warning_and_rebuilt(checkpoint, cache, tmp_path, caplog, content) -> None:
    first = qloader.load(local(checkpoint), run_dir=tmp_path / "a")
    regions = cache / "region-sha256.json"
    if content == "a directory":
        regions.unlink()
        (regions / "x").mkdir(parents=True)
    else:
        text = regions.read_text()
        regions.write_text(text[: len(text) // 2] if content == "truncated" else content)
    caplog.clear()
    again = qloader.load(local(checkpoint), run_dir=tmp_path / "b")
    assert again.manifest["weights_fingerprint"] == true_fingerprint(first.model)
    assert len(warnings_about(caplog, "region digest cache")) == 1
    from qloader.measure.fingerprint import read_region_cache

    assert regions.is_file() and read_region_cache(regions)[1]
    caplog.clear()
    qloader.load(local(checkpoint), run_dir=tmp_path / "c")
    assert warnings_about(caplog, "cache") == []  # healed: the next run is quiet


def test_verify_hashes_rehashes_and_rewrites_both_caches(checkpoint, cache, tmp_path) -> None:
    first = qloader.load(local(checkpoint), run_dir=tmp_path / "a")
    truth, files = first.manifest["weights_fingerprint"], first.manifest["checkpoint"]["files"]
    hashes, regions = cache / "sha256-cache.json", cache / "region-sha256.json"

    def load(name: str, *overrides: str) -> dict:
        return qloader.load(local(checkpoint, *overrides), run_dir=tmp_path / name).manifest

    rewrite_json(regions, forge)
    assert load("regions forged")["weights_fingerprint"] != truth  # the limit: what a forger recomputes passes
    assert load("regions verified", "model.verify_hashes=true")["weights_fingerprint"] == truth
    assert load("regions after")["weights_fingerprint"] == truth and FORGED not in regions.read_text()

    rewrite_json(hashes, forge)
    assert load("hashes forged")["checkpoint"]["files"] != files
    assert load("hashes verified", "model.verify_hashes=true")["checkpoint"]["files"] == files
    after = load("hashes after")
    assert after["checkpoint"]["files"] == files and after["weights_fingerprint"] == truth
    assert FORGED not in hashes.read_text()


def test_replay_rehash_repairs_the_caches_and_calls_an_unchanged_checkpoint_equal(
    checkpoint, cache, tmp_path, capsys
) -> None:
    qloader.load(local(checkpoint), run_dir=tmp_path / "a")
    for name in ("sha256-cache.json", "region-sha256.json"):
        rewrite_json(cache / name, damage)
    code = replay.main([str(tmp_path / "a" / "manifest.json"), "--rehash", "--run-dir", str(tmp_path / "replay")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert [line for line in out.splitlines() if line.startswith("weights_fingerprint")][0].endswith("equal")
    assert FORGED not in (cache / "sha256-cache.json").read_text() + (cache / "region-sha256.json").read_text()


def test_a_byte_flipped_with_its_mtime_restored_changes_the_fingerprint(checkpoint, cache, tmp_path, capsys) -> None:
    first = qloader.load(local(checkpoint), run_dir=tmp_path / "a").manifest
    shard = shards(checkpoint)[-1]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: still a valid file
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # touch -r
    assert shard.stat().st_mtime_ns == stat.st_mtime_ns and shard.stat().st_size == stat.st_size
    again = qloader.load(local(checkpoint), run_dir=tmp_path / "b").manifest
    assert again["weights_fingerprint"] != first["weights_fingerprint"]
    recorded = {f["name"]: f["sha256"] for f in again["checkpoint"]["files"]}
    assert recorded[shard.name] == hashlib.sha256(bytes(data)).hexdigest()
    code = replay.main([str(tmp_path / "a" / "manifest.json"), "--check-only"])
    assert code == 1 and f"checkpoint file {shard.name}" in capsys.readouterr().err


# ---------------------------------------------------------------- input hashes (sha256-cache.json)


def test_a_damaged_input_hash_is_never_recorded(checkpoint, cache, tmp_path, caplog) -> None:
    files = qloader.load(local(checkpoint), run_dir=tmp_path / "a").manifest["checkpoint"]["files"]
    rewrite_json(cache / "sha256-cache.json", damage)
    caplog.clear()
    again = qloader.load(local(checkpoint), run_dir=tmp_path / "b").manifest
    assert again["checkpoint"]["files"] == files
    assert len(warnings_about(caplog, "hash cache")) == 1


def test_a_directory_in_place_of_the_hash_cache_is_replaced(checkpoint, cache, tmp_path, caplog) -> None:
    (cache / "sha256-cache.json" / "x").mkdir(parents=True)
    qloader.load(local(checkpoint), run_dir=tmp_path / "a")
    assert len(warnings_about(caplog, "hash cache")) == 1
    assert (cache / "sha256-cache.json").is_file()
    caplog.clear()
    assert qloader.load(local(checkpoint), run_dir=tmp_path / "b").manifest["checkpoint"]["hashed_files"] == 0
    assert warnings_about(caplog, "cache") == []


@pytest.mark.parametrize("name", ["sha256-cache.json", "region-sha256.json"])
def test_temp_files_of_a_killed_cache_write_are_removed(checkpoint, cache, tmp_path, caplog, name) -> None:
    cache.mkdir()
    left = cache / f".{name}.{dead_pid()}.tmp"  # the temp file of a write_json_atomic that never renamed it
    left.write_text('{"half": ')
    qloader.load(local(checkpoint), run_dir=tmp_path / "a")
    assert not left.exists()
    warned = warnings_about(caplog, "cache temp file(s) left by a process that died")
    assert len(warned) == 1 and left.name in warned[0]


# ---------------------------------------------------------------- the kernel cache (kernels/<torch>/first-call.json)


def eager_kernels(name: str):
    """The fused kernels' own math, uncompiled: the load takes the fused path without paying a compile."""
    return {"quantize_4bit": bnb_kernel._quantize_blocks, "int8_vectorwise_quant": bnb_kernel._quantize_rows}[name]


def write_costs(content: str) -> Path:
    path = bnb_kernel.kernel_cache_dir() / "first-call.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if content == "a directory":
        (path / "x").mkdir(parents=True)
    else:
        path.write_text(content)
    return path


COSTS = ["[]", '"fast"', '{"quantize_4bit/torch.bfloat16/nf4": "slow"}', '{"quantize_4bit/x": NaN}', "{", "a directory"]


@pytest.mark.parametrize("content", COSTS)
def test_a_malformed_kernel_record_is_removed_by_the_default_load(checkpoint, cache, tmp_path, caplog, content) -> None:
    path = write_costs(content)
    result = qloader.load(local(checkpoint, "quant=bnb-nf4"), run_dir=tmp_path / "a")
    assert result.manifest["status"] == "succeeded"
    assert result.manifest["quantization"]["kernel"]["requested"] == "auto"
    assert len(warnings_about(caplog, "kernel cost record")) == 1
    assert not path.exists()


@pytest.mark.parametrize("content", ["[]", '{"int8_vectorwise_quant/torch.bfloat16": [1]}'])
def test_a_malformed_kernel_record_never_breaks_a_fused_load(
    checkpoint, cache, tmp_path, caplog, monkeypatch, content
) -> None:
    monkeypatch.setattr(bnb_kernel, "_compiled", eager_kernels)
    monkeypatch.setattr(bnb_kernel, "_CALLED", set())  # this process has not called the kernel: it records
    path = write_costs(content)
    for quant in ("bnb-nf4", "bnb-int8"):
        caplog.clear()
        result = qloader.load(local(checkpoint, f"quant={quant}", "quant.kernel=fused"), run_dir=tmp_path / quant)
        kernel = result.manifest["quantization"]["kernel"]
        assert (kernel["kernel"], kernel["fused_calls"], kernel["bnb_calls"]) == ("fused", 14, 0)
        assert len(warnings_about(caplog, "kernel cost record")) == (quant == "bnb-nf4")
    recorded = json.loads(path.read_text())
    assert {key.split("/")[0] for key in recorded} == {"cold:quantize_4bit", "cold:int8_vectorwise_quant"}


def test_a_failed_fused_kernel_is_recorded_as_the_fallback_it_was(
    checkpoint, cache, tmp_path, caplog, monkeypatch
) -> None:
    def broken(name: str):
        def kernel(*args):
            raise RuntimeError("CppCompileError: C++ compile error\nOutput:\ng++: fatal error: no input files")

        return kernel

    monkeypatch.setattr(bnb_kernel, "_compiled", broken)
    result = qloader.load(local(checkpoint, "quant=bnb-nf4", "quant.kernel=fused"), run_dir=tmp_path / "a")
    kernel = result.manifest["quantization"]["kernel"]
    assert (kernel["requested"], kernel["kernel"]) == ("fused", "bnb")  # what ran, not what was asked for
    assert (kernel["fused_calls"], kernel["bnb_calls"]) == (0, 14)
    assert "the fused kernel failed (RuntimeError: " in kernel["reason"] and "g++: fatal error" in kernel["reason"]
    warned = warnings_about(caplog, "quant.kernel: the fused kernel failed")
    assert len(warned) == 1 and "quant.kernel=bnb" in warned[0]


def test_inductor_compiles_through_a_path_without_spaces(tmp_path, monkeypatch) -> None:
    import tempfile

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the link goes
    (tmp_path / "tmp").mkdir()
    where = tmp_path / "a cache 'dir'" / "kernels"
    with bnb_kernel._inductor_cache(where) as recorded:
        seen = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert recorded == str(where) and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert shlex.split(seen) == [seen]  # what inductor's g++ command line keeps whole
    assert Path(seen).resolve() == where.resolve()  # the compiled code still lands in the qloader cache
    assert Path(seen).is_relative_to(tmp_path / "tmp") and Path(seen).parent.stat().st_mode & 0o077 == 0  # private
    plain = tmp_path / "plain"
    with bnb_kernel._inductor_cache(plain):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(plain)


@pytest.mark.slow
def test_the_fused_kernel_compiles_in_a_cache_path_with_a_space(tiny_checkpoint, tmp_path) -> None:
    cache, tmp = tmp_path / "my cache", tmp_path / "tmp"
    tmp.mkdir()
    result = run_cli(
        *local(tiny_checkpoint, "quant=bnb-int8", "quant.kernel=fused"),
        run_dir=tmp_path / "run",
        env={"QLOADER_CACHE": str(cache), "TMPDIR": str(tmp)},
    )
    assert result.returncode == 0, result.stderr
    kernel = read_manifest(tmp_path / "run")["quantization"]["kernel"]
    assert (kernel["kernel"], kernel["fused_calls"], kernel["bnb_calls"]) == ("fused", 14, 0), kernel
    assert any(cache.glob("kernels/*/**/*.so")) and "fused kernel failed" not in result.stderr


# ---------------------------------------------------------------- probe references (probe-reference/*.pt)


PROBE = ["probe=quick", "probe.max_tokens=64", "probe.max_new_tokens=2", "probe.decode_tokens=2"]


@pytest.fixture(scope="module")
def probed_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """tiny-llama with a tokenizer: the probe needs one."""
    from tiny_tokenizer import add_tokenizer

    return add_tokenizer(copy_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("probed") / "checkpoint"))


def reference_in_process(monkeypatch) -> None:
    """The reference 'process' runs in this one (the same `main`), so a probe test pays no interpreter start."""
    from qloader.probe import fidelity, reference

    def run(command, **kwargs):
        reference.main(*command[3:])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fidelity, "subprocess", types.SimpleNamespace(run=run))


@pytest.fixture(scope="module")
def good_reference(probed_checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    """A sound cached reference (the file) and the probe results computed with it."""
    folder = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("QLOADER_CACHE", str(folder / "cache"))
        reference_in_process(monkeypatch)
        probe = qloader.load([*local(probed_checkpoint), *PROBE], run_dir=folder / "run").manifest["probe"]
    assert probe["reference_cached"] is False
    (path,) = (folder / "cache" / "probe-reference").glob("*.pt")
    return path, probe


def damage_reference(path: Path, how: str) -> None:
    good = torch.load(path)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "random bytes":
        path.write_bytes(os.urandom(path.stat().st_size))
    elif how == "wrong shape":
        torch.save(good[:, :-1].clone(), path)
    elif how == "NaN":
        torch.save(torch.full_like(good, float("nan")), path)
    elif how == "not a tensor":
        torch.save({"log_probs": good}, path)
    elif how == "a directory":
        path.unlink()
        (path / "x").mkdir(parents=True)


@pytest.mark.parametrize("how", ["truncated", "random bytes", "wrong shape", "NaN", "not a tensor", "a directory"])
def test_a_damaged_probe_reference_is_removed_and_computed_again(
    probed_checkpoint, good_reference, cache, tmp_path, caplog, monkeypatch, how
) -> None:
    good, probe = good_reference
    path = cache / "probe-reference" / good.name
    path.parent.mkdir(parents=True)
    shutil.copy(good, path)
    damage_reference(path, how)
    reference_in_process(monkeypatch)
    again = qloader.load([*local(probed_checkpoint), *PROBE], run_dir=tmp_path / "b").manifest
    assert again["status"] == "succeeded" and again["probe"]["reference_cached"] is False
    scores = ("perplexity", "reference_perplexity", "mean_kl", "top1_agreement")
    assert {k: again["probe"][k] for k in scores} == {k: probe[k] for k in scores}
    warned = warnings_about(caplog, "probe reference")
    assert len(warned) == 1 and "computed again" in warned[0]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no .tmp left
    assert torch.equal(torch.load(path), torch.load(good))  # healed: the next run reads it


def test_probe_temp_files_of_a_killed_reference_process_are_removed(
    probed_checkpoint, cache, tmp_path, caplog, monkeypatch
) -> None:
    folder = cache / "probe-reference"
    folder.mkdir(parents=True)
    tag = dead_tag()
    left = [folder / f"abc{tag}.tmp", folder / f"abc{tag}.inputs.tmp"]
    for path in left:
        path.write_bytes(b"half")
    reference_in_process(monkeypatch)
    result = qloader.load([*local(probed_checkpoint), *PROBE], run_dir=tmp_path / "a")
    assert result.manifest["status"] == "succeeded"
    assert not any(p.exists() for p in left) and [p.suffix for p in folder.iterdir()] == [".pt"]
    assert len(warnings_about(caplog, "left by a process that died")) == 1


# ---------------------------------------------------------------- converted models (cache/<name>/)


def tiny_entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.glob("tiny-llama-*") if p.is_dir()]
    return entry


def break_entry(entry: Path, how: str) -> None:
    if how == "config.json missing":
        (entry / "config.json").unlink()
    elif how == "shard truncated":
        shard = shards(entry)[2]
        shard.write_bytes(shard.read_bytes()[:1000])
    elif how == "no completion marker":
        (entry / ".qloader-built").unlink()
    elif how == "marker not JSON":
        (entry / ".qloader-built").write_text("{")
    elif how == "a file in its place":
        shutil.rmtree(entry)
        entry.write_text("x")


ENTRY_DAMAGE = [
    "config.json missing",
    "shard truncated",
    "no completion marker",
    "marker not JSON",
    "a file in its place",
]


@pytest.mark.parametrize("how", ENTRY_DAMAGE)
def test_a_damaged_converted_model_is_rebuilt(cache, tmp_path, caplog, how) -> None:
    first = qloader.load(["model=tiny-llama", "quant=none"], run_dir=tmp_path / "a").manifest
    entry = tiny_entry(cache)
    break_entry(entry, how)
    caplog.clear()
    again = qloader.load(["model=tiny-llama", "quant=none"], run_dir=tmp_path / "b").manifest
    assert again["status"] == "succeeded"
    assert again["weights_fingerprint"] == first["weights_fingerprint"]
    assert again["checkpoint"]["files"] == first["checkpoint"]["files"]
    warned = warnings_about(caplog, "converted-model cache entry")
    assert len(warned) == 1 and "building it again" in warned[0]
    assert not list(cache.glob(".build-tiny-llama-*-*"))


def test_a_killed_build_leaves_nothing_behind(cache, tmp_path, caplog) -> None:
    qloader.load(["model=tiny-llama", "quant=none"], run_dir=tmp_path / "a")
    entry = tiny_entry(cache)
    shutil.rmtree(entry)
    leftover = cache / f".build-{entry.name}-x1y2"  # a build killed before its rename; its lock is free
    (leftover / "half").mkdir(parents=True)
    caplog.clear()
    qloader.load(["model=tiny-llama", "quant=none"], run_dir=tmp_path / "b")
    assert not leftover.exists() and (entry / "config.json").is_file()
    assert len(warnings_about(caplog, "left by a build that was killed")) == 1


# ---------------------------------------------------------------- save temp folders (beside save.dir)


def test_a_save_temp_folder_of_a_dead_process_is_removed_by_the_next_save(checkpoint, cache, tmp_path, caplog) -> None:
    from qloader.core.cache import owner_tag

    dead = tmp_path / f".s2{dead_tag()}.saving-ab12"
    (dead / "model.safetensors").parent.mkdir()
    (dead / "model.safetensors").write_bytes(b"\0" * 4096)
    alive = tmp_path / f".s3{owner_tag()}.saving-cd34"  # a save still running (this process): kept
    alive.mkdir()
    save = ["save.enabled=true", f"save.dir={tmp_path / 's2'}"]
    result = qloader.load(local(checkpoint, *save), run_dir=tmp_path / "run")
    assert result.manifest["status"] == "succeeded" and (tmp_path / "s2" / "config.json").is_file()
    assert not dead.exists() and alive.is_dir()
    warned = warnings_about(caplog, "save temp folder(s) left by a process that died")
    assert len(warned) == 1 and dead.name in warned[0]
    assert not [p for p in tmp_path.glob(".s2*")]


SAVE_FOREVER = """
import sys, threading
from pathlib import Path
from omegaconf import OmegaConf
from qloader.checkpoint.writer import save_checkpoint

class Model:
    def save_pretrained(self, folder, max_shard_size):
        (Path(folder) / "model.safetensors").write_bytes(b"0" * 100000)
        print("writing", flush=True)
        threading.Event().wait()  # killed here, mid-save

save_checkpoint(Model(), Path(sys.argv[1]), OmegaConf.create({"dir": sys.argv[2], "max_shard_size": "5GB"}))
"""


@pytest.mark.slow
def test_a_save_killed_with_sigkill_leaves_a_temp_folder_the_next_save_removes(checkpoint, tmp_path, caplog) -> None:
    from qloader.checkpoint.writer import remove_dead_saves

    target = tmp_path / "out" / "s2"
    command = [sys.executable, "-c", SAVE_FOREVER, str(checkpoint), str(target)]
    saver = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert saver.stdout.readline().strip() == "writing"  # the temp folder is being written
    (temp,) = target.parent.glob(".s2.pid*.saving-*")
    assert remove_dead_saves(target.parent) == []  # its owner is alive: kept
    saver.kill()
    saver.wait()
    assert temp.is_dir() and not target.exists()
    assert remove_dead_saves(target.parent) == [temp] and not temp.exists()
    assert len(warnings_about(caplog, "save temp folder(s) left by a process that died")) == 1
