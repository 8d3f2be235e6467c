"""What a load will cost, read off the quantized skeleton on the meta device (no tensor data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from qloader.quant.base import QuantMethod


@dataclass
class DeviceEstimate:
    quantized_bytes: int = 0
    """Packed quantized weights (4-bit, int8, fp8 data)."""
    quant_state_bytes: int = 0
    """Scales, zero points, code books, nested statistics: what the method keeps beside the packed data."""
    unquantized_bytes: int = 0
    buffer_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.quant_state_bytes + self.unquantized_bytes + self.buffer_bytes


@dataclass(frozen=True)
class Plan:
    device_map: dict[str, str]
    devices: dict[str, DeviceEstimate]
    footprint_bytes: int
    peak_load_bytes: int
    """Footprint plus the largest shard: the load holds one shard's tensors on top of the model."""
    budgets: dict[str, int]
    """max_memory in bytes, per device that has one."""

    @property
    def shortfall_bytes(self) -> dict[str, int]:
        return {
            d: e.total_bytes - self.budgets[d]
            for d, e in self.devices.items()
            if e.total_bytes > self.budgets.get(d, 1 << 62)
        }

    @property
    def fits(self) -> bool:
        return not self.shortfall_bytes

    def as_dict(self) -> dict:
        devices = {d: {**asdict(e), "total_bytes": e.total_bytes} for d, e in self.devices.items()}
        return {
            "device_map": self.device_map,
            "devices": devices,
            "footprint_bytes": self.footprint_bytes,
            "peak_load_bytes": self.peak_load_bytes,
            "budgets": self.budgets,
            "fits": self.fits,
            "shortfall_bytes": self.shortfall_bytes,
        }


def device_of(name: str, device_map: dict) -> str:
    """The device of a module: the longest device_map prefix that owns it."""
    best = max((p for p in device_map if p == "" or name == p or name.startswith(p + ".")), key=len, default="")
    return str(device_map.get(best, "cpu"))


def budgets_in_bytes(max_memory: dict | None) -> dict[str, int]:
    """max_memory ('2GiB', 500MB, bytes) as bytes per device."""
    from accelerate.utils import convert_file_size_to_int

    return {str(d): convert_file_size_to_int(size) for d, size in (max_memory or {}).items()}


def estimate(
    model: nn.Module,
    device_map: dict,
    largest_shard_bytes: int,
    max_memory: dict | None,
    method: QuantMethod | None = None,
    quantizer: Any = None,
) -> Plan:
    """Bytes per device for the skeleton as it will be loaded; tied weights counted once.

    The method plug-in says what each parameter it quantizes will occupy (packed data + quant state);
    everything else is counted at its skeleton dtype.
    """
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    devices: dict[str, DeviceEstimate] = {}
    for module_name, module in model.named_modules():
        device = devices.setdefault(device_of(module_name, device_map), DeviceEstimate())
        for name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{name}".lstrip(".")
            if full_name in tied:
                continue
            planned = None if method is None else method.planned_bytes(quantizer, model, full_name, module, param)
            if planned is not None:
                device.quantized_bytes += planned.packed
                device.quant_state_bytes += planned.state
            else:
                device.unquantized_bytes += param.numel() * param.element_size()
        device.buffer_bytes += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    footprint = sum(e.total_bytes for e in devices.values())
    placement = {module: str(device) for module, device in device_map.items()}
    return Plan(placement, devices, footprint, footprint + largest_shard_bytes, budgets_in_bytes(max_memory))


def render(plan: dict) -> str:
    """The plan as printed by `qloader mode=plan`, from the manifest's `plan` section."""
    from qloader.summary import mib

    lines = [f"qloader plan: device_map {plan['device_map']}", ""]
    titles = [("device", 8), ("quantized", 14), ("quant state", 14), ("unquantized", 14), ("buffers", 12)]
    titles += [("total", 14), ("budget", 14)]
    lines.append("  " + "".join(f"{t:<{w}}" if t == "device" else f"{t:>{w}}" for t, w in titles))
    for device, e in plan["devices"].items():
        budget = mib(plan["budgets"][device]) if device in plan["budgets"] else "-"
        lines.append(
            f"  {device:<8}{mib(e['quantized_bytes']):>14}{mib(e['quant_state_bytes']):>14}"
            f"{mib(e['unquantized_bytes']):>14}{mib(e['buffer_bytes']):>12}{mib(e['total_bytes']):>14}{budget:>14}"
        )
    short = ", ".join(f"{d} by {mib(n)}" for d, n in plan["shortfall_bytes"].items())
    lines += [
        "",
        f"  estimated footprint       {mib(plan['footprint_bytes'])}",
        f"  estimated peak (loading)  {mib(plan['peak_load_bytes'])}  (footprint + largest shard)",
        f"  fits max_memory           {'yes' if plan['fits'] else 'NO: short on ' + short}",
    ]
    return "\n".join(lines)
