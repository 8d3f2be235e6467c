"""qloader vs plain transformers: the same load, side by side, each in a fresh process.

    python benchmarks/load_vs_transformers.py                  # none, nf4 + double quant, int8; 5 rounds each
    python benchmarks/load_vs_transformers.py --modes nf4-dq --pairs 3

The model is `model=synthetic-1b` (about 1B parameters, bf16, 4 shards of at most 512 MiB),
generated once into the qloader cache. For every mode, runs alternate: qloader, transformers,
qloader with `validate.fingerprint=false` (to show what the fingerprint costs), then again. Each
run is a fresh Python process that imports the same libraries, then loads once. All sides are
measured by the same instrument: wall time of the load call, and peak RSS and peak anonymous
RSS sampled every 2 ms by a helper process (`qloader.measure.PeakSampler`). One unmeasured run
per side first warms the page cache and qloader's hash cache.
Results: benchmarks/results/load_vs_transformers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = ["model=synthetic-1b"]
# mode -> (qloader overrides, BitsAndBytesConfig kwargs for transformers)
MODES = {
    "none": (["quant=none"], None),
    "nf4-dq": (["quant=bnb-nf4", "quant.bnb_4bit_use_double_quant=true"], "nf4-dq"),
    "int8": (["quant=bnb-int8"], "int8"),
}
# Each side: None for plain transformers, else qloader's extra overrides.
SIDES = {
    "qloader": [],
    "transformers": None,
    "qloader-nofp": ["validate.fingerprint=false"],  # what the fingerprint itself costs
    "qloader-fused": ["quant.kernel=fused"],  # 4-bit modes only: the fused CPU quantization kernel
}


def sides_for(mode: str) -> list[str]:
    return [side for side in SIDES if side != "qloader-fused" or mode in ("nf4-dq",)]


def bnb_config(name: str | None):
    import torch
    from transformers import BitsAndBytesConfig

    if name is None:
        return None
    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


# ---------------------------------------------------------------- one load, in its own process


def child(loader: str, mode: str, checkpoint: str, run_dir: str) -> dict:
    """Import, then load once between two samplers of its own; print what was measured as one JSON line.

    Both sides import the same libraries first (torch, transformers' modeling code, bitsandbytes), so
    the timed region is the load itself; the import cost and footprint are reported as the baseline.
    """
    start = time.perf_counter()
    import bitsandbytes  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, modeling_utils  # noqa: F401

    from qloader.measure import PeakSampler, _read_status

    if loader.startswith("qloader"):
        import qloader
        from qloader import hf_loading, pipeline  # noqa: F401  (what `qloader.load` imports on first use)

        overrides = ["model=local", f"model.path={checkpoint}", "summary=false", *MODES[mode][0]]
        overrides += SIDES[loader]
        load = lambda: qloader.load(overrides, run_dir=run_dir)  # noqa: E731
    else:
        extra = {"quantization_config": bnb_config(MODES[mode][1])} if MODES[mode][1] else {}
        load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
            checkpoint, device_map="auto", dtype=torch.bfloat16, **extra
        )
    import_s = time.perf_counter() - start
    baseline = _read_status("VmRSS", "RssAnon")
    rss, anon = PeakSampler("VmRSS"), PeakSampler("RssAnon")  # not the pipeline's: it resets its own per stage
    rss.peak(), anon.peak()
    start = time.perf_counter()
    result = load()
    wall_s = time.perf_counter() - start
    stats = {"wall_s": round(wall_s, 4), "rss_peak_bytes": rss.peak(), "anon_peak_bytes": anon.peak()}
    row = {
        "loader": loader,
        "mode": mode,
        **stats,
        "import_s": round(import_s, 4),
        "import_rss_bytes": baseline["VmRSS"],
        "import_anon_bytes": baseline["RssAnon"],
    }
    if loader.startswith("qloader"):
        manifest = result.manifest
        row["kernel"] = manifest["quantization"]["kernel"]
        load_stage = next(s for s in manifest["stages"] if s["name"] == "load")
        row.update(
            footprint_bytes=manifest["model"]["footprint_bytes"],
            largest_shard_bytes=manifest["environment"]["largest_shard_bytes"],
            load_stage_anon_peak_bytes=load_stage["anon_peak_bytes"],
            stages={s["name"]: s["wall_s"] for s in manifest["stages"]},
        )
    return row


# ---------------------------------------------------------------- the side-by-side runs


def run_child(loader: str, mode: str, checkpoint: Path, run_dir: Path, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", loader, mode, str(checkpoint), str(run_dir)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if out.returncode != 0:
        raise SystemExit(f"{loader} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def summarize(rows: list[dict], mode: str) -> dict:
    sides = sides_for(mode)
    by = {loader: [r for r in rows if r["loader"] == loader] for loader in sides}
    out: dict = {"mode": mode, "pairs": len(by["transformers"])}
    for key in ("wall_s", "rss_peak_bytes", "anon_peak_bytes", "import_s", "import_rss_bytes", "import_anon_bytes"):
        out[key] = {loader: statistics.median(r[key] for r in by[loader]) for loader in sides}
    for variant in [side for side in sides if side != "transformers"]:
        for key in ("wall_s", "rss_peak_bytes", "anon_peak_bytes"):
            ratios = [a[key] / b[key] for a, b in zip(by[variant], by["transformers"], strict=True)]
            out[f"{variant}/{key}_ratio"] = {
                "median": statistics.median(ratios),
                "per_pair": [round(r, 3) for r in ratios],
            }
    q = by["qloader"]
    budget = statistics.median(r["footprint_bytes"] + r["largest_shard_bytes"] for r in q)
    growth = statistics.median(r["load_stage_anon_peak_bytes"] - r["import_anon_bytes"] for r in q)
    out["load_stage"] = {"anon_growth_bytes": growth, "footprint_plus_largest_shard_bytes": budget}
    out["qloader_stages_s"] = {k: statistics.median(r["stages"][k] for r in q) for k in q[0]["stages"]}
    return out


def _ratio(summary: dict, side: str, key: str) -> str:
    """The median per-round ratio side / transformers."""
    return "1" if side == "transformers" else f"{summary[f'{side}/{key}_ratio']['median']:.3f}"


def markdown(summaries: list[dict], machine: dict) -> str:
    lines = [
        f"Machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {mib(machine['ram_bytes'])} RAM, "
        f"GPUs: {machine['gpus'] or 'none'}. Medians of {summaries[0]['pairs']} alternating pairs, fresh processes.",
        "",
        "| mode | side | load s | time ratio | peak RSS | RSS ratio | peak anon | anon ratio "
        "| load-stage anon growth / footprint + largest shard |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        w, r, a, ls = s["wall_s"], s["rss_peak_bytes"], s["anon_peak_bytes"], s["load_stage"]
        for side in sides_for(s["mode"]):
            budget = f"{mib(ls['anon_growth_bytes'])} / {mib(ls['footprint_plus_largest_shard_bytes'])}"
            lines.append(
                f"| {s['mode']} | {side} | {w[side]:.2f} | {_ratio(s, side, 'wall_s')} "
                f"| {mib(r[side])} | {_ratio(s, side, 'rss_peak_bytes')} "
                f"| {mib(a[side])} | {_ratio(s, side, 'anon_peak_bytes')} "
                f"| {budget if side == 'qloader' else ''} |"
            )
    lines += ["", "Import-only baseline (time, RSS / anon after the imports, before the load call):", ""]
    for s in summaries:
        t, i, a = s["import_s"], s["import_rss_bytes"], s["import_anon_bytes"]
        lines.append(
            f"- {s['mode']}: "
            + "; ".join(f"{side} {t[side]:.2f} s, {mib(i[side])} / {mib(a[side])}" for side in sides_for(s["mode"]))
        )
    for s in summaries:
        if "fused_first_call_s" in s:
            first = s["fused_first_call_s"]
            lines.append(
                f"\nquant.kernel=fused ({s['mode']}): the first call compiles, {first['cold_cache']:.1f} s with an "
                f"empty inductor cache; with the cache warm it takes {statistics.median(first['warm_cache']):.2f} s."
            )
    lines += ["", "qloader stage medians (s):", ""]
    for s in summaries:
        lines.append(f"- {s['mode']}: " + ", ".join(f"{k} {v:.3f}" for k, v in s["qloader_stages_s"].items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--child", nargs=4, metavar=("LOADER", "MODE", "CHECKPOINT", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    import tempfile

    from qloader.config import compose
    from qloader.environment import hardware, versions
    from qloader.sources import checkpoint_folder

    checkpoint = checkpoint_folder(compose(MODEL).model)  # generated on first use
    modes = args.modes.split(",")
    summaries, raw, cold_compile = [], [], {}
    with tempfile.TemporaryDirectory(prefix="qloader-bench-") as tmp:
        for mode in modes:
            for loader in sides_for(mode):  # warm-up: page cache, qloader's hash cache, the kernel's compile
                env = {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}  # cold: the compile is measured
                row = run_child(loader, mode, checkpoint, Path(tmp) / f"warm-{mode}-{loader}", env)
                if loader == "qloader-fused":
                    cold_compile[mode] = row["kernel"]["first_call_s"]
            rows = []
            for pair in range(args.pairs):
                for loader in sides_for(mode):
                    row = run_child(loader, mode, checkpoint, Path(tmp) / f"{mode}-{pair}-{loader}")
                    print(f"{mode} pair {pair} {loader}: {row['wall_s']:.2f} s, anon {mib(row['anon_peak_bytes'])}")
                    rows.append(row)
            raw += rows
            summaries.append(summarize(rows, mode))
            if mode in cold_compile:
                fused = [r["kernel"]["first_call_s"] for r in rows if r["loader"] == "qloader-fused"]
                summaries[-1]["fused_first_call_s"] = {"cold_cache": cold_compile[mode], "warm_cache": fused}
    machine = hardware()
    RESULTS.mkdir(exist_ok=True)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": str(checkpoint),
        "machine": machine,
        "versions": versions(),
        "summaries": summaries,
        "runs": raw,
    }
    (RESULTS / "load_vs_transformers.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(summaries, machine)
    (RESULTS / "load_vs_transformers.md").write_text("# qloader vs transformers\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
