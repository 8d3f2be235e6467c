"""The quantizer's lifecycle around transformers' own: which modules it leaves as they are."""

from __future__ import annotations


def not_converted(name: str, quantizer) -> bool:
    """The module is on the quantizer's `modules_to_not_convert` (transformers' own pattern matching)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = getattr(quantizer, "modules_to_not_convert", None)
    return bool(patterns) and not should_convert_module(name, patterns)
