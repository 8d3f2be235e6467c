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


def flat_modules(modules: Any) -> dict[str, Any]:
    """`device_map.modules` with dotted names: `+device_map.modules.model.layers.0=cpu` nests the keys
    ({model: {layers: {0: cpu}}}); accelerate names the module `model.layers.0`."""
    plain = OmegaConf.to_container(modules) if isinstance(modules, DictConfig) else dict(modules or {})
    flat: dict[str, Any] = {}
    for key, value in plain.items():
        if isinstance(value, dict) and value:
            flat.update({f"{key}.{inner}" if key else str(inner): v for inner, v in flat_modules(value).items()})
        else:
            flat[str(key)] = value
    return flat


def check_device_fields(device_map: DictConfig) -> list[str]:
    """Every problem in the `device_map` group, each naming the field and the value."""
    problems = []
    strategy = device_map.strategy
    if strategy not in DEVICE_MAP_CHOICES and not re.match(r"^cuda:\d+$", strategy):
        choices = ", ".join((*DEVICE_MAP_STRATEGIES, "cpu", "cuda", "explicit", "cuda:N"))
        problems.append(f"device_map.strategy '{strategy}' is not one of {choices}")
    if strategy == "explicit" and not device_map.modules:
        problems.append("device_map.strategy 'explicit' needs device_map.modules (a module -> device mapping)")
    for module, device in flat_modules(device_map.modules).items():
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
        return {module: _device_key(device) for module, device in flat_modules(device_map.modules).items()}
    return strategy


def max_memory_request(device_map: DictConfig) -> dict[int | str, int | str] | None:
    """`max_memory` in accelerate's form, or None to let accelerate measure the devices."""
    budget = OmegaConf.to_container(device_map.max_memory) or {}
    return {_device_key(device): size for device, size in budget.items() if size is not None} or None


def _cuda_index(value: Any) -> int | None:
    key = 0 if value == "cuda" else _device_key(value)
    return key if isinstance(key, int) else None


def cuda_settings(device_map: DictConfig) -> dict[str, int]:
    """Each setting of the `device_map` group that names a CUDA device, as the user wrote it, and the device index:
    `{"device_map.max_memory.0=10GiB": 0}`."""
    found = {}
    if device_map.strategy == "explicit":
        for module, device in flat_modules(device_map.modules).items():
            if (index := _cuda_index(device)) is not None:
                found[f"device_map.modules '{module}': {device}"] = index
    elif (index := _cuda_index(device_map.strategy)) is not None:
        found[f"device_map '{device_map.strategy}'"] = index
    for key, size in (device_map.max_memory or {}).items():
        if size is not None and key != "cpu" and (index := _cuda_index(key)) is not None:
            found[f"device_map.max_memory.{key}={size}"] = index
    return found


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
    if any(isinstance(key, int) for key in max_memory_request(device_map) or {}):  # a GPU budget: GPUs hold weights
        return "cuda"
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


def check_module_names(request: dict, model: Any) -> None:
    """Every name in `device_map.modules` must be a module (or parameter) of the model: a misspelt one would place
    nothing, and what it meant to move would silently stay on the '' entry."""
    import difflib

    names = {name for name, _ in model.named_modules()}
    names |= {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    problems = []
    for module in (m for m in request if m not in names):
        near = difflib.get_close_matches(module, sorted(names), n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"its top-level modules: {_children(model)}"
        problems.append(f"'{module}' is not a module of {type(model).__name__}; {hint}")
    if problems:
        raise DeviceMapError(
            f"device_map.modules: {'; '.join(problems)} (names as the model's named_modules() gives them, e.g. "
            "model.layers.0; a name that matches nothing would place nothing)"
        )


def _children(model: Any) -> str:
    return ", ".join(name for name, _ in model.named_children())


def does_not_fit(
    need: int, request: str, max_memory: dict | None, unplaced: list[str], refusal: str | None = None
) -> str:
    """Why accelerate could not place `unplaced` (a model of `need` bytes): the budget, the shortfall, the fix.
    `refusal`: why the method cannot offload to disk either (then an offload folder is no way out)."""
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
        + (
            f"Raise max_memory ({refusal}; quant=none offloads, with device_map.offload_folder set)"
            if refusal
            else "Raise max_memory; qloader offloads to disk only when device_map.offload_folder is set"
        )
    )


def cannot_offload(refusal: str, request: str | dict, max_memory: dict | None, placed: list[str], need: int) -> str:
    """A method that cannot offload, asked to: the modules the map puts on disk and the ways out (one line)."""
    from qloader.checkpoint.integrity import listing
    from qloader.core.units import mib

    where = "the whole model" if placed == [""] else listing(placed)
    instead = "or load with quant=none, which offloads"
    if isinstance(request, dict):
        return f"{refusal}; device_map.modules places {where} on disk: map it to cpu (or a GPU) instead, {instead}"
    from qloader.measure.plan import budgets_in_bytes

    budget = "the memory available"
    if max_memory:
        budget = f"max_memory {max_memory} ({mib(sum(budgets_in_bytes(max_memory).values()))})"
    return (
        f"{refusal}; device_map '{request}' with {budget} places {where} on disk (the model needs about "
        f"{mib(need)}): raise device_map.max_memory so that it fits in memory, {instead}"
    )


def quantizer_request(request: str | dict) -> str | dict | None:
    """The map transformers' quantizer check sees in `validate`: one that places modules on disk is checked in
    `device_map` instead, after the method's own disk check, which names the method and the way out."""
    return None if isinstance(request, dict) and on_disk(request) else request


def expand_default(request: dict, model: Any) -> dict:
    """An explicit map's '' entry (the rest of the model) spelt out as the modules it covers: accelerate's
    `dispatch_model` puts a '' entry's device on every weight, offloaded ones included, so a map with '' beside
    other entries cannot dispatch; with the rest named, it does, as an inferred map does. A map on one device is
    not dispatched, and stays as it is."""
    if "" not in request or len({str(device) for device in request.values()}) == 1:
        return request
    named = [key for key in request if key]
    expanded = {key: device for key, device in request.items() if key}

    def covered(name: str) -> bool:
        return any(name == key or name.startswith(key + ".") for key in named)

    def spell_out(prefix: str, module: Any) -> None:
        owned = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        children = [*module.named_children()]
        for name in [n for n, _ in owned] + [n for n, _ in children]:
            full = f"{prefix}.{name}" if prefix else name
            if covered(full):
                continue
            child = dict(children).get(name)
            if child is not None and any(key.startswith(full + ".") for key in named):
                spell_out(full, child)
            else:
                expanded[full] = request[""]

    spell_out("", model)
    return expanded
