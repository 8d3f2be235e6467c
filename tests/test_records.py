"""Run records that are never lost and never stale: unique run dirs, manifests never overwritten, interrupted
sweeps that still end with a final status and a summary, caches that survive a killed build or a bad file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
from conftest import REPO, read_manifest, run_cli
from damage import copy_checkpoint, shards
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qloader
from qloader.core.errors import CheckpointError, RunDirInUseError
from qloader.runs.manifest import manifest_schema, new_run_dir, record_killed_job

SCHEMA = manifest_schema()
# A tiny-llama whose 4-bit load takes seconds rather than milliseconds, so a signal lands mid-job.
SLOW = ["model=tiny-llama", "model.hidden_size=1024", "model.intermediate_size=2816", "model.num_hidden_layers=4"]


def cli(*args: str, cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qloader", *args], cwd=cwd, **popen)


# ---------------------------------------------------------------- records lost


@pytest.mark.slow  # a real process of its own (signals, umask, import side effects): make test-slow
def test_runs_started_together_get_their_own_run_dirs(tmp_path) -> None:
    """Hydra's default run dir is per second; two runs started together each keep their own manifest."""
    runs = [cli("model=tiny-llama", "quant=none", "summary=false", cwd=tmp_path, stderr=subprocess.PIPE) for _ in "ab"]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read().decode()
    manifests = sorted(tmp_path.glob("outputs/*/*/manifest.json"))
    assert len(manifests) == 2, manifests
    records = [json.loads(m.read_text()) for m in manifests]
    assert {r["pid"] for r in records} == {run.pid for run in runs}
    for path, record in zip(manifests, records, strict=True):
        assert path.parent.name.endswith(f"-{record['pid']}") and record["status"] == "succeeded"


def test_a_run_dir_holding_a_manifest_is_refused_not_overwritten(tmp_path) -> None:
    first = qloader.load(["model=tiny-llama", "quant=none"], run_dir=tmp_path)
    before = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(RunDirInUseError, match="already holds a manifest.json, the record of another run"):
        qloader.load(["model=tiny-llama", "quant=bnb-nf4"], run_dir=tmp_path)
    result = run_cli("model=tiny-llama", "quant=bnb-nf4", run_dir=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"qloader: error: RunDirInUseError: run dir '{tmp_path}' already holds a manifest.json, the record of another "
        "run; choose a new run dir (hydra.run.dir=..., or run_dir=... in qloader.load): a manifest is never overwritten"
    )
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert first.manifest["status"] == "succeeded"


def test_new_run_dirs_never_collide(tmp_path) -> None:
    dirs = [new_run_dir(tmp_path) for _ in range(3)]  # same process, same second
    assert len(set(dirs)) == 3 and all(d.is_dir() and d.parent.parent == tmp_path for d in dirs)
    assert dirs[0].name.endswith(str(os.getpid())) and dirs[1].name == f"{dirs[0].name}-1"


