"""Where a module of a device map runs: its own entry, or the device accelerate executes offloaded modules on."""

from __future__ import annotations


def device_of(name: str, device_map: dict) -> str:
    """The device of a module: the longest device_map prefix that owns it."""
    best = max((p for p in device_map if p == "" or name == p or name.startswith(p + ".")), key=len, default="")
    return str(device_map.get(best, "cpu"))


def execution_device(device_map: dict) -> str:
    """Where modules offloaded to disk run, as accelerate's `dispatch_model` picks it: the first device of the map
    that is neither 'cpu' nor 'disk', else 'cpu'."""
    return next((str(d) for d in device_map.values() if str(d) not in ("cpu", "disk")), "cpu")
