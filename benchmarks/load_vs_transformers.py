"""qloader vs plain transformers: the same load, side by side, each in a fresh process.

    python benchmarks/load_vs_transformers.py                  # none, nf4 + double quant, int8; 5 pairs each
    python benchmarks/load_vs_transformers.py --modes nf4-dq --pairs 3

The model is `model=synthetic-1b` (about 1B parameters, bf16, 4 shards of at most 512 MiB),
generated once into the qloader cache. For every mode, runs alternate qloader, transformers,
qloader, transformers, ...; each run is a fresh Python process that imports what its loader
needs, then loads once. Both sides are measured by the same instrument (`qloader.measure`):
wall time of the load call, peak RSS (VmHWM, reset after the imports) and peak anonymous RSS
(a sampling helper process). One unmeasured run per loader first warms the page cache and
qloader's hash cache. Results: benchmarks/results/load_vs_transformers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
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
LOADERS = ("qloader", "transformers")


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
    """Import, then load once under `measure_stage`; print what was measured as one JSON line."""
    import torch  # noqa: F401  (both loaders pay for it; part of the import baseline)
    import transformers  # noqa: F401

    from qloader.measure import _read_status, measure_stage

    if loader == "qloader":
        import qloader

        overrides = ["model=local", f"model.path={checkpoint}", "summary=false", *MODES[mode][0]]
        load = lambda: qloader.load(overrides, run_dir=run_dir)  # noqa: E731
    else:
        from transformers import AutoModelForCausalLM

        extra = {"quantization_config": bnb_config(MODES[mode][1])} if MODES[mode][1] else {}
        load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
            checkpoint, device_map="auto", dtype=torch.bfloat16, **extra
        )
    baseline = _read_status("VmRSS", "RssAnon")
    with measure_stage("load") as stats:
        result = load()
    row = {
        "loader": loader,
        "mode": mode,
        "wall_s": stats.wall_s,
        "rss_peak_bytes": stats.rss_peak_bytes,
        "anon_peak_bytes": stats.anon_peak_bytes,
        "import_rss_bytes": baseline["VmRSS"],
        "import_anon_bytes": baseline["RssAnon"],
    }
    if loader == "qloader":
        manifest = result.manifest
        load_stage = next(s for s in manifest["stages"] if s["name"] == "load")
        row.update(
            footprint_bytes=manifest["model"]["footprint_bytes"],
            largest_shard_bytes=manifest["environment"]["largest_shard_bytes"],
            load_stage_anon_peak_bytes=load_stage["anon_peak_bytes"],
            stages={s["name"]: s["wall_s"] for s in manifest["stages"]},
        )
    return row


# ---------------------------------------------------------------- the side-by-side runs


def run_child(loader: str, mode: str, checkpoint: Path, run_dir: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", loader, mode, str(checkpoint), str(run_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{loader} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def summarize(rows: list[dict], mode: str) -> dict:
    by = {loader: [r for r in rows if r["loader"] == loader] for loader in LOADERS}
    q, t = by["qloader"], by["transformers"]
    out: dict = {"mode": mode, "pairs": len(q)}
    for key in ("wall_s", "rss_peak_bytes", "anon_peak_bytes", "import_rss_bytes", "import_anon_bytes"):
        out[key] = {loader: statistics.median(r[key] for r in by[loader]) for loader in LOADERS}
    for key in ("wall_s", "rss_peak_bytes", "anon_peak_bytes"):
        ratios = [a[key] / b[key] for a, b in zip(q, t, strict=True)]
        out[f"{key}_ratio"] = {"median": statistics.median(ratios), "per_pair": [round(r, 3) for r in ratios]}
    budget = statistics.median(r["footprint_bytes"] + r["largest_shard_bytes"] for r in q)
    growth = statistics.median(r["load_stage_anon_peak_bytes"] - r["import_anon_bytes"] for r in q)
    out["load_stage"] = {"anon_growth_bytes": growth, "footprint_plus_largest_shard_bytes": budget}
    out["qloader_stages_s"] = {k: statistics.median(r["stages"][k] for r in q) for k in q[0]["stages"]}
    return out


def markdown(summaries: list[dict], machine: dict) -> str:
    lines = [
        f"Machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {mib(machine['ram_bytes'])} RAM, "
        f"GPUs: {machine['gpus'] or 'none'}. Medians of {summaries[0]['pairs']} alternating pairs, fresh processes.",
        "",
        "| mode | qloader s | transformers s | time ratio | peak RSS q / t | RSS ratio "
        "| peak anon q / t | anon ratio | load-stage anon growth / budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        w, r, a, ls = s["wall_s"], s["rss_peak_bytes"], s["anon_peak_bytes"], s["load_stage"]
        lines.append(
            f"| {s['mode']} | {w['qloader']:.2f} | {w['transformers']:.2f} | {s['wall_s_ratio']['median']:.3f} "
            f"| {mib(r['qloader'])} / {mib(r['transformers'])} | {s['rss_peak_bytes_ratio']['median']:.3f} "
            f"| {mib(a['qloader'])} / {mib(a['transformers'])} | {s['anon_peak_bytes_ratio']['median']:.3f} "
            f"| {mib(ls['anon_growth_bytes'])} / {mib(ls['footprint_plus_largest_shard_bytes'])} |"
        )
    lines += ["", "Import-only baseline (RSS / anon, before the load call):", ""]
    for s in summaries:
        i, a = s["import_rss_bytes"], s["import_anon_bytes"]
        lines.append(
            f"- {s['mode']}: qloader {mib(i['qloader'])} / {mib(a['qloader'])}, "
            f"transformers {mib(i['transformers'])} / {mib(a['transformers'])}"
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
    summaries, raw = [], []
    with tempfile.TemporaryDirectory(prefix="qloader-bench-") as tmp:
        for mode in modes:
            for loader in LOADERS:  # warm-up: page cache, qloader's hash cache
                run_child(loader, mode, checkpoint, Path(tmp) / f"warm-{mode}-{loader}")
            rows = []
            for pair in range(args.pairs):
                for loader in LOADERS:
                    row = run_child(loader, mode, checkpoint, Path(tmp) / f"{mode}-{pair}-{loader}")
                    print(f"{mode} pair {pair} {loader}: {row['wall_s']:.2f} s, anon {mib(row['anon_peak_bytes'])}")
                    rows.append(row)
            raw += rows
            summaries.append(summarize(rows, mode))
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
