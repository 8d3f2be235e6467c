"""Byte counts as people read them."""

from __future__ import annotations


def mib(n: int | None) -> str:
    """`1,234.5 MiB`; `n/a` for an unknown size."""
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"
