"""Every Python process started with this folder on PYTHONPATH runs bitsandbytes as on a CPU without AVX512-BF16
(`make test-avx2`): bitsandbytes is told the CPU lacks it, so its 4-bit layers keep their plain layout and forward
without repacking, and its CPU ops take their other paths. The suite then takes bitsandbytes' paths of such a CPU,
subprocesses (CLI runs, probe references, jobs) included. torch is left as it is: `ATEN_CPU_CAPABILITY=avx2` is no
such CPU (its bf16 attention then fails in `pack_vnni2`, which checks the real CPU).
"""

import importlib.abc
import importlib.machinery
import sys


class _NoAvx512Bf16(importlib.abc.MetaPathFinder):
    """After `bitsandbytes.functional` executes, its CPU test answers False (before any module imports it)."""

    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: False

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _NoAvx512Bf16())
