"""Fused CPU kernels for bitsandbytes' quantization while loading (`quant.kernel`: auto, bnb, fused).

bitsandbytes quantizes on CPU with chains of eager torch ops (its `default` kernels): for 4-bit,
blockwise absmax, scale, clamp, nearest code by midpoints, two codes per byte; for LLM.int8(),
row absmax, scale, round. This module runs the same ops, in the same order, compiled by
`torch.compile` (inductor's C++ backend, OpenMP over every core) into one loop each. They are
installed as the CPU kernels of the `bitsandbytes::quantize_4bit` and
`bitsandbytes::int8_vectorwise_quant` ops only while a load runs, so `Params4bit`, `Int8Params`,
`QuantState`, double quantization and every downstream kernel stay bitsandbytes' own. The output is
byte-for-byte bitsandbytes' (tests/test_kernels.py checks it); inputs a kernel does not cover
(sizes, dtypes, storage, NaN / Inf, zero rows, int8 outliers) go to bitsandbytes' kernel.

`auto` picks the fused kernels when the planned number of quantized elements wins back the compile
on this host: the compiled code is cached under `$QLOADER_CACHE/kernels` (inductor's FX graph
cache), and the first call's cost on this host is recorded there, so a machine pays the full
compile once per torch version and every later load (a sweep's jobs too) pays only the cache hit.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("qloader")
OPS = ("quantize_4bit", "int8_vectorwise_quant")
# Seconds per element the fused kernels save against bitsandbytes' eager ones: about half of what a
# shared 2-core CPU measured (quantize_4bit with double quant 106-141 ns/element eager vs 15-16 fused,
# int8_vectorwise_quant 29-48 vs 2-4), so `auto` errs towards bitsandbytes' kernel.
SAVED_S_PER_ELEMENT = {"quantize_4bit": 25e-9, "int8_vectorwise_quant": 10e-9}
# What the first call costs before this host has recorded its own figure (seconds).
DEFAULT_FIRST_CALL_S = {"cold": 20.0, "warm": 2.5}


@dataclass
class KernelReport:
    """What the quantization kernels did during one load: for the manifest and the benchmark."""

    kernel: str = "bnb"
    """The kernel used: bnb or fused (auto resolves to one of them before the load)."""
    requested: str = "bnb"
    reason: str = ""
    """Why `kernel` was used (auto: the planned element count against the compile cost on this host)."""
    planned_elements: int = 0
    fused_calls: int = 0
    fallback_calls: int = 0
    bnb_calls: int = 0
    kernel_s: float = 0.0
    """Seconds inside the quantization op (either kernel), summed over the load."""
    first_call_s: float | None = None
    """The first fused call, compile included (or its cache hit)."""
    cache_dir: str | None = None
    threads: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["kernel_s"] = round(self.kernel_s, 4)
        return out


# ---------------------------------------------------------------- the fused math


def _quantize_blocks(blocks: torch.Tensor, midpoints: tuple[float, ...], order: torch.Tensor | None):
    """bitsandbytes' default `quantize_4bit` for a (blocks, blocksize) input.

    The same ops in the same order, with one change of form: the nearest code's index,
    `torch.bucketize(scaled, midpoints)`, is written as the number of midpoints strictly below the
    value, which is the same integer for every non-NaN input and compiles to one vectorized loop.
    """
    blocks = blocks.float()
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    q = (scaled > midpoints[0]).to(torch.int32)
    for midpoint in midpoints[1:]:
        q = q + (scaled > midpoint).to(torch.int32)
    if order is not None:
        q = order[q]
    q8 = q.to(torch.uint8)
    packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)
    return packed, absmax


def _quantize_rows(A: torch.Tensor):
    """bitsandbytes' default `int8_vectorwise_quant` (threshold 0) for a 2-D input: the same ops, in order."""
    row_stats = torch.max(A.abs(), dim=1).values.float()
    out_row = torch.round(A * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
    return out_row, row_stats


@functools.cache
def _compiled(name: str):
    kernel = {"quantize_4bit": _quantize_blocks, "int8_vectorwise_quant": _quantize_rows}[name]
    return torch.compile(kernel, dynamic=True, fullgraph=True)


def _fused_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    """The compiled 4-bit kernel, with bitsandbytes' own midpoints (exact fp32 values) baked in as constants."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    midpoints, order = _get_4bit_quantize_bounds(quant_type, A.device)
    constants = tuple(float(m) for m in midpoints)
    return _compiled("quantize_4bit")(A.reshape(-1, blocksize), constants, None if quant_type == "nf4" else order)


def _bnb_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    """bitsandbytes' own kernel for this op (its `default` registration), past ours."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_4bit.default.redispatch(keys, A, blocksize, quant_type, quant_storage)


def _bnb_int8(A: torch.Tensor, threshold: float):
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.int8_vectorwise_quant.default.redispatch(keys, A, threshold)


# ---------------------------------------------------------------- the compile cache and the auto decision


def kernel_cache_dir() -> Path:
    """Where the compiled kernels live: per qloader cache and torch version (inductor's code is per torch build)."""
    from qloader.core.cache import cache_dir

    return cache_dir() / "kernels" / f"torch-{torch.__version__}"


def _costs_file() -> Path:
    return kernel_cache_dir() / "first-call.json"


def recorded_first_call_s() -> dict[str, float]:
    """op/dtype -> the last first-call seconds measured on this host with the cache warm ('cold:' keys: a compile).

    The record only steers `auto`: a file that is not a JSON object of seconds (`[]`, a string, a folder in its
    place) is removed with one warning, and the next first call records afresh.
    """
    from qloader.core.cache import discard, read_json_entries

    path = _costs_file()
    action = "removed it; auto estimates, and the kernel's next first call is recorded afresh"
    costs, sound = read_json_entries(path, "kernel cost record", _seconds, action)
    if not sound:
        discard(path)
    return costs


def _seconds(key: str, value: object) -> bool:
    return type(value) in (int, float) and 0 <= value < float("inf")


def _cost_key(op: str, dtype: torch.dtype, quant_type: str | None = None) -> str:
    """A kernel's key in the first-call record: `op/dtype[/quant type]`."""
    return f"{op}/{dtype}" + (f"/{quant_type}" if quant_type else "")


def _record_first_call(key: str, seconds: float, cold: bool) -> None:
    from qloader.core.files import write_json_atomic

    costs = recorded_first_call_s()
    costs[f"{'cold:' if cold else ''}{key}"] = round(seconds, 3)
    with contextlib.suppress(OSError):  # a read-only cache: the next load estimates again
        _costs_file().parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(_costs_file(), costs)


def choose_kernel(requested: str, op: str, planned_elements: int, on_cpu: bool = True) -> tuple[str, str]:
    """(kernel, reason): `auto` is fused when the planned elements save more than the first call costs here."""
    if requested != "auto":
        return requested, f"quant.kernel={requested}"
    if not on_cpu or planned_elements <= 0:
        return "bnb", "auto: this load quantizes no weight on the CPU, where the fused kernel runs"
    costs = recorded_first_call_s()
    warm = [v for k, v in costs.items() if k.startswith(op + "/")]
    if warm:
        first, how = max(warm), "cache hit recorded on this host"
    elif any(k.startswith(f"cold:{op}/") for k in costs):  # compiled here once: the next call is a cache hit
        first, how = DEFAULT_FIRST_CALL_S["warm"], "cached on this host, cache hit estimated"
    else:
        first, how = DEFAULT_FIRST_CALL_S["cold"], "compile, not yet cached on this host (estimate)"
    saved = planned_elements * SAVED_S_PER_ELEMENT[op]
    verdict = "fused" if saved > first else "bnb"
    return verdict, (
        f"auto: {planned_elements:,} planned elements save about {saved:.1f} s with the fused kernel, "
        f"its first call costs {first:.1f} s ({how}) -> {verdict}"
    )


@contextmanager
def _inductor_cache(path: Path) -> Iterator[str]:
    """Inductor's cache (FX graphs, C++ kernels) under `path` while the block runs; the user's env is restored.

    Yields `path`, where the compiled code lives; inductor itself may be pointed at a link to it (`_compile_path`).
    """
    names = ("TORCHINDUCTOR_CACHE_DIR",)
    before = {name: os.environ.get(name) for name in names}
    path = path.absolute()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_compile_path(path))
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        cache_dir()  # inductor's own setup of the folder (made if absent)
        yield str(path)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _compile_path(path: Path) -> Path:
    """`path`, or a link to it that a shell-like split leaves whole: inductor hands its cache dir to g++ in a
    command line it splits with `shlex`, so a cache path with a space (or a quote) fails every compile.

    The link lives in a folder of this user's own under the temp dir (mode 0700, checked: a link in a shared
    folder could point the compiled code, which this process loads, anywhere); without one, `path` as it is.
    """
    import hashlib
    import shlex
    import stat
    import tempfile

    from qloader.core.cache import owner_tag

    if shlex.quote(str(path)) == str(path):
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    for base in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        links = Path(base) / f"qloader-kernels-{os.getuid()}"
        if shlex.quote(str(links)) != str(links):
            continue
        try:
            path.mkdir(parents=True, exist_ok=True)
            links.mkdir(mode=0o700, exist_ok=True)
            mode = links.lstat()
            if not stat.S_ISDIR(mode.st_mode) or mode.st_uid != os.getuid() or mode.st_mode & 0o077:
                continue  # not this user's private folder: not safe to compile through
            link = links / digest
            if not (link.is_symlink() and os.readlink(link) == str(path)):
                fresh = links / f"{digest}{owner_tag()}"
                fresh.unlink(missing_ok=True)
                fresh.symlink_to(path)
                os.replace(fresh, link)
            return link
        except OSError:
            continue
    return path


