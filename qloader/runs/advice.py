"""Advice for a plan that does not fit: the registered methods whose plan, from the same planner, does."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qloader.loading.context import LoadContext
from qloader.loading.stages import stages_for

_QUANT_OVERRIDE = re.compile(r"^[+~]*quant([.=]|$)")


@contextmanager
def _quietly() -> Iterator[None]:
    """The other plans' warnings (nothing quantized, forward limits) are not this run's."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _plan_with(overrides: list[str], option: str) -> Any:
    from qloader.config.compose import compose

    cfg = compose([*overrides, f"quant={option}", "mode=plan"])
    ctx = LoadContext(cfg=cfg, overrides=tuple(overrides))
    for _, stage in stages_for(cfg):
        ctx = stage(ctx)
    return ctx.plan


def methods_that_fit(overrides: list[str], current: str | None) -> list[dict]:
    """Each `quant` option (other than `auto`, the one planned, pre-quantized-only and calibrating methods) whose plan
    fits the same budgets: its footprint and bytes per device, smallest footprint last. An option this host cannot
    plan (a method that needs a package or a device it lacks) is left out."""
    from qloader.config.quant_options import quant_options

    kept = [o for o in overrides if not _QUANT_OVERRIDE.match(o)]
    found = []
    for option, method in quant_options().items():
        if option in ("auto", current) or (method is not None and (method.pre_quantized_only or method.calibrates)):
            continue
        try:
            with _quietly():
                plan = _plan_with(kept, option)
        except Exception:  # noqa: BLE001 (a method this host cannot plan: its package or device is missing)
            continue
        if plan.fits:
            devices = {d: e.total_bytes for d, e in plan.devices.items()}
            row = {"quant": option, "footprint_bytes": plan.footprint_bytes, "devices": devices}
            found.append({**row, "fewest_gpus": _fewest_gpus(kept, option, plan)})
    return sorted(found, key=lambda row: -row["footprint_bytes"])


def _fewest_gpus(overrides: list[str], option: str, plan: Any) -> int | None:
    """The fewest of the budgeted GPUs (the first k, in index order) whose plan still fits; None without GPUs."""
    gpus = sorted((d for d, src in plan.budget_sources.items() if d.isdigit() and src == "max_memory"), key=int)
    for k in range(1, len(gpus)):
        dropped = [f"device_map.max_memory.{gpu}=null" for gpu in gpus[k:]]
        try:
            with _quietly():
                if _plan_with([*overrides, *dropped], option).fits:
                    return k
        except Exception:  # noqa: BLE001 (as in methods_that_fit: a plan this host cannot make)
            continue
    return len(gpus) or None