def test_api_default_run_dir_is_unique(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    a = qloader.load(["model=tiny-llama", "quant=none"])
    b = qloader.load(["model=tiny-llama", "quant=none"])
    assert a.run_dir != b.run_dir and a.run_dir.parent.parent == Path("outputs/api")
    assert read_manifest(a.run_dir)["status"] == read_manifest(b.run_dir)["status"] == "succeeded"


# ---------------------------------------------------------------- records stale: interrupted sweeps


def interrupt_sweep(
    tmp_path: Path, launcher: list[str], quants: str, loads: int, sig: int, to_group: bool, hold: int | None = None
):
    """Start a sweep, wait until `loads` jobs have begun their load stage, send `sig` (to the whole process
    group, as a terminal's Ctrl-C does, or to the sweep process alone, as a launcher's teardown does).

    `hold`: that job's process is stopped (SIGSTOP) as soon as its load has begun and resumed only once `sig` is
    pending in it (sent by the terminal, or passed on by the sweep a second later): it cannot finish first, however
    slowly this process or the sweep is scheduled."""
    sweep_dir = tmp_path / "sweep"
    process = cli(
        "-m", *launcher, *SLOW, f"quant={quants}", f"hydra.sweep.dir={sweep_dir}",
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    seen, deadline = b"", time.monotonic() + 300
    while seen.count(b"load 0/") < loads:
        assert time.monotonic() < deadline and process.poll() is None, seen.decode(errors="replace")
        seen += os.read(process.stderr.fileno(), 65536)
    held = None if hold is None else stop_running_job(sweep_dir / str(hold))
    if to_group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    if held is not None:
        while not signal_pending(held, sig):
            assert time.monotonic() < deadline, f"{signal.Signals(sig).name} never reached job {hold} (pid {held})"
            time.sleep(0.05)
        os.kill(held, signal.SIGCONT)
    out, err = process.communicate(timeout=300)
    return process.returncode, out.decode(), (seen + err).decode(errors="replace"), sweep_dir


def stop_running_job(job_dir: Path) -> int:
    """SIGSTOP the process of a job whose manifest says `running`; its pid. Fails if the job had already ended."""
    manifest = read_manifest(job_dir)
    assert manifest["status"] == "running", manifest["status"]
    os.kill(manifest["pid"], signal.SIGSTOP)
    assert read_manifest(job_dir)["status"] == "running", "the job ended before it could be held"
    return manifest["pid"]


def signal_pending(pid: int, sig: int) -> bool:
    """Is `sig` waiting to be delivered to the (stopped) process `pid`?"""
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return any(int(status[field], 16) >> (sig - 1) & 1 for field in ("SigPnd", "ShdPnd"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, sig, to_group",
    [
        ([], signal.SIGINT, True),
        ([], signal.SIGTERM, False),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], signal.SIGINT, True),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], signal.SIGTERM, False),
    ],
    ids=["basic-ctrl-c", "basic-sigterm", "joblib-ctrl-c", "joblib-sigterm"],
)
def test_interrupted_sweep_ends_every_job_and_writes_the_summary(tmp_path, launcher, sig, to_group) -> None:
    basic = not launcher
    # basic: job 0 (unquantized, fast) finishes, job 1 is interrupted in its load (held until the signal reaches
    # it), job 2 never starts; joblib: jobs 0 and 1 run side by side when the signal comes, at least one interrupted.
    quants = "none,bnb-nf4,bnb-int8" if basic else "bnb-nf4,bnb-int8,none"
    code, out, err, sweep_dir = interrupt_sweep(tmp_path, launcher, quants, 2, sig, to_group, hold=1 if basic else None)
    name = signal.Signals(sig).name
    assert code == 128 + sig, err
    assert "Traceback" not in err and "KeyboardInterrupt\n" not in err, err
    assert err.count(f"qloader: sweep interrupted by {name}") == 1, err
    table = pd.read_csv(sweep_dir / "summary.csv")
    statuses = list(table["status"])
    if basic:
        assert statuses == ["succeeded", "killed"], table[["job", "status", "error"]]
    else:  # side by side: one may finish before the signal lands, and its worker take up job 2
        assert "killed" in statuses and set(statuses) <= {"succeeded", "killed"}, statuses
        assert len(statuses) == len(list(sweep_dir.glob("*/.hydra")))  # a row for every job that started
    for job, status in enumerate(statuses):
        manifest = read_manifest(sweep_dir / str(job))
        jsonschema.validate(manifest, SCHEMA)
        assert manifest["status"] == status and manifest["finished_at"] is not None
        if status == "killed":
            assert manifest["error"]["type"] == ("KeyboardInterrupt" if sig == signal.SIGINT else "RunKilled")
    assert not basic or not (sweep_dir / "2").exists()
    assert (sweep_dir / "summary.md").is_file() and (sweep_dir / "summary.png").is_file()
    if basic:
        assert f"qloader: job #1 {' '.join(SLOW)} quant=bnb-nf4: killed in" in out
        assert "killed by SIGTERM" not in err or sig == signal.SIGTERM  # a Ctrl-C is reported as SIGINT