# ---------------------------------------------------------------- installing the kernels for a load


_CALLED: set[str] = set()
"""Kernels (op/dtype/quant type) this process has already called: compiled, or loaded from the cache."""


class _FusedOps:
    """The CPU implementations installed while a load runs: fused where covered, else bitsandbytes', timed."""

    def __init__(self, report: KernelReport, fused: bool) -> None:
        self.report, self.fused = report, fused

    def _run_fused(self, key: str, start: float, kernel: Callable[[], tuple]) -> tuple | None:
        """`kernel()`'s outputs, or None when it failed (then bitsandbytes' kernel is to run: `_failed` says so).

        A kernel's first call in this process holds an exclusive flock in the kernel cache: processes that start
        together on a cold cache compile into it one at a time (the later ones then read what the first
        compiled) instead of all at once, and each writes its first-call record in turn. Waiting for another
        process is not this call's cost: its timing starts once the lock is held."""
        first = key not in _CALLED and self.report.cache_dir is not None
        fd = None
        if first:
            with contextlib.suppress(OSError):  # a read-only cache: no record is written either
                fd = os.open(Path(self.report.cache_dir) / "first-call.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
                start = time.perf_counter()
            # a compile if nothing is cached yet (another process may have compiled it while this one waited)
            cold = first and not any(Path(self.report.cache_dir).glob("fxgraph/*"))
            try:
                # one graph per op, input dtype and quant type; sizes are dynamic
                with torch._dynamo.config.patch(recompile_limit=64):
                    out = kernel()
            except Exception as e:
                self._failed(e)
                self._count_bnb()
                return None
            if self.report.first_call_s is None:
                self.report.first_call_s = round(time.perf_counter() - start, 3)
            if key not in _CALLED:  # what a fresh process pays; a later load in this one finds it in memory
                _CALLED.add(key)
                _record_first_call(key, time.perf_counter() - start, cold)
            return out
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock

    def _failed(self, e: Exception) -> None:
        """No C++ compiler, an unsupported platform: bitsandbytes' kernels for the rest of the load, recorded as
        such (the manifest's `kernel` says what ran) and warned once."""
        self.fused = False
        why = _compile_error(e)
        self.report.notes.append(f"fused kernel failed, used bitsandbytes': {why}"[:300])
        if self.report.fused_calls == 0:
            self.report.kernel = "bnb"
        self.report.reason = f"{self.report.reason}; the fused kernel failed ({why}), bitsandbytes' kernel ran"[:600]
        log.warning(
            "quant.kernel: the fused kernel failed (%s); bitsandbytes' kernel quantizes the rest of this load "
            "(quant.kernel=bnb skips the attempt)",
            why,
        )

    def quantize_4bit(self, A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
        start = time.perf_counter()
        try:
            return self._quantize_4bit(A, blocksize, quant_type, quant_storage, start)
        finally:
            self.report.kernel_s += time.perf_counter() - start

    def _quantize_4bit(self, A, blocksize, quant_type, quant_storage, start):
        n = A.numel()
        covered = n and not n % blocksize and quant_storage == torch.uint8 and not blocksize % 2
        if not self.fused or not covered or A.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            self._count_bnb()
            return _bnb_4bit(A, blocksize, quant_type, quant_storage)
        key = _cost_key("quantize_4bit", A.dtype, quant_type)
        out = self._run_fused(key, start, lambda: _fused_4bit(A, blocksize, quant_type))
        if out is None:
            return _bnb_4bit(A, blocksize, quant_type, quant_storage)
        packed, absmax = out
        if not bool(torch.isfinite(absmax).all()):  # NaN / Inf: bitsandbytes' own result, whatever it is
            self.report.fallback_calls += 1
            return _bnb_4bit(A, blocksize, quant_type, quant_storage)
        self.report.fused_calls += 1
        return packed, absmax

    def int8_vectorwise_quant(self, A: torch.Tensor, threshold: float = 0.0):
        start = time.perf_counter()
        try:
            return self._int8(A, threshold, start)
        finally:
            self.report.kernel_s += time.perf_counter() - start

    def _int8(self, A, threshold, start):
        covered = A.dim() == 2 and A.numel() and A.dtype in (torch.float16, torch.bfloat16, torch.float32)
        if not self.fused or not covered:
            self._count_bnb()
            return _bnb_int8(A, threshold)
        if threshold > 0.0 and bool((A.abs() >= threshold).any()):  # outliers: bitsandbytes zeroes their columns
            self.report.fallback_calls += 1
            return _bnb_int8(A, threshold)
        key = _cost_key("int8_vectorwise_quant", A.dtype)
        out = self._run_fused(key, start, lambda: _compiled("int8_vectorwise_quant")(A.contiguous()))
        if out is None:
            return _bnb_int8(A, threshold)
        out_row, row_stats = out
        # a zero row (127 / 0), NaN or Inf: bitsandbytes' own result, whatever its conversion gives
        if not bool(((row_stats > 0) & (row_stats < float("inf"))).all()):
            self.report.fallback_calls += 1
            return _bnb_int8(A, threshold)
        self.report.fused_calls += 1
        return out_row, row_stats, (torch.empty(0, dtype=torch.int64, device=A.device) if threshold > 0.0 else None)

    def _count_bnb(self) -> None:
        if self.fused:
            self.report.fallback_calls += 1
        else:
            self.report.bnb_calls += 1


@contextmanager
def quantization_kernels(
    kernel: str, planned_elements: int = 0, op: str = "quantize_4bit", on_cpu: bool = True
) -> Iterator[KernelReport]:
    """While the block runs, bitsandbytes' CPU quantization ops use `kernel` (auto, bnb or fused), timed.

    'bnb' keeps bitsandbytes' kernels (only timed); 'auto' decides from `planned_elements` (see `choose_kernel`).
    """
    kernel = str(kernel)  # a str Enum from the schema: the plain value, for the manifest
    chosen, reason = choose_kernel(kernel, op, planned_elements, on_cpu)
    report = KernelReport(kernel=chosen, requested=kernel, reason=reason, planned_elements=planned_elements)
    report.threads = torch.get_num_threads()
    ops = _FusedOps(report, chosen == "fused")
    library = torch.library.Library("bitsandbytes", "IMPL")
    try:
        with _inductor_cache(kernel_cache_dir()) if chosen == "fused" else _no_cache() as cache:
            report.cache_dir = cache
            for name in OPS:
                library.impl(name, getattr(ops, name), "CPU")
            yield report
    finally:
        library._destroy()


def _compile_error(e: Exception) -> str:
    """One line for a failed compile: the compiler's own first complaint where it gave one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    complaint = next((line for line in lines[1:] if "error:" in line.lower()), None)  # g++: fatal error: ...
    text = f"{first}: {complaint}" if complaint else first
    return f"{type(e).__name__}: {text}"[:300]


@contextmanager
def _no_cache() -> Iterator[None]:
    yield None


WARM_CALLS = {
    "quantize_4bit/nf4": ("quantize_4bit", (64, "nf4", torch.uint8)),
    "quantize_4bit/fp4": ("quantize_4bit", (64, "fp4", torch.uint8)),
    "int8_vectorwise_quant": ("int8_vectorwise_quant", (0.0,)),
}
"""What `warm_kernels` compiles: bitsandbytes' ops with the arguments transformers' loads pass (blocksize 64)."""


def _call_fused(name: str, dtype: torch.dtype) -> tuple[str, float]:
    """One fused kernel's first call in this process on a small seeded tensor: (its cost-record key, seconds)."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    op, args = WARM_CALLS[name]
    A = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)).to(dtype)
    with quantization_kernels("fused", A.numel(), op) as report:
        getattr(torch.ops.bitsandbytes, op)(A, *args)
    if report.fused_calls != 1:  # the compile failed: the report says why
        raise RuntimeError(f"the fused kernel {name} for {dtype} did not run: {report.reason}")
    return _cost_key(op, dtype, args[1] if op == "quantize_4bit" else None), report.first_call_s


