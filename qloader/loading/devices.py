"""The `device_map` config group -> what transformers' `from_pretrained(device_map=..., max_memory=...)` takes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qloader.core.errors import DeviceMapError
from qloader.core.names import DEVICE_MAP_CHOICES, DEVICE_MAP_STRATEGIES

_DEVICE = re.compile(r"^(cpu|disk|meta|mps|cuda(:\d+)?|\d+)$")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)?$", re.IGNORECASE)


def _is_device(value: Any) -> bool:
    return isinstance(value, int) or bool(_DEVICE.match(str(value)))


def check_device_fields(device_map: DictConfig) -> list[str]:
    """Every problem in the `device_map` group, each naming the field and the value."""
    problems = []
    strategy = device_map.strategy
    if strategy not in DEVICE_MAP_CHOICES and not re.match(r"^cuda:\d+$", strategy):
        choices = ", ".join((*DEVICE_MAP_STRATEGIES, "cpu", "cuda", "explicit", "cuda:N"))
        problems.append(f"device_map.strategy '{strategy}' is not one of {choices}")
    if strategy == "explicit" and not device_map.modules:
        problems.append("device_map.strategy 'explicit' needs device_map.modules (a module -> device mapping)")
    for module, device in (device_map.modules or {}).items():
        if not _is_device(device):
            problems.append(f"device_map.modules '{module}': '{device}' is not a device (cpu, cuda:N, N, disk)")
    for device, size in (device_map.max_memory or {}).items():
        if size is None:
            continue
        if not _is_device(device):
            problems.append(f"device_map.max_memory key '{device}' is not a device (cpu, N, cuda:N)")
        if not (isinstance(size, int) or _SIZE.match(str(size))):
            problems.append(f"device_map.max_memory.{device} '{size}' is not a size (e.g. 2GiB, 500MB, 1073741824)")
    return problems


def _device_key(device: Any) -> int | str:
    """accelerate names GPUs by index: 'cuda:1' and '1' -> 1."""
    text = str(device)
    if text.isdigit():
        return int(text)
    return int(text.split(":")[1]) if text.startswith("cuda:") else text


def device_map_request(device_map: DictConfig) -> str | dict[str, Any]:
    """The value a user would pass as `from_pretrained(device_map=...)`."""
    strategy = device_map.strategy
    if strategy == "explicit":
        return {module: _device_key(device) for module, device in OmegaConf.to_container(device_map.modules).items()}
    return strategy


def max_memory_request(device_map: DictConfig) -> dict[int | str, int | str] | None:
    """`max_memory` in accelerate's form, or None to let accelerate measure the devices."""
    budget = OmegaConf.to_container(device_map.max_memory) or {}
    return {_device_key(device): size for device, size in budget.items() if size is not None} or None


def cuda_devices_asked(request: str | dict, max_memory: dict | None) -> set[int]:
    """The CUDA device indices that a request names explicitly ('auto' and friends name none)."""
    values = list(request.values()) if isinstance(request, dict) else [request]
    values += [key for key in (max_memory or {}) if key != "cpu"]
    asked = set()
    for value in values:
        key = 0 if value == "cuda" else _device_key(value)
        if isinstance(key, int):
            asked.add(key)
    return asked


def weights_device(device_map: DictConfig) -> str:
    """'cuda' when the device map puts weights on a GPU (a method may pick its config by it), else 'cpu'."""
    strategy = device_map.strategy
    if strategy == "cpu":
        return "cpu"
    if strategy.startswith("cuda") or (
        strategy == "explicit" and cuda_devices_asked(device_map_request(device_map), None)
    ):
        return "cuda"
    if strategy == "explicit":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def offload_folder(device_map: DictConfig, checkpoint: Path) -> Path | None:
    """`device_map.offload_folder`, resolved; never inside the checkpoint, which qloader does not write to."""
    if not device_map.offload_folder:
        return None
    folder = Path(device_map.offload_folder).expanduser().resolve()
    if folder == checkpoint or checkpoint in folder.parents:
        from qloader.core.errors import DeviceMapError

        raise DeviceMapError(
            f"device_map.offload_folder '{device_map.offload_folder}' is inside the checkpoint '{checkpoint}'; "
            "qloader never writes there, choose another folder"
        )
    return folder


def on_disk(device_map: dict) -> list[str]:
    """The modules a device map places on disk."""
    return sorted(module for module, device in device_map.items() if device == "disk")


def check_disk(device_map: dict, offload_folder: Path | None, what: str) -> None:
    """Modules on disk need `device_map.offload_folder`: qloader never offloads unasked."""
    from qloader.checkpoint.integrity import listing

    if (placed := on_disk(device_map)) and offload_folder is None:
        raise DeviceMapError(f"{what} places {listing(placed)} on disk; set device_map.offload_folder to allow it")


def does_not_fit(need: int, request: str, max_memory: dict | None, unplaced: list[str]) -> str:
    """Why accelerate could not place `unplaced` (a model of `need` bytes): the budget, the shortfall, the fix."""
    from qloader.core.units import mib
    from qloader.loading import hf_loading
    from qloader.measure.plan import budgets_in_bytes

    if max_memory:
        have = sum(budgets_in_bytes(max_memory).values())
        budget = f"with max_memory {max_memory}: the model does not fit; it needs about {mib(need)} and the budget"
    else:  # accelerate measured the devices: say what it found, not 'a budget of 0'
        found = hf_loading.available_memory()
        have = sum(found.values())
        where = ", ".join(f"{device} {mib(size)}" for device, size in found.items())
        budget = (
            f"with no max_memory set: the model does not fit the memory available ({where}); it needs about "
            f"{mib(need)} and the available memory"
        )
    return (
        f"device_map '{request}' {budget} allows {mib(have)} (short by {mib(max(need - have, 0))}). "
        f"{len(unplaced)} module(s) could not be placed: {', '.join(m or '(the whole model)' for m in unplaced[:8])}. "
        "Raise max_memory; qloader offloads to disk only when device_map.offload_folder is set"
    )
