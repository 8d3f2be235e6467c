"""qloader vs plain transformers: the same load, side by side, each in a fresh process.

    python benchmarks/load_vs_transformers.py            # every mode: 3 rounds each, 2 for torchao and quanto
    python benchmarks/load_vs_transformers.py --modes nf4-dq --pairs 3
    python benchmarks/load_vs_transformers.py --modes torchao-int8wo,quanto-int8 --method-pairs 1
    # a quick check that the script works (tiny models; the figures mean nothing):
    python benchmarks/load_vs_transformers.py --modes none,smollm2-nf4 --pairs 1 --model model=tiny-llama \
        --method-model model=tiny-llama --out /tmp/bench

The bitsandbytes modes and `none` load `model=synthetic-1b` (about 1B parameters, bf16, 4 shards of
at most 512 MiB), generated once into the qloader cache. The torchao and optimum-quanto methods load
SmolLM2-135M (`model=smollm2-135m`), which keeps their many runs short on two cores. Mode
`smollm2-nf4` loads SmolLM2-135M in nf4, qloader's default run, to check that `quant.kernel=auto`
never makes it slower than bitsandbytes' kernel. For every mode, runs
alternate between the sides (qloader with its defaults, plain `from_pretrained` with the same
quantization config, and a variant of qloader), then again. Each run is a fresh Python process
that imports torch, transformers and bitsandbytes, then loads once.

Every run is measured twice over:
- in the process: the wall time of the load call, and peak RSS and peak anonymous RSS sampled every
  2 ms by a helper process (`qloader.measure.memory.PeakSampler`); the load is split into reading the
  tensors from the shards, the quantization kernel, the rest of quantizing (double quantization,
  packing, dtype conversion), and the rest;
- as a whole process: wall time from spawn to exit, CPU seconds and peak RSS (`os.wait4`).
`os.getloadavg()` is recorded before every run. Before every pair the script waits until the 1-minute load
average is at most `--max-load` (default: half the cores, 1.0 on a 2-core machine), for at most `--max-wait`
seconds, and then refuses to go on, saying so: on a busy machine bitsandbytes' and torch's threaded kernels slow
down far more than qloader's own code, so ratios measured there are not results. The report records the load
average before each pair and marks a run whose threshold was raised above half the cores.

Sides: `qloader` (its defaults: a first load, which quantizes and stores the model in its quantized cache, a
cache emptied before each such run), `transformers`, variants of qloader with the quantized cache off, and, for
the modes whose method can save, `qloader-cached`: qloader loading the entry its `qloader` run of the same pair
stored (a cache hit, checked in the manifest), against transformers quantizing on load. Every child uses a
qloader cache of the benchmark's own (its quantized cache is emptied), never the user's.
One unmeasured run per side first warms the page cache, qloader's hash caches and the compiled
kernels (with `quant.kernel=fused`, so the kernel cache holds what `auto` looks for); a run with an
empty qloader cache measures the kernel's compile.
Results: benchmarks/results/load_vs_transformers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from qloader.config.quant_options import quant_options

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL, METHOD_MODEL = ["model=synthetic-1b"], ["model=smollm2-135m"]
# mode -> qloader's quant overrides; transformers gets the config `quantization_config(mode)` writes out
MODES = {
    "none": ["quant=none"],
    "nf4-dq": ["quant=bnb-nf4", "quant.bnb_4bit_use_double_quant=true"],
    "int8": ["quant=bnb-int8"],
}
# Every conf/quant option of torchao and optimum-quanto, as qloader's method registry maps them.
METHODS = tuple(
    option
    for family in ("torchao", "quanto")
    for option, method in quant_options().items()
    if method is not None and method.quant_method == family
)
MODES.update({method: [f"quant={method}"] for method in METHODS})
# SmolLM2-135M in nf4, qloader's default run: `auto` must never make it slower than bitsandbytes' kernel
MODES["smollm2-nf4"] = MODES["nf4-dq"]
SMALL_MODEL_MODES = (*METHODS, "smollm2-nf4")
ORDER = ("nf4-dq", "int8", "none", "smollm2-nf4", *METHODS)
# Each side: None for plain transformers, else qloader's extra overrides.
SIDES = {
    "qloader": [],  # a first load: the quantized cache is emptied first, so it quantizes and stores
    "transformers": None,
    "qloader-nofp": ["validate.fingerprint=false", "cache.quantized=false"],  # what the fingerprint itself costs
    "qloader-bnb": ["quant.kernel=bnb", "cache.quantized=false"],  # bitsandbytes' own kernels, as before `auto`
    "qloader-cached": [],  # a cache hit: the entry the pair's `qloader` run stored
}
WARM = ["quant.kernel=fused"]  # the warm-up builds the compiled kernels' cache


def sides_for(mode: str) -> list[str]:
    if mode == "none":
        return ["qloader", "transformers", "qloader-nofp"]
    cached = ["qloader-cached"] if cacheable(mode) else []
    if mode in ("nf4-dq", "int8", "smollm2-nf4"):
        return ["qloader", "transformers", "qloader-bnb", *cached]
    return ["qloader", "transformers", *cached]


def cacheable(mode: str) -> bool:
    """Whether qloader keeps this mode's quantized model in its cache: the method's plug-in can save it."""
    from qloader.config.compose import compose

    quant = compose(MODES[mode]).quant
    method = quant_options().get(MODES[mode][0].removeprefix("quant="))
    return method is not None and method.check_save(quant) is None


def quantization_config(mode: str):
    """The transformers config of a mode, written out here with transformers' own classes."""
    import torch
    from transformers import BitsAndBytesConfig, QuantoConfig, TorchAoConfig

    if mode == "none":
        return None
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode in ("nf4-dq", "smollm2-nf4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if mode.startswith("quanto-"):
        return QuantoConfig(weights={"quanto-int8": "int8", "quanto-int4": "int4", "quanto-fp8": "float8"}[mode])
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    return TorchAoConfig(
        {
            "torchao-int8wo": Int8WeightOnlyConfig,
            "torchao-int8dq": Int8DynamicActivationInt8WeightConfig,
            "torchao-fp8wo": Float8WeightOnlyConfig,
            "torchao-int4": lambda: PrototypeInt4WeightOnlyConfig(group_size=64),  # CPU int4, as qloader picks
        }[mode]()
    )


# ---------------------------------------------------------------- one load, in its own process


class LoadSplit:
    """Times the parts of a load on either side: tensor reads, quantization (op and all), by wrapping them."""

    def __init__(self) -> None:
        self.seconds = {"read": 0.0, "quantize": 0.0}

    def _timed(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        setattr(owner, name, timed)

    def install(self) -> LoadSplit:
        import bitsandbytes as bnb
        from transformers import core_model_loading

        self._timed(core_model_loading, "_materialize_copy", "read")  # the tensor's bytes out of the shard
        self._timed(bnb.nn.Params4bit, "_quantize", "quantize")
        self._timed(bnb.nn.Int8Params, "_quantize", "quantize")
        return self


def child(loader: str, mode: str, checkpoint: str, run_dir: str) -> dict:
    """Import, then load once between two samplers of its own; print what was measured as one JSON line.

    Both sides import the same libraries first (torch, transformers' modeling code, bitsandbytes), so
    the timed region is the load itself; the import cost and footprint are reported as the baseline.
    """
    start = time.perf_counter()
    import bitsandbytes  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, modeling_utils  # noqa: F401

    from qloader.measure.memory import PeakSampler, _read_status
    from qloader.quant.bnb_kernel import quantization_kernels

    split = LoadSplit().install()
    kernel = None
    if loader.startswith("qloader"):
        import qloader

        overrides = ["model=local", f"model.path={checkpoint}", "summary=false", *MODES[mode]]
        overrides += WARM if os.environ.get("QLOADER_BENCH_WARM") else SIDES[loader]
        load = lambda: qloader.load(overrides, run_dir=run_dir)  # noqa: E731
    else:
        config = quantization_config(mode)
        extra = {"quantization_config": config} if config is not None else {}
        bnb_mode = mode in ("nf4-dq", "int8", "smollm2-nf4")

        def load():
            nonlocal kernel  # bitsandbytes' own kernels, only timed (the op's seconds, as on qloader's side)
            with quantization_kernels("bnb") if bnb_mode else nullcontext() as kernel:
                return AutoModelForCausalLM.from_pretrained(
                    checkpoint, device_map="auto", dtype=torch.bfloat16, **extra
                )

    import_s = time.perf_counter() - start
    baseline = _read_status("VmRSS", "RssAnon")
    rss, anon = PeakSampler("VmRSS"), PeakSampler("RssAnon")  # not the pipeline's: it resets its own per stage
    rss.peak(), anon.peak()
    start = time.perf_counter()
    result = load()
    wall_s = time.perf_counter() - start
    row = {
        "loader": loader,
        "mode": mode,
        "wall_s": round(wall_s, 4),
        "rss_peak_bytes": rss.peak(),
        "anon_peak_bytes": anon.peak(),
        "import_s": round(import_s, 4),
        "import_rss_bytes": baseline["VmRSS"],
        "import_anon_bytes": baseline["RssAnon"],
        "split_s": {k: round(v, 4) for k, v in split.seconds.items()},
    }
    if loader.startswith("qloader"):
        manifest = result.manifest
        kernel = manifest["quantization"].get("kernel")
        load_stage = next(s for s in manifest["stages"] if s["name"] == "load")
        row.update(
            footprint_bytes=manifest["model"]["footprint_bytes"],
            largest_shard_bytes=manifest["environment"]["largest_shard_bytes"],
            load_stage_anon_peak_bytes=load_stage["anon_peak_bytes"],
            stages={s["name"]: s["wall_s"] for s in manifest["stages"]},
            cache=manifest.get("cache"),
        )
        status = (manifest.get("cache") or {}).get("status")
        if loader == "qloader-cached" and status != "hit":
            raise RuntimeError(f"qloader-cached: the load was no cache hit ({manifest.get('cache')})")
    elif kernel is not None:
        kernel = kernel.as_dict()
    row["kernel"] = kernel
    return row


# ---------------------------------------------------------------- the side-by-side runs


CHILD_ENV: dict[str, str] = {}
"""Set by `main`: the children's own QLOADER_CACHE (never the user's), with the quantized cache on."""


def run_child(loader: str, mode: str, checkpoint: Path, run_dir: Path, env: dict | None = None) -> dict:
    """One fresh process: its own JSON row, plus what the parent saw of it (wall, CPU seconds, peak RSS)."""
    env = {**CHILD_ENV, **(env or {})}
    if loader == "qloader" and "QLOADER_CACHE" in env:  # a first load: its quantized cache emptied, outside its time
        shutil.rmtree(Path(env["QLOADER_CACHE"]) / "quantized", ignore_errors=True)
    load_before = os.getloadavg()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", loader, mode, str(checkpoint), str(run_dir)],
            stdout=out,
            stderr=err,
            env={**os.environ, **env},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        process_s = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise ChildFailed(f"{loader} {mode} failed:\n{err.read()[-3000:]}")
        out.seek(0)
        row = json.loads(out.read().strip().splitlines()[-1])
    row["process"] = {
        "wall_s": round(process_s, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "rss_peak_bytes": usage.ru_maxrss * 1024,
        "loadavg_before": [round(x, 2) for x in load_before],
    }
    return row


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _median(rows: list[dict], *path: str) -> float:
    def get(row):
        for key in path:
            row = row[key]
        return row

    return statistics.median(get(r) for r in rows)


def summarize(rows: list[dict], mode: str) -> dict:
    sides = sides_for(mode)
    by = {loader: [r for r in rows if r["loader"] == loader] for loader in sides}
    out: dict = {"mode": mode, "pairs": len(by["transformers"])}
    for key in ("wall_s", "rss_peak_bytes", "anon_peak_bytes", "import_s", "import_rss_bytes", "import_anon_bytes"):
        out[key] = {loader: _median(by[loader], key) for loader in sides}
    for key in ("wall_s", "cpu_s", "rss_peak_bytes"):
        out[f"process_{key}"] = {loader: _median(by[loader], "process", key) for loader in sides}
    out["split_s"] = {
        loader: {part: _median(by[loader], "split_s", part) for part in by[loader][0]["split_s"]} for loader in sides
    }
    out["kernel_s"] = {
        loader: _median(by[loader], "kernel", "kernel_s") for loader in sides if by[loader][0]["kernel"] is not None
    }
    for variant in [side for side in sides if side != "transformers"]:
        pairs = list(zip(by[variant], by["transformers"], strict=True))
        for key in ("wall_s", "rss_peak_bytes", "anon_peak_bytes"):
            out[f"{variant}/{key}_ratio"] = ratio_summary([a[key] / b[key] for a, b in pairs])
        for key in ("wall_s", "rss_peak_bytes"):
            ratios = [a["process"][key] / b["process"][key] for a, b in pairs]
            out[f"{variant}/process_{key}_ratio"] = ratio_summary(ratios)
    q = by["qloader"]
    out["kernel"] = {k: q[0]["kernel"].get(k) for k in ("kernel", "requested", "reason")} if q[0]["kernel"] else None
    budget = statistics.median(r["footprint_bytes"] + r["largest_shard_bytes"] for r in q)
    growth = statistics.median(r["load_stage_anon_peak_bytes"] - r["import_anon_bytes"] for r in q)
    out["footprint_bytes"] = q[0]["footprint_bytes"]
    out["load_stage"] = {"anon_growth_bytes": growth, "footprint_plus_largest_shard_bytes": budget}
    out["qloader_stages_s"] = {k: statistics.median(r["stages"][k] for r in q) for k in q[0]["stages"]}
    out["load_stage_s"] = {side: _median(by[side], "stages", "load") for side in sides if side != "transformers"}
    out["loadavg_before"] = [r["process"]["loadavg_before"][0] for r in rows]
    out["loadavg_before_pairs"] = sorted({r["pair"]: r["pair_loadavg"] for r in rows}.items())
    return out


def ratio_summary(ratios: list[float]) -> dict:
    """The per-pair ratios (side / transformers), their median, min and max."""
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "per_pair": [round(r, 3) for r in ratios],
    }


def _ratio(summary: dict, side: str, key: str) -> str:
    """The median per-round ratio side / transformers."""
    return "1" if side == "transformers" else f"{summary[f'{side}/{key}_ratio']['median']:.3f}"


def _speedup(summary: dict, side: str, key: str) -> str:
    return "" if side == "transformers" else f"{1 / summary[f'{side}/{key}_ratio']['median']:.2f}x"


def _spread(summary: dict, side: str, key: str) -> str:
    """`0.49 (0.47-0.52)`: the median per-pair ratio, with the smallest and largest."""
    if side == "transformers":
        return "1"
    r = summary[f"{side}/{key}_ratio"]
    return f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"


def markdown(report: dict) -> str:
    summaries, machine, models = report["summaries"], report["machine"], report["models"]
    if not summaries:
        return "No mode completed.\n" + "".join(f"- {f['mode']}: {f['error']}\n" for f in report["failures"])
    pairs = sorted({s["pairs"] for s in summaries})
    loads = [x for s in summaries for x in s["loadavg_before"]]
    pair_loads = [load for s in summaries for _, load in s["loadavg_before_pairs"]]
    gate = report["gate"]
    quiet = gate["max_load"] <= gate["default_max_load"]
    lines = [
        f"Load average gate: before every pair the 1-minute load average had to be at most {gate['max_load']:.2f} "
        f"(half the cores: {gate['default_max_load']:.2f}); before the pairs it was {min(pair_loads):.2f} to "
        f"{max(pair_loads):.2f}."
        + ("" if quiet else " **The threshold was raised: a busy machine, these figures are not results.**"),
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {mib(machine['ram_bytes'])} RAM, "
        f"GPUs: {machine['gpus'] or 'none'} (CUDA columns: not measured). Medians of "
        f"{'/'.join(map(str, pairs))} alternating rounds, fresh processes. 1-minute load average before the "
        f"runs: {min(loads):.2f} to {max(loads):.2f} (median {statistics.median(loads):.2f}) on "
        f"{machine['cpu_cores']} cores: {'shared, busy' if statistics.median(loads) > 1.5 else 'mostly idle'}.",
        f"Models: bitsandbytes modes and none: {models['main']}; torchao and quanto: {models['methods']}.",
        "",
        "Load call (in the process) and whole process (spawn to exit). Ratio = qloader / transformers, the median "
        "of the per-round ratios; speed-up = 1 / ratio.",
        "",
        "| mode | side | load s | load speed-up | process s | process speed-up | process ratio (min-max) "
        "| process CPU s | process peak RSS | RSS ratio (process) | peak anon (load) | anon ratio | footprint |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        w, a, p = s["wall_s"], s["anon_peak_bytes"], s
        for side in sides_for(s["mode"]):
            lines.append(
                f"| {s['mode']} | {side} | {w[side]:.2f} | {_speedup(s, side, 'wall_s')} "
                f"| {p['process_wall_s'][side]:.2f} | {_speedup(s, side, 'process_wall_s')} "
                f"| {_spread(s, side, 'process_wall_s')} | {p['process_cpu_s'][side]:.1f} "
                f"| {mib(p['process_rss_peak_bytes'][side])} "
                f"| {_ratio(s, side, 'process_rss_peak_bytes')} | {mib(a[side])} "
                f"| {_ratio(s, side, 'anon_peak_bytes')} "
                f"| {mib(s['footprint_bytes']) if side == 'qloader' else ''} |"
            )
    lines += [
        "",
        "Where the load's time goes (medians, s): read = tensors out of the shards; kernel = the quantization op "
        "(bitsandbytes' `quantize_4bit` / `int8_vectorwise_quant`, fused or not); dq/packing = the rest of "
        "quantizing each weight (dtype conversion, double quantization, `QuantState`); rest = the load call "
        "(qloader: its load stage) less those.",
        "",
        "| mode | side | load | read | kernel | dq/packing | rest |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        if s["mode"] in METHODS:
            continue
        for side in sides_for(s["mode"]):
            total = s["load_stage_s"].get(side, s["wall_s"][side])
            read, quantize = s["split_s"][side]["read"], s["split_s"][side]["quantize"]
            kernel = s["kernel_s"].get(side, 0.0)
            lines.append(
                f"| {s['mode']} | {side}{' (load stage)' if side != 'transformers' else ''} | {total:.2f} | {read:.2f} "
                f"| {kernel:.2f} | {max(quantize - kernel, 0):.2f} | {max(total - read - quantize, 0):.2f} |"
            )
    lines += ["", "qloader's kernel choice (`quant.kernel=auto`, the default):", ""]
    for s in summaries:
        if s.get("kernel"):
            lines.append(f"- {s['mode']}: {s['kernel']['kernel']}: {s['kernel']['reason']}")
    for s in summaries:
        if "compile" in s:
            c = s["compile"]
            lines.append(
                f"- {s['mode']}, the fused kernel's first call: {c['cold_cache_s']:.1f} s with an empty cache "
                f"(the compile), {c['warm_cache_s']:.2f} s with the cache warm (median of the measured runs)."
            )
    lines += ["", "Import-only baseline (time, RSS / anon after the imports, before the load call):", ""]
    for s in summaries:
        t, i, a = s["import_s"], s["import_rss_bytes"], s["import_anon_bytes"]
        lines.append(
            f"- {s['mode']}: "
            + "; ".join(f"{side} {t[side]:.2f} s, {mib(i[side])} / {mib(a[side])}" for side in sides_for(s["mode"]))
        )
    lines += ["", "qloader stage medians (s):", ""]
    for s in summaries:
        lines.append(f"- {s['mode']}: " + ", ".join(f"{k} {v:.3f}" for k, v in s["qloader_stages_s"].items()))
    if report["failures"]:
        lines += ["", "Modes that failed:", ""]
        lines += [f"- {f['mode']}: {f['error'].strip().splitlines()[-1]}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(ORDER), help="comma-separated: " + ", ".join(ORDER))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--method-pairs", type=int, default=2, help="rounds for the torchao and quanto methods")
    cores = os.cpu_count() or 1
    parser.add_argument(
        "--max-load",
        type=float,
        default=cores / 2,
        help=f"the most 1-minute load average a pair may start at (default half the cores: {cores / 2})",
    )
    parser.add_argument(
        "--max-wait", type=float, default=600, help="seconds to wait for the load average before refusing"
    )
    parser.add_argument("--model", default=MODEL[0], help=f"the bitsandbytes modes' and none's model ({MODEL[0]})")
    parser.add_argument(
        "--method-model", default=METHOD_MODEL[0], help=f"the torchao, quanto and smollm2-nf4 model ({METHOD_MODEL[0]})"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where the results go (default {RESULTS})")
    parser.add_argument("--child", nargs=4, metavar=("LOADER", "MODE", "CHECKPOINT", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    from qloader.checkpoint.sources import checkpoint_folder
    from qloader.config.compose import compose
    from qloader.measure.environment import hardware, versions

    modes = args.modes.split(",")
    gate = {"max_load": args.max_load, "default_max_load": (os.cpu_count() or 1) / 2, "max_wait_s": args.max_wait}
    checkpoints = {}
    if any(mode not in SMALL_MODEL_MODES for mode in modes):
        checkpoints["main"] = checkpoint_folder(compose([args.model]).model)  # generated on first use
    if any(mode in SMALL_MODEL_MODES for mode in modes):
        checkpoints["methods"] = checkpoint_folder(compose([args.method_model]).model)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "models": {
            "main": "synthetic-1b (1.01B parameters, bf16, 4 shards)" if args.model == MODEL[0] else args.model,
            "methods": "SmolLM2-135M (bf16; mode smollm2-nf4 too)"
            if args.method_model == METHOD_MODEL[0]
            else args.method_model,
        },
        "machine": hardware(),
        "gate": gate,
        "versions": versions(),
        "summaries": [],
        "failures": [],
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="qloader-bench-") as tmp:
        CHILD_ENV.update(QLOADER_CACHE=str(Path(tmp) / "cache"), QLOADER_CACHE_QUANTIZED="auto")
        for mode in modes:  # the results are written after every mode: a late failure keeps the rest
            checkpoint = checkpoints["methods" if mode in SMALL_MODEL_MODES else "main"]
            pairs = args.method_pairs if mode in METHODS else args.pairs
            try:
                summary, rows = bench_mode(mode, checkpoint, Path(tmp), pairs, gate)
            except MachineBusy as e:
                print(f"refused: {e}", flush=True)
                report["failures"].append({"mode": mode, "error": f"refused: {e}"})
                write_results(report, args.out)
                break
            except ChildFailed as e:
                print(e, flush=True)
                report["failures"].append({"mode": mode, "error": str(e)[-2000:]})
            else:
                report["summaries"].append(summary)
                report["runs"] += rows
            write_results(report, args.out)
    print(markdown(report))


class ChildFailed(Exception):
    pass


class MachineBusy(Exception):
    """The load average stayed above the threshold for the whole wait: no figure from this machine now."""


def wait_until_quiet(gate: dict) -> float:
    """The 1-minute load average once it is at most the gate's threshold; MachineBusy after `max_wait_s`."""
    start = time.monotonic()
    while (load := os.getloadavg()[0]) > gate["max_load"]:
        waited = time.monotonic() - start
        if waited >= gate["max_wait_s"]:
            raise MachineBusy(
                f"the 1-minute load average is {load:.2f}, above {gate['max_load']:.2f}, after waiting {waited:.0f} s; "
                "on a busy machine the ratios are not results (wait for a quiet machine, or raise --max-load / "
                "--max-wait to measure anyway, which the report then marks)"
            )
        print(f"load average {load:.2f} > {gate['max_load']:.2f}: waiting ({waited:.0f} s so far)", flush=True)
        time.sleep(min(10.0, max(gate["max_wait_s"] - waited, 0.1)))
    return load


def bench_mode(mode: str, checkpoint: Path, tmp: Path, pairs: int, gate: dict) -> tuple[dict, list[dict]]:
    """Warm-ups, then `pairs` rounds of every side of `mode`, alternating; the summary and the rows."""
    compile_s = None
    if mode in ("nf4-dq", "int8"):  # the compile, with an empty qloader cache
        env = {"QLOADER_CACHE": str(tmp / f"cold-{mode}"), "QLOADER_BENCH_WARM": "1"}
        row = run_child("qloader", mode, checkpoint, tmp / f"cold-{mode}-run", env)
        compile_s = row["kernel"]["first_call_s"]
    for loader in sides_for(mode):  # warm-up: page cache, qloader's hash caches, the kernel cache
        if mode in METHODS and loader != "qloader":
            continue  # a small model: one warm-up fills the page cache
        env = {"QLOADER_BENCH_WARM": "1"} if loader == "qloader" and mode in ("nf4-dq", "int8") else {}
        run_child(loader, mode, checkpoint, tmp / f"warm-{mode}-{loader}", env)
    rows = []
    for pair in range(pairs):
        pair_load = wait_until_quiet(gate)
        for loader in sides_for(mode):
            row = run_child(loader, mode, checkpoint, tmp / f"{mode}-{pair}-{loader}")
            row.update(pair=pair, pair_loadavg=round(pair_load, 2))
            print(
                f"{mode} pair {pair} {loader}: load {row['wall_s']:.2f} s, "
                f"process {row['process']['wall_s']:.2f} s, anon {mib(row['anon_peak_bytes'])}, "
                f"load avg {row['process']['loadavg_before'][0]}",
                flush=True,
            )
            rows.append(row)
    summary = summarize(rows, mode)
    if compile_s is not None:
        warm = [r["kernel"]["first_call_s"] for r in rows if r["loader"] == "qloader"]
        warm = [w for w in warm if w is not None]
        summary["compile"] = {
            "cold_cache_s": compile_s,
            "warm_cache_s": statistics.median(warm) if warm else float("nan"),
        }
    return summary, rows


def write_results(report: dict, out: Path = RESULTS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_vs_transformers.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "load_vs_transformers.md").write_text("# qloader vs transformers\n\n" + markdown(report))


if __name__ == "__main__":
    main()
