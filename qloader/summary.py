"""The end-of-run summary: what got quantized, the footprint, and each stage's time and peak memory."""

from __future__ import annotations


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def render(manifest: dict) -> str:
    model, quant = manifest["model"], manifest["quantization"]
    kinds = ", ".join(f"{n} {cls}" for cls, n in model["quantized_module_classes"].items()) or "none"
    lines = [
        f"qloader: loaded {model['class']} from {manifest['checkpoint']['path']}",
        f"  quantization   {quant['description']}{' (pre-quantized)' if quant['pre_quantized'] else ''}",
        f"  quantized      {model['quantized_modules']} modules ({kinds})",
        f"  kept           {', '.join(model['skipped_modules']) or 'none'}",
        f"  footprint      {mib(model['footprint_bytes'])} ({model['parameters']:,} parameters, {model['dtype']});"
        f" planned {mib(manifest['plan']['footprint_bytes'])}",
        f"  device_map     {model['device_map']}",
        "",
        f"  {'stage':<12}{'wall_s':>9}{'peak RSS':>14}{'peak anon':>14}",
    ]
    for stage in manifest["stages"]:
        lines.append(
            f"  {stage['name']:<12}{stage['wall_s']:>9.3f}"
            f"{mib(stage['rss_peak_bytes']):>14}{mib(stage['anon_peak_bytes']):>14}"
        )
    total = sum(s["wall_s"] for s in manifest["stages"])
    lines += [f"  {'total':<12}{total:>9.3f}", ""]
    if probe := manifest.get("probe"):
        lines += [
            f"  probe          perplexity {probe['perplexity']} (unquantized {probe['reference_perplexity']}),"
            f" top-1 agreement {probe['top1_agreement']}, mean KL {probe['mean_kl']}",
            f"  sample         {probe['sample']['prompt']!r} -> {probe['sample']['output']!r}",
        ]
    if manifest.get("saved"):
        lines.append(f"  saved          {manifest['saved']['path']}")
    lines.append(f"  manifest       {manifest['run_dir']}/manifest.json")
    return "\n".join(lines)
