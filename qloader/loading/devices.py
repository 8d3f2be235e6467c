"""The `device_map` config group -> what transformers' `from_pretrained(device_map=..., max_memory=...)` takes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
PLACEMENTS = ("cpu", "cuda", "explicit")
_DEVICE = re.compile(r"^(cpu|disk|meta|mps|cuda(:\d+)?|\d+)$")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)?$", re.IGNORECASE)


def _is_device(value: Any) -> bool:
    return isinstance(value, int) or bool(_DEVICE.match(str(value)))


def check_device_fields(device_map: DictConfig) -> list[str]:
    """Every problem in the `device_map` group, each naming the field and the value."""
    problems = []
    strategy = device_map.strategy
    if strategy not in STRATEGIES + PLACEMENTS and not re.match(r"^cuda:\d+$", strategy):
        choices = ", ".join(STRATEGIES + PLACEMENTS + ("cuda:N",))
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
