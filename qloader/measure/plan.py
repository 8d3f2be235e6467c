"""What a load will cost, read off the quantized skeleton on the meta device (no tensor data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from qloader.measure.placement import device_of, execution_device
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
    """Bytes per device: max_memory where it sets one, else the memory available on the device now."""
    budget_sources: dict[str, str] = field(default_factory=dict)
    """Per budget: 'max_memory', or 'available' (measured; no max_memory was set for the device)."""
    unquantized_bytes: int | None = None
    """The same model unquantized, at the skeleton's dtype (tied weights once, buffers included)."""
    kept: list = field(default_factory=list)
    """inventory.KeptGroup: module groups owning weights that the method leaves unquantized, and why."""
    parameters: int | None = None
    """Logical parameter count (tied weights once)."""
    hypothetical_devices: list[str] = field(default_factory=list)
    """mode=plan: devices of the plan that this host does not have (GPUs named only by their max_memory budget)."""
    inference: dict | None = None
    """kv_cache.InferenceRoom as a dict: the KV cache at plan.batch_size x plan.seq_len per device, whether it fits
    beside the model, the longest context that does; None for a model without a KV cache qloader sizes."""
    advice: list[dict] | None = None
    """mode=plan, when it does not fit: the quant options whose plans fit the same budgets (quant, footprint_bytes,
    devices), from the same planner; None when not asked (it fits, or a load)."""
    refusals: list[str] = field(default_factory=list)
    """mode=plan: why a load of this plan would be refused before reading a weight (a load raises instead)."""

    def room(self) -> dict[str, int]:
        """Per budgeted device: its budget less the model's share there (negative when short)."""
        return {d: b - (self.devices[d].total_bytes if d in self.devices else 0) for d, b in self.budgets.items()}

    def with_inference(self, model: nn.Module, text_config: Any, dtype: Any, batch: int, seq_len: int | None) -> Plan:
        """The plan with the room for inference at batch x seq_len: the layers' KV caches where their layers run,
        and the prefill's activations on the execution device."""
        from qloader.measure.kv_cache import activations, inference_room, layer_caches

        caches = layer_caches(model, text_config, self.device_map, dtype)
        if caches is None:
            return self
        limit = getattr(text_config, "max_position_embeddings", None)
        acts = activations(text_config, self.device_map, dtype)
        room = inference_room(caches, self.room(), batch, seq_len, dtype, limit, acts).as_dict()
        if room["fits"] is not None:
            room["fits"] = room["fits"] and self.fits
        return replace(self, inference=room)

    def with_refusals(self, refusals: list[str], offload: bool) -> Plan:
        """The plan with what a load would refuse; without an offload folder, disk is a budget of 0 bytes."""
        budgets, sources = dict(self.budgets), dict(self.budget_sources)
        if not offload and "disk" in self.devices:
            budgets["disk"], sources["disk"] = 0, "no offload_folder"
        return replace(self, refusals=refusals, budgets=budgets, budget_sources=sources)

    @property
    def compression(self) -> float | None:
        """Unquantized footprint / planned footprint: what quantizing buys."""
        if not self.unquantized_bytes or not self.footprint_bytes:
            return None
        return round(self.unquantized_bytes / self.footprint_bytes, 2)

    @property
    def shortfall_bytes(self) -> dict[str, int]:
        return {
            d: e.total_bytes - self.budgets[d]
            for d, e in self.devices.items()
            if e.total_bytes > self.budgets.get(d, 1 << 62)
        }

    @property
    def fits(self) -> bool:
        """Every device's share within its budget, and nothing a load would refuse."""
        return not self.shortfall_bytes and not self.refusals

    def as_dict(self) -> dict:
        devices = {d: {**asdict(e), "total_bytes": e.total_bytes} for d, e in self.devices.items()}
        return {
            "device_map": self.device_map,
            "devices": devices,
            "footprint_bytes": self.footprint_bytes,
            "peak_load_bytes": self.peak_load_bytes,
            "budgets": self.budgets,
            "budget_sources": self.budget_sources,
            "fits": self.fits,
            "shortfall_bytes": self.shortfall_bytes,
            "parameters": self.parameters,
            "unquantized_bytes": self.unquantized_bytes,
            "compression": self.compression,
            "kept": [group.as_dict() for group in self.kept],
            "refusals": self.refusals,
            "hypothetical_devices": self.hypothetical_devices,
            "inference": self.inference,
            "advice": self.advice,
        }


def budget_setting(device: str) -> str:
    """The setting a user writes for a device's budget: `device_map.max_memory.cpu`, `device_map.max_memory.0`."""
    return f"device_map.max_memory.{device}"