def test_a_stale_job_is_recorded_as_killed(tmp_path) -> None:
    """A job whose process vanished (SIGKILL) leaves `running`; one that never began leaves no manifest."""
    ran = tmp_path / "0"
    qloader.load(["model=tiny-llama", "quant=none"], run_dir=ran)
    data = read_manifest(ran)
    data.update(status="running", finished_at=None, error=None)
    (ran / "manifest.json").write_text(json.dumps(data))
    assert record_killed_job(ran, "KeyboardInterrupt", "the sweep was interrupted") == "killed"
    assert record_killed_job(ran, "KeyboardInterrupt", "again") == "killed"  # a final status is kept
    manifest = read_manifest(ran)
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["status"] == "killed" and manifest["error"]["message"] == "the sweep was interrupted"

    never = tmp_path / "1"
    (never / ".hydra").mkdir(parents=True)
    from omegaconf import OmegaConf

    from qloader.config.compose import compose

    OmegaConf.save(compose(["model=tiny-llama"]), never / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(["model=tiny-llama"]), never / ".hydra" / "overrides.yaml")
    assert record_killed_job(never, "RunKilled", "interrupted before it began") == "killed"
    manifest = read_manifest(never)
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["status"] == "killed" and manifest["overrides"] == ["model=tiny-llama"]
    assert record_killed_job(tmp_path / "2", "RunKilled", "-") == "missing"


# ---------------------------------------------------------------- cache builds