def _fused_calls_in_a_fresh_process(names: tuple[str, ...], dtype: torch.dtype) -> list[tuple[str, float]]:
    """`_call_fused` for each of `names` in a new Python process: what it pays owes nothing to this process's
    compiled graphs in memory. [(cost-record key, seconds)]."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "qloader.quant.bnb_kernel", str(dtype).removeprefix("torch."), *names]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(names)}: {done.stderr.strip()[-300:]}")
    return [tuple(pair) for pair in json.loads(done.stdout.strip().splitlines()[-1])]


def warm_kernels(
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,), names: tuple[str, ...] = tuple(WARM_CALLS)
) -> list[tuple[str, float, float | None]]:
    """Compile the fused kernels into the kernel cache now, not in a load: bitsandbytes' 4-bit (nf4, fp4) and int8
    quantization ops, once per input dtype, in a process of their own; then time each one's first call in a fresh
    process, as a load's first call reads it from the cache. `auto` then weighs a load against that measured cache
    read, the first load on this host included. [(cost-record key, compile seconds, cache-read seconds)]; raises
    what a compile raised (no C++ compiler, say)."""
    from qloader.core.files import write_json_atomic

    before = recorded_first_call_s()
    compiled = [pair for dtype in dtypes for pair in _fused_calls_in_a_fresh_process(names, dtype)]
    costs = recorded_first_call_s()  # one process compiled them all: what it recorded is compile time
    for key, seconds in compiled:
        if key not in before:
            costs.pop(key, None)
            costs[f"cold:{key}"] = seconds
    write_json_atomic(_costs_file(), costs)
    for dtype in dtypes:  # a process per kernel: each pays what a load's first call pays (dynamo's start too)
        for name in names:
            _fused_calls_in_a_fresh_process((name,), dtype)
    read = recorded_first_call_s()
    return [(key, seconds, read.get(key)) for key, seconds in compiled]


if __name__ == "__main__":  # `warm_kernels`' processes: DTYPE NAME...; prints [[cost-record key, seconds], ...]
    import json
    import sys

    print(json.dumps([_call_fused(name, getattr(torch, sys.argv[1])) for name in sys.argv[2:]]))