def refusal(plan: Plan) -> str | None:
    """Why a load of this plan is refused before any weight is read (one line: the shortfall per budget set with
    max_memory, and the fix); None when every max_memory budget holds its device's share. Budgets measured from
    the memory available now are not refused on: that figure moves while the host runs."""
    short = {d: n for d, n in plan.shortfall_bytes.items() if plan.budget_sources.get(d) == "max_memory"}
    if not short:
        return None
    from qloader.core.units import mib

    where = "; ".join(
        f"{d} needs {mib(plan.devices[d].total_bytes)} and {budget_setting(d)} allows {mib(plan.budgets[d])} "
        f"(short by {n:,} B)"
        for d, n in short.items()
    )
    raise_to = ", ".join(f"{budget_setting(d)}={plan.devices[d].total_bytes}" for d in short)
    return (
        f"the plan does not fit device_map.max_memory: {where}; raise it ({raise_to} at least), choose a method "
        "that stores less, or run mode=plan to see where each module lands"
    )


def budgets_in_bytes(max_memory: dict | None) -> dict[str, int]:
    """max_memory ('2GiB', 500MB, bytes) as bytes per device."""
    from accelerate.utils import convert_file_size_to_int

    return {str(d): convert_file_size_to_int(size) for d, size in (max_memory or {}).items()}


def available_bytes(device: str) -> int | None:
    """Memory available on a device now: the host's available memory for 'cpu' (as accelerate measures it when
    no max_memory is given), free memory for a CUDA device; None for anything else ('disk')."""
    if device == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    index = device.removeprefix("cuda:")
    if index.isdigit():
        import torch

        if torch.cuda.is_available() and int(index) < torch.cuda.device_count():
            return int(torch.cuda.mem_get_info(int(index))[0])
    return None


def _budgets(max_memory: dict | None, devices) -> tuple[dict[str, int], dict[str, str]]:
    """max_memory where set; for the other devices the plan uses, what is available now."""
    budgets = budgets_in_bytes(max_memory)
    sources = dict.fromkeys(budgets, "max_memory")
    for device in devices:
        if device not in budgets and (have := available_bytes(device)) is not None:
            budgets[device], sources[device] = have, "available"
    return budgets, sources


def estimate(
    model: nn.Module,
    device_map: dict,
    largest_shard_bytes: int,
    max_memory: dict | None,
    method: QuantMethod | None = None,
    quantizer: Any = None,
    source: Any = None,
) -> Plan:
    """Bytes per device for the skeleton as it will be loaded; tied weights counted once.

    The method plug-in says what each parameter it quantizes will occupy (packed data + quant state);
    everything else is counted at its skeleton dtype. `source` (hf_loading.SourceFacts) gives the
    unquantized size, for the compression. A device without a max_memory budget is compared with the
    memory available on it now.
    """
    from qloader.measure.inventory import kept_groups

    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    devices: dict[str, DeviceEstimate] = {}
    quantized: set[str] = set()
    for module_name, module in model.named_modules():
        device = devices.setdefault(device_of(module_name, device_map), DeviceEstimate())
        for name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{name}".lstrip(".")
            if full_name in tied:
                continue
            planned = None if method is None else method.planned_bytes(quantizer, model, full_name, module, param)
            if planned is not None:
                quantized.add(module_name)
                device.quantized_bytes += planned.packed
                device.quant_state_bytes += planned.state
            else:
                device.unquantized_bytes += param.numel() * param.element_size()
        buffers = sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
        if buffers:  # a module on disk keeps its buffers on the device it runs on (accelerate offloads weights)
            placed = device_of(module_name, device_map)
            where = execution_device(device_map) if placed == "disk" else placed
            devices.setdefault(where, DeviceEstimate()).buffer_bytes += buffers
    placement = {module: str(device) for module, device in device_map.items()}
    devices = _in_placement_order(devices, set(placement.values()))
    footprint = sum(e.total_bytes for e in devices.values())
    budgets, sources = _budgets(max_memory, devices)
    kept = kept_groups(model, lambda name, module: name in quantized, method, quantizer, tied)
    return Plan(
        placement,
        devices,
        footprint,
        footprint + largest_shard_bytes,
        budgets,
        sources,
        None if source is None else source.bytes,
        kept,
        None if source is None else source.parameters,
    )


COMPUTED_FROM = {
    "checkpoint": "config.json and every shard's header",
    "headers": "config.json and the headers of the shards here (a partial download)",
    "config-only": "config.json alone (no weights here)",
}
"""How the plan's `computed_from` reads in `qloader mode=plan`."""


def _in_placement_order(devices: dict[str, DeviceEstimate], placed: set[str]) -> dict[str, DeviceEstimate]:
    """GPUs by index, then cpu, then disk, as accelerate fills them; a device that holds nothing and that the map
    does not name (the model's root module, on no device of its own) is left out."""
    kept = {d: e for d, e in devices.items() if d in placed or e.total_bytes}
    order = {"cpu": 1 << 20, "disk": 1 << 21}
    return dict(
        sorted(kept.items(), key=lambda item: int(item[0]) if item[0].isdigit() else order.get(item[0], 1 << 19))
    )