def test_killed_cache_build_is_cleaned_up_and_builds_are_locked(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QLOADER_CACHE", str(tmp_path / "cache"))
    started = tmp_path / "started"
    script = (
        "import time, pathlib\n"
        "from qloader.checkpoint.sources import _build_once\n"
        "def build(out):\n"
        "    (out / 'big.bin').write_bytes(b'x' * 1000)\n"
        f"    pathlib.Path({str(started)!r}).write_text(str(out))\n"
        "    time.sleep(600)\n"
        "_build_once('demo', build)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], env=os.environ)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.05)
    leftover = Path(started.read_text())
    child.kill()
    child.wait()
    assert leftover.is_dir()  # what a killed build leaves

    from qloader.checkpoint.sources import _build_once

    builds = []

    def build(out: Path) -> None:
        builds.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other thread to reach the lock
        (out / "config.json").write_text("{}")

    threads = [threading.Thread(target=_build_once, args=("demo", build)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1  # the second waited for the first and used its result
    assert not leftover.exists()
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == [".build-demo.lock", "demo"]


@pytest.mark.slow  # a real process of its own (signals, umask, import side effects): make test-slow
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_created_folders_and_files_follow_the_umask(tmp_path, umask) -> None:
    cache, saved = tmp_path / "cache", tmp_path / "saved"
    code = (
        "import os, sys, qloader\n"
        f"os.umask({umask})\n"
        "r = qloader.load(['model=tiny-llama', 'quant=bnb-nf4', 'save.enabled=true', 'save.dir=' + sys.argv[1]],"
        " run_dir=sys.argv[2])\n"
    )
    env = {**os.environ, "QLOADER_CACHE": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(saved), str(tmp_path / "run")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    built = next(cache.glob("tiny-llama-*"))
    for folder in (built, saved):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, (folder, oct(folder.stat().st_mode))
        files = [p for p in folder.iterdir() if p.is_file()]
        assert files and {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask}


# ---------------------------------------------------------------- hash cache


@pytest.mark.parametrize("content", ["[]", "null", '{"x": {}}', '{"x": {"size": 1, "sha256": "00"}}', "not json", "7"])
def test_a_malformed_hash_cache_is_ignored_with_one_warning(
    tiny_checkpoint, tmp_path, monkeypatch, caplog, content
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "sha256-cache.json").write_text(content)
    monkeypatch.setenv("QLOADER_CACHE", str(cache))
    from qloader.checkpoint.reader import default_hash_cache

    result = qloader.load(["model=local", f"model.path={tiny_checkpoint}", "quant=none"], run_dir=tmp_path / "run")
    assert result.manifest["status"] == "succeeded"
    warnings = [r.getMessage() for r in caplog.records if "hash cache" in r.getMessage()]
    assert len(warnings) == 1 and "ignoring it, files are hashed afresh" in warnings[0]
    rewritten = json.loads((cache / "sha256-cache.json").read_text())
    assert isinstance(rewritten, dict) and all("mtime_ns" in e for e in rewritten.values())
    assert default_hash_cache().entries == rewritten


def test_verify_hashes_catches_a_shard_changed_with_its_mtime_restored(tiny_checkpoint, tmp_path) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "checkpoint")
    shard = shards(folder)[-1]
    pin = f"++model.expected_sha256={{{shard.name}:{hashlib.sha256(shard.read_bytes()).hexdigest()}}}"
    base = ["model=local", f"model.path={folder}", "quant=none", pin]
    qloader.load(base, run_dir=tmp_path / "first")  # caches the hash
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # last byte of the last tensor: still a valid file, other weights
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # the write moved the ctime, which the hash cache trusts too: hashed afresh without verify_hashes
    with pytest.raises(CheckpointError, match=f"model.expected_sha256 does not match: .*{shard.name}: sha256"):
        qloader.load(base, run_dir=tmp_path / "trusted")
    with pytest.raises(CheckpointError, match=f"model.expected_sha256 does not match: .*{shard.name}: sha256"):
        qloader.load([*base, "model.verify_hashes=true"], run_dir=tmp_path / "verified")
    assert read_manifest(tmp_path / "verified")["status"] == "failed"


# ---------------------------------------------------------------- saving the returned model


def test_load_result_save_writes_the_weights_as_loaded(tmp_path) -> None:
    from safetensors.torch import load_file

    result = qloader.load(["model=tiny-llama", "quant=bnb-nf4"], run_dir=tmp_path / "run")
    saved = result.save(tmp_path / "ckpt")
    assert saved["path"] == str((tmp_path / "ckpt").resolve())
    written = {}
    for shard in shards(tmp_path / "ckpt"):
        written.update(load_file(shard))
    state = result.model.state_dict()  # no forward pass yet: the layout as loaded
    assert written.keys() == state.keys()
    assert all(written[k].equal(state[k].cpu()) for k in state)
    reloaded = qloader.load(["model=local", f"model.path={tmp_path / 'ckpt'}"], run_dir=tmp_path / "reload")
    assert reloaded.manifest["quantization"]["pre_quantized"] is True
    assert reloaded.manifest["weights_fingerprint"] == result.manifest["weights_fingerprint"]


def test_save_after_a_forward_that_rewrote_the_weights_is_refused(tmp_path) -> None:
    """bitsandbytes repacks 4-bit weights on the first forward on AVX512-BF16 CPUs; forced here on any CPU."""
    import bitsandbytes as bnb
    import torch

    from qloader.core.errors import SaveError

    result = qloader.load(["model=tiny-llama", "quant=bnb-nf4"], run_dir=tmp_path / "run")
    layers = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on such a CPU
    with torch.no_grad(), contextlib.suppress(Exception):  # the repacked layout needs that CPU to run
        result.model(torch.tensor([[1, 2, 3]]))
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    with pytest.raises(SaveError, match="first forward pass rewrote its weights"):
        result.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_save_after_a_forward_that_kept_the_weights_is_allowed(tmp_path) -> None:
    import torch

    from qloader.core.errors import ConfigError

    result = qloader.load(["model=tiny-llama", "quant=bnb-int8"], run_dir=tmp_path / "run")
    with torch.no_grad():
        result.model(torch.tensor([[1, 2, 3]]))
    assert result.save(tmp_path / "ckpt")["files"]
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        result.save(tmp_path / "ckpt")


# ---------------------------------------------------------------- library noise


@pytest.mark.slow  # a real process of its own (signals, umask, import side effects): make test-slow
def test_library_noise_goes_to_the_run_log(tmp_path) -> None:
    result = run_cli("model=tiny-llama", "quant=bnb-int8", "summary=false", run_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "qloader.log").read_text()
    for noise in ("Failed to load", "_C_mxfp8", "Detected no triton", "register_constant"):
        assert noise not in result.stderr, result.stderr
    assert "[torchao]" in log or "torchao" not in sys.modules  # torchao says it on import, on hosts like this


def test_library_warnings_and_records_are_routed_but_others_are_not(tmp_path) -> None:
    """In a plain process (pytest captures warnings and logging itself): library chatter to the file only.

    bitsandbytes is imported inside the block, as a run imports it (in `resolve`): on AVX512-BF16 CPUs the import
    itself logs that the kernels hub's CPU kernel could not be fetched."""
    script = """
import importlib.util, logging, sys, warnings
from pathlib import Path
from qloader.core.library_logs import library_records_to
logging.basicConfig()
bnb_file = str(Path(importlib.util.find_spec("bitsandbytes").origin).parent / "autograd" / "_functions.py")
with library_records_to(Path(sys.argv[1])):
    import bitsandbytes
    warnings.simplefilter("always")
    for _ in range(3):  # repeated per layer
        warnings.warn_explicit("MatMul8bitLt: inputs will be cast from torch.bfloat16", UserWarning, bnb_file, 1)
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
    logging.getLogger("optimum.gptq.quantizer").warning("Quantizing self_attn.q_proj in block 1/30...")
    warnings.warn_explicit("a user's own warning", UserWarning, "script.py", 1)
    logging.getLogger("qloader").warning("qloader's own warning")
assert logging.getLogger("bitsandbytes").propagate is True  # put back after the run
"""
    log = tmp_path / "qloader.log"
    result = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = log.read_text()
    assert text.count("MatMul8bitLt") == 3 and "Failed to load CPU gemm_4bit_forward" in text
    assert "Quantizing self_attn.q_proj" in text and "Quantizing self_attn.q_proj" not in result.stderr
    assert "MatMul8bitLt" not in result.stderr and "gemm_4bit_forward" not in result.stderr
    assert "a user's own warning" in result.stderr and "qloader's own warning" in result.stderr
    assert "qloader's own warning" not in text and "a user's own warning" not in text


# ---------------------------------------------------------------- whatever a file holds, only qloader's own errors

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_any_hash_cache_content_never_crashes(tmp_path, data) -> None:
    from qloader.checkpoint.reader import HashCache

    target = tmp_path / "weights.bin"
    target.write_bytes(b"weights")
    stat = target.stat()
    entry = st.dictionaries(
        st.sampled_from(["size", "mtime_ns", "sha256"]),
        JSON | st.just(stat.st_size) | st.just(stat.st_mtime_ns) | st.just("0" * 64),
    )
    content = data.draw(JSON | st.dictionaries(st.just(str(target.resolve())) | st.text(max_size=4), entry | JSON))
    path = tmp_path / "sha256-cache.json"
    path.write_text(json.dumps(content))
    cache = HashCache(path)
    digest = cache.sha256(target)
    assert len(digest) == 64 and set(digest) <= set("0123456789abcdef")
    assert HashCache(path, trust=False).sha256(target) == hashlib.sha256(b"weights").hexdigest()
    cache.save()
    assert isinstance(json.loads(path.read_text()), dict)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("recorded")
    return qloader.load(["model=tiny-llama", "quant=bnb-nf4"], run_dir=run_dir / "run").manifest


def field_paths(value, prefix=()) -> list[tuple]:
    """Every key path in a manifest (the first item of each list), the manifest itself included."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += field_paths(item, (*prefix, key))
    elif isinstance(value, list) and value:
        paths += field_paths(value[0], (*prefix, 0))
    return paths


@SETTINGS
@given(data=st.data())
def test_any_manifest_field_never_crashes_the_summaries(recorded, tmp_path, data) -> None:
    import copy

    from qloader.core.errors import QloaderError
    from qloader.runs import report, summary

    manifest = copy.deepcopy(json.loads(json.dumps(recorded, default=str)))
    path = data.draw(st.sampled_from(field_paths(manifest)))
    value = data.draw(JSON)
    if path:
        *parents, last = path
        holder = manifest
        for key in parents:
            holder = holder[key]
        holder[last] = value
    else:
        manifest = value
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True, exist_ok=True)
    (job / "manifest.json").write_text(json.dumps(manifest))
    rows = report.collect(tmp_path / "sweep")
    assert len(rows) == 1 and isinstance(rows[0]["status"], str)
    report.markdown(rows)
    with contextlib.suppress(QloaderError):
        summary.render(manifest)
