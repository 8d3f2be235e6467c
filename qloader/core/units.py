"""Byte counts as people read them."""

from __future__ import annotations


def mib(n: int | None) -> str:
    """`1,234.5 MiB`; `n/a` for an unknown size."""
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """`20GB`, `8GiB`, `1073741824` -> bytes; ValueError naming the accepted forms otherwise."""
    import re

    if isinstance(text, int) and not isinstance(text, bool):
        return text
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    if found is None:
        raise ValueError(f"'{text}' is not a size (e.g. 20GB, 8GiB, 1073741824)")
    return int(float(found[1]) * _UNITS[(found[2] or "").lower()])
