"""Facts about this machine and its libraries, for the manifest and the `validate` stage."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from qloader.checkpoint.reader import Checkpoint
from qloader.core.errors import EnvironmentMismatchError
from qloader.quant.base import extra_pins

CORE_PACKAGES = ("torch", "transformers", "accelerate", "hydra-core", "omegaconf", "safetensors", "qloader")
PINNED_CORE = ("torch", "transformers", "accelerate")
"""Core libraries whose tested ranges `validate` checks: the staged pipeline calls their loading internals."""


def packages() -> tuple[str, ...]:
    """The core libraries and every method plug-in's own (bitsandbytes, torchao, optimum-quanto, ...)."""
    from qloader.quant.registry import packages as method_packages

    return tuple(dict.fromkeys((*CORE_PACKAGES, *method_packages())))


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages():
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_versions(method_versions: dict[str, str] | None = None) -> None:
    """The core libraries, and the quantization method's own (`QuantMethod.versions`), in their tested ranges."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    for name, wanted in {**extra_pins(None, PINNED_CORE), **(method_versions or {})}.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError as e:
            raise EnvironmentMismatchError(f"{name} is not installed (qloader needs {name}{wanted})") from e
        if Version(have) not in SpecifierSet(wanted, prereleases=True):
            raise EnvironmentMismatchError(f"{name} {have} is installed; qloader needs {name}{wanted}")


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[dict]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    return [
        {
            "index": i,
            "name": torch.cuda.get_device_name(i),
            "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
        }
        for i in range(torch.cuda.device_count())
    ]


def hardware() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_cores": cores,
        "ram_bytes": _meminfo("MemTotal"),
        "gpus": _gpus(),
    }


def check_memory(checkpoint: Checkpoint) -> dict:
    """The load reads one shard at a time, so at least the largest shard must fit in free memory."""
    available = _meminfo("MemAvailable")
    facts = {
        "available_bytes": available,
        "weights_bytes": checkpoint.weights_bytes,
        "largest_shard_bytes": checkpoint.largest_shard_bytes,
    }
    if available is not None and checkpoint.largest_shard_bytes > available:
        raise EnvironmentMismatchError(
            f"{checkpoint.path}: the largest shard needs {checkpoint.largest_shard_bytes} bytes, "
            f"but only {available} bytes of memory are available"
        )
    return facts


def check_host_capacity(parameters: int, disk: Path, what: str) -> None:
    """A model whose weights, at one bit each (less than any method stores), exceed this host's memory, GPU memory
    and free disk together can never load: refused from the parameter count alone, before anything is built."""
    import shutil

    from qloader.core.files import existing_ancestor

    ram = _meminfo("MemTotal") or 0
    gpu = sum(g["memory_bytes"] for g in _gpus())
    folder = existing_ancestor(disk)
    free = shutil.disk_usage(folder).free
    need = parameters // 8
    if need <= ram + gpu + free:
        return
    gpus = f", {_size(gpu)} of GPU memory" if gpu else ""
    raise EnvironmentMismatchError(
        f"{what} describes a model of about {parameters:,} parameters: at least {_size(need)} even at one bit per "
        f"parameter (less than any quantization stores), but this host has {_size(ram)} of memory{gpus} and "
        f"{_size(free)} free on disk at '{folder}'; load it on a larger host, or give device_map.offload_folder a "
        "disk with room"
    )


def _size(n: int) -> str:
    """GiB, or MiB / KiB for what is smaller."""
    unit, scale = next(
        (u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)) if n >= s or s == 1
    )
    return f"{n / scale:,.1f} {unit}"