def render(plan: dict) -> str:
    """The plan as printed by `qloader mode=plan`, from the manifest's `plan` section."""
    from qloader.core.units import mib

    lines = [f"qloader plan: device_map {_short_map(plan['device_map'])}", ""]
    titles = [("device", 10), ("quantized", 14), ("quant state", 14), ("unquantized", 14), ("buffers", 12)]
    titles += [("total", 14), ("budget", 14)]
    lines.append("  " + "".join(f"{t:<{w}}" if t == "device" else f"{t:>{w}}" for t, w in titles))
    hypothetical = set(plan.get("hypothetical_devices") or [])
    for device, e in plan["devices"].items():
        budget = mib(plan["budgets"][device]) if device in plan["budgets"] else "-"
        name = (f"cuda:{device}" if device.isdigit() else device) + ("*" if device in hypothetical else "")
        lines.append(
            f"  {name:<10}{mib(e['quantized_bytes']):>14}{mib(e['quant_state_bytes']):>14}"
            f"{mib(e['unquantized_bytes']):>14}{mib(e['buffer_bytes']):>12}{mib(e['total_bytes']):>14}{budget:>14}"
        )
    if hypothetical:
        lines.append("  * not on this host: planned from its device_map.max_memory budget")
    for device in ("cpu", "disk"):
        if device in plan["devices"] and (
            spilled := [m or "(the whole model)" for m, d in plan["device_map"].items() if d == device]
        ):
            more = f" … {len(spilled) - 6} more" if len(spilled) > 6 else ""
            lines.append(f"  on {device}: {', '.join(spilled[:6])}{more} ({len(spilled)} module(s))")
    sources = plan.get("budget_sources") or {}
    notes = {"available": " (available memory; no max_memory set)", "no offload_folder": " (no offload_folder)"}
    short = ", ".join(f"{d} by {mib(n)}{notes.get(sources.get(d), '')}" for d, n in plan["shortfall_bytes"].items())
    label = "fits max_memory" if all(v != "available" for v in sources.values()) else "fits memory"
    lines += [""]
    if plan.get("class"):
        lines.append(f"  model                     {plan['class']} (task {plan.get('task') or '-'})")
    source = plan.get("computed_from")
    shard = "footprint + largest shard" if source != "config-only" else "footprint; no shard here to add"
    lines += [
        f"  computed from             {COMPUTED_FROM.get(source, source)}",
        f"  estimated footprint       {mib(plan['footprint_bytes'])}",
        f"  estimated peak (loading)  {mib(plan['peak_load_bytes'])}  ({shard})",
    ]
    if plan.get("compression"):
        lines.append(
            f"  compression               {plan['compression']}x  (unquantized {mib(plan['unquantized_bytes'])})"
        )
    for group in plan.get("kept") or []:
        lines.append(f"  kept unquantized          {describe_kept(group, plan.get('parameters'))}")
    measured = " (available memory; no max_memory set)" if "available" in sources.values() else ""
    verdict = "yes" + measured if plan["fits"] else "does not fit" + (": short on " + short if short else "")
    lines.append(f"  {label:<26}{verdict}")
    lines += [f"  a load is refused:        {line}" for line in plan.get("refusals") or []]
    if plan.get("advice") is not None:
        fit = ", ".join(
            f"quant={row['quant']} ({mib(row['footprint_bytes'])}"
            + (f", {row['fewest_gpus']} GPU(s)" if row.get("fewest_gpus") else "")
            + ")"
            for row in plan["advice"]
        )
        lines.append(f"  would fit instead         {fit or 'no registered method fits these budgets'}")
    if plan.get("inference"):
        from qloader.measure.kv_cache import describe

        lines.append(f"  inference                 {describe(plan['inference'])}")
    return "\n".join(lines)


def _short_map(device_map: dict) -> str:
    """The device map as printed: whole, when short; else how many modules land on each device."""
    text = str(device_map)
    if len(text) <= 100:
        return text
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[device] = counts.get(device, 0) + 1
    return ", ".join(f"{n} module(s) on {f'cuda:{d}' if d.isdigit() else d}" for d, n in counts.items())


def describe_kept(group: dict, total: int | None = None) -> str:
    """'32 experts blocks (MixtralExperts: fused 3-D expert weights are not Linear), 45,097,156,608 parameters
    (96.6 %)'."""
    what = f"{group['modules']} ({group['module_class']}: {group['reason']})"
    if not group["parameters"]:
        return f"{what}, its weight tied to another module's"
    share = f" ({100 * group['parameters'] / total:.1f} %)" if total else ""
    return f"{what}, {group['parameters']:,} parameters{share}"
