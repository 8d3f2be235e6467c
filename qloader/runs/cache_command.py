"""`qloader cache list` / `qloader cache clear`: show and empty the quantized-weights cache (no torch imported);
`qloader cache warm`: compile the fused quantization kernels into the kernel cache ahead of a load."""

from __future__ import annotations

import argparse
import sys

from qloader.checkpoint import quantized_cache
from qloader.core.units import mib


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qloader cache",
        description="Show or empty the quantized-weights cache ($QLOADER_CACHE/quantized), or fill the kernel cache.",
    )
    p.add_argument(
        "action",
        choices=("list", "clear", "warm"),
        help="list: every entry, least recently used first; clear: remove them; warm: compile the fused "
        "bitsandbytes quantization kernels now ($QLOADER_CACHE/kernels), so quant.kernel=auto can pick them on "
        "the first load",
    )
    return p


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def render_entries(rows: list[dict]) -> str:
    """One line per entry (key, size, last use, what it holds, from where), then the total."""
    root = quantized_cache.quantized_root()
    if not rows:
        return f"quantized cache {root}: empty"
    lines = [f"quantized cache {root}: {_entries(len(rows))}, least recently used first"]
    for row in rows:
        source = f" <- {row['source']}" if row.get("source") else ""
        lines.append(f"  {row['key']}  {mib(row['bytes']):>12}  {row['last_used']}  {row['description']}{source}")
    lines.append(f"  total {mib(sum(row['bytes'] for row in rows))}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.action == "warm":
        return _warm()
    if args.action == "list":
        print(render_entries(quantized_cache.list_entries()))
        return 0
    removed, kept = quantized_cache.clear()
    freed = mib(sum(row["bytes"] for row in removed))
    print(f"quantized cache {quantized_cache.quantized_root()}: removed {_entries(len(removed))} ({freed})")
    if kept:
        print(f"qloader: kept {_entries(len(kept))} that another run is reading", file=sys.stderr)
    return 0


def _warm() -> int:
    from qloader.quant import bnb_kernel  # torch: only this action needs it

    try:
        done = bnb_kernel.warm_kernels()
    except Exception as e:  # no C++ compiler, an unsupported platform: `auto` keeps bitsandbytes' kernels
        print(
            f"qloader: error: the fused kernels did not compile ({str(e).splitlines()[0][:300]}); "
            "quant.kernel=auto keeps bitsandbytes' kernels",
            file=sys.stderr,
        )
        return 1
    for key, compile_s, read_s in done:
        read = "not recorded" if read_s is None else f"{read_s:.2f} s"
        print(f"{key}: compiled in {compile_s:.2f} s, first call from the cache {read}")
    print(f"kernel cache {bnb_kernel.kernel_cache_dir()}: {len(done)} fused kernels ready")
    return 0
