"""Quantization methods as plug-ins: one module per method family behind `QuantMethod`, and a registry."""

from qloader.quant.base import MergeRow, QuantMethod, WeightBytes
from qloader.quant.registry import METHODS, method_for_target, method_of

__all__ = ["METHODS", "MergeRow", "QuantMethod", "WeightBytes", "method_for_target", "method_of"]
