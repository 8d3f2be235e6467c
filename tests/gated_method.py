"""tests/custom_method.py's rtn_int8, held at its first weight until a file exists: a run that stays in its load
stage for as long as a test needs (a cluster's time limit, scancel), without depending on how fast the machine is.

    quant=none quant._target_=gated_method.RtnInt8Config   with QLOADER_TEST_GATE=PATH and tests/ on PYTHONPATH
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import custom_method
from custom_method import RtnInt8Config  # noqa: F401  (the `_target_` the tests name)

GATE_ENV = "QLOADER_TEST_GATE"
_convert = custom_method.RtnInt8Quantize.convert


def _held_convert(self, *args, **kwargs):
    gate = os.environ.get(GATE_ENV)
    while gate and not Path(gate).exists():
        time.sleep(0.05)
    return _convert(self, *args, **kwargs)


custom_method.RtnInt8Quantize.convert = _held_convert
