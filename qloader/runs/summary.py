"""The end-of-run summary: what got quantized, the footprint, and each stage's time and peak memory."""

from __future__ import annotations

from qloader.core.units import mib


def render(manifest: dict) -> str:
    """The summary printed after a run; a manifest with a field of the wrong shape is a ManifestError."""
    try:
        return _render(manifest)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        from qloader.core.errors import ManifestError

        raise ManifestError(f"the manifest cannot be summarized: {type(e).__name__}: {e}"[:300]) from e


def _cache_line(cache: dict) -> str:
    """`hit: <path> (1.2 MiB)`, `miss: stored in <path> (...)`, `not cached: <why>`."""
    if cache["status"] == "hit":
        return f"hit: loaded from {cache['path']} ({mib(cache['bytes'])}), nothing quantized"
    if cache["status"] == "miss":
        if cache.get("stored"):
            return f"miss: stored in {cache['path']} ({mib(cache['bytes'])}) for the next load"
        return f"miss: {cache.get('reason') or 'not stored'}"
    return f"not cached: {cache.get('reason')}"


def _render(manifest: dict) -> str:
    model, quant = manifest["model"], manifest["quantization"]
    kinds = ", ".join(f"{n} {cls}" for cls, n in model["quantized_module_classes"].items()) or "none"
    share = ""
    if model["quantized_modules"] and model["parameters"]:
        share = f"; {100 * model['quantized_parameters'] / model['parameters']:.1f} % of the parameters"
    plan = manifest["plan"]
    compression = f", {plan['compression']}x smaller than unquantized" if plan.get("compression") else ""
    lines = [
        f"qloader: loaded {model['class']} from {manifest['checkpoint']['path']}",
        f"  task           {_task(model)}",
        f"  quantization   {quant['description']}{' (pre-quantized)' if quant['pre_quantized'] else ''}",
        f"  quantized      {model['quantized_modules']} modules ({kinds}){share}",
        *_kept_lines(model, quant),
        f"  footprint      {mib(model['footprint_bytes'])} ({model['parameters']:,} parameters, {model['dtype']});"
        f" planned {mib(plan['footprint_bytes'])}{compression}{_on_disk(model)}",
        f"  device_map     {model['device_map']}",
        *_warning_lines(manifest.get("warnings") or []),
        "",
        f"  {'stage':<12}{'wall_s':>9}{'peak RSS':>14}{'peak anon':>14}",
    ]
    gaps = []
    for stage in manifest["stages"]:
        anon = mib(stage["anon_peak_bytes"])
        if stage.get("anon_peak_exact") is False:  # the sampler was starved: the true peak may be higher
            anon, gaps = f">= {anon}", [*gaps, f"{stage['name']} {stage.get('anon_max_gap_ms')} ms"]
        lines.append(f"  {stage['name']:<12}{stage['wall_s']:>9.3f}{mib(stage['rss_peak_bytes']):>14}{anon:>14}")
    total = sum(s["wall_s"] for s in manifest["stages"])
    lines.append(f"  {'total':<12}{total:>9.3f}")
    if gaps:
        lines.append(f"  >= peak anon: sampled with gaps up to {', '.join(gaps)} (a busy CPU); a peak may be missed")
    lines.append("")
    if probe := manifest.get("probe"):
        lines += [
            f"  probe          {_probe_line(probe)}",
            f"  sample         {probe['sample']['prompt']!r} -> {probe['sample']['output']!r}",
            *_speed_lines(probe.get("speed"), manifest["stages"]),
        ]
    if cache := manifest.get("cache"):
        lines.append(f"  cache          {_cache_line(cache)}")
    if manifest.get("saved"):
        lines.append(f"  saved          {manifest['saved']['path']}")
    lines.append(f"  manifest       {manifest['run_dir']}/manifest.json")
    return "\n".join(lines)


def _on_disk(model: dict) -> str:
    """'; 0.3 MiB of it offloaded to disk' when weights were offloaded (older manifests: no such field)."""
    disk = (model.get("footprint_devices") or {}).get("disk")
    return f"; {mib(disk)} of it offloaded to disk" if disk else ""


def _task(model: dict) -> str:
    """'seq2seq-lm (AutoModelForSeq2SeqLM; model.task=auto, config.json architectures)'."""
    task = model.get("task") or "-"
    how = f"model.task={model.get('requested_task')}"
    by = {"architectures": "config.json architectures", "fallback": "causal-LM fallback", "auto_map": "auto_map"}
    if model.get("chosen_by") in by:
        how += f", {by[model['chosen_by']]}"
    return f"{task} ({model['auto_class']}; {how})" if model.get("auto_class") else f"{task} ({how})"


def _warning_lines(warnings: list[str]) -> list[str]:
    """What the run should know that no error stopped (the manifest's `warnings`), one line each."""
    return [f"  {'warnings' if i == 0 else '':<15}{line}" for i, line in enumerate(warnings)]


def _kept_lines(model: dict, quant: dict) -> list[str]:
    """One line per group of modules left unquantized, with the reason."""
    if quant["method"] == "none":
        return ["  kept           everything (quant=none)"]
    groups = model.get("kept") or []
    if not groups:
        return ["  kept           none"]
    return [
        f"  {'kept' if i == 0 else '':<15}{g['modules']} ({g['module_class']}: {g['reason']})"
        for i, g in enumerate(groups)
    ]


def _probe_line(probe: dict) -> str:
    """What the probe measured, and against what; a pre-quantized checkpoint is compared with nothing."""
    parts = []
    if probe.get("perplexity") is not None:
        reference = probe.get("reference_perplexity")
        parts.append(f"perplexity {probe['perplexity']}" + (f" (unquantized {reference})" if reference else ""))
    if probe.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {probe['top1_agreement']}, mean KL {probe['mean_kl']}")
    if compared := probe.get("compared_with"):
        parts.append(f"against {compared}" if probe.get("top1_agreement") is not None else f"not compared: {compared}")
    return ", ".join(parts)


def _speed_lines(speed: dict | None, stages: list[dict]) -> list[str]:
    """Prefill and decode tokens/s, and the peak memory while generating beside the load stage's peak."""
    if not speed:  # a manifest written before the probe timed generation
        return []
    decode = (
        f"decode {speed['decode_tokens_per_s']} tok/s ({speed['new_tokens']} new tokens, greedy)"
        if speed.get("decode_tokens_per_s") is not None
        else f"decode {speed['decode']}"
    )
    prefill = f"prefill {speed['prefill_tokens_per_s']} tok/s ({speed['prompt_tokens']} prompt tokens)"
    lines = [f"  speed          {prefill}, {decode}, on {speed['device']} after a warm-up"]
    peak = mib(speed["peak_anon_bytes"]) if speed.get("peak_anon_bytes") is not None else "unmeasured"
    if speed.get("peak_anon_exact") is False:
        peak = f">= {peak}"
    load = next((s for s in stages if s["name"] == "load"), None)
    beside = f"; load stage peak anon {mib(load['anon_peak_bytes'])}" if load and load.get("anon_peak_bytes") else ""
    cuda = speed.get("cuda_peak_allocated_bytes")
    lines.append(f"  generating     peak anon {peak}{beside}" + (f"; CUDA peak allocated {mib(cuda)}" if cuda else ""))
    return lines
