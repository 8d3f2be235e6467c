"""A fused CPU kernel for bitsandbytes' 4-bit quantization (`quant.kernel=fused`).

bitsandbytes quantizes 4-bit on CPU with a chain of eager torch ops (its `default` kernel):
blockwise absmax, scale, clamp, nearest code by midpoints, two codes per byte. This module runs
the same ops, in the same order, compiled by `torch.compile` (inductor's C++ backend) into one
loop. It is installed as the CPU kernel of the `bitsandbytes::quantize_4bit` op only while a load
runs, so `Params4bit`, `QuantState`, double quantization and every downstream kernel stay
bitsandbytes' own. Its output is byte-for-byte bitsandbytes' (tests/test_kernels.py checks it
against `bitsandbytes.functional.quantize_4bit`); inputs it does not cover (sizes that are not a
multiple of the block size, storage other than uint8, NaN or Inf) go to bitsandbytes' kernel.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class KernelReport:
    """What the fused kernel did during one load: for the manifest."""

    kernel: str = "bnb"
    fused_calls: int = 0
    fallback_calls: int = 0
    first_call_s: float | None = None
    """The first fused call, compile included (or its cache hit)."""
    cache_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


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


@functools.cache
def _compiled_kernel():
    return torch.compile(_quantize_blocks, dynamic=True, fullgraph=True)


def _fused(A: torch.Tensor, blocksize: int, quant_type: str):
    """The compiled kernel, with bitsandbytes' own midpoints (exact fp32 values) baked in as constants."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    midpoints, order = _get_4bit_quantize_bounds(quant_type, A.device)
    constants = tuple(float(m) for m in midpoints)
    return _compiled_kernel()(A.reshape(-1, blocksize), constants, None if quant_type == "nf4" else order)


def _bnb_kernel(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    """bitsandbytes' own kernel for this op (its `default` registration), past ours."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_4bit.default.redispatch(keys, A, blocksize, quant_type, quant_storage)


@contextmanager
def quantize_4bit_kernel(kernel: str) -> Iterator[KernelReport]:
    """While the block runs, CPU 4-bit quantization uses `kernel` ('bnb': bitsandbytes' own, unchanged)."""
    report = KernelReport(kernel=kernel)
    if kernel != "fused":
        yield report
        return
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    report.cache_dir = cache_dir()  # inductor's on-disk cache: a kernel compiles once per machine

    def fused_quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
        n = A.numel()
        if n == 0 or n % blocksize or quant_storage != torch.uint8 or blocksize % 2:
            report.fallback_calls += 1
            return _bnb_kernel(A, blocksize, quant_type, quant_storage)
        start = time.perf_counter()
        try:
            # one graph per input dtype and quant type; sizes are dynamic
            with torch._dynamo.config.patch(recompile_limit=64):
                packed, absmax = _fused(A, blocksize, quant_type)
        except Exception as e:  # no C++ compiler, an unsupported platform: bitsandbytes' kernel, noted
            report.fallback_calls += 1
            if len(report.notes) < 3:
                report.notes.append(f"fused kernel failed, used bitsandbytes': {type(e).__name__}: {e}"[:300])
            return _bnb_kernel(A, blocksize, quant_type, quant_storage)
        if report.first_call_s is None:
            report.first_call_s = round(time.perf_counter() - start, 3)
        if not bool(torch.isfinite(absmax).all()):  # NaN / Inf: bitsandbytes' own result, whatever it is
            report.fallback_calls += 1
            return _bnb_kernel(A, blocksize, quant_type, quant_storage)
        report.fused_calls += 1
        return packed, absmax

    library = torch.library.Library("bitsandbytes", "IMPL")
    try:
        library.impl("quantize_4bit", fused_quantize_4bit, "CPU")
        yield report
    finally:
        library._destroy()
