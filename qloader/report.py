"""Sweep summary: one row per job, built from the jobs' manifests alone.

`qloader-report SWEEP_DIR` rebuilds `summary.csv`, `summary.md` and `summary.png` at any time;
a sweep writes them when it ends.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from qloader.stages import STAGE_NAMES

MiB = 2**20
COLUMNS = [
    "job",
    "overrides",
    "status",
    "quantization",
    "footprint_mib",
    "compression",
    "load_s",
    "load_stage_s",
    "load_anon_growth_mib",
    *[f"{kind}_mib_{stage}" for stage in STAGE_NAMES for kind in ("peak_anon", "peak_rss")],
    "perplexity",
    "reference_perplexity",
    "top1_agreement",
    "mean_kl",
    "error",
]


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MiB, 2)


def _job_number(job_dir: Path) -> int | str:
    from omegaconf import OmegaConf

    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    return OmegaConf.load(hydra_yaml).hydra.job.num if hydra_yaml.is_file() else job_dir.name


def _row(job_dir: Path) -> dict:
    path = job_dir / "manifest.json"
    row: dict = dict.fromkeys(COLUMNS)
    row["job"] = _job_number(job_dir)
    if not path.is_file():
        return {**row, "status": "missing", "error": f"no manifest.json in {job_dir}"}
    m = json.loads(path.read_text())
    row.update(
        overrides=" ".join(m["overrides"]),
        status=m["status"],
        quantization=(m["quantization"] or {}).get("description"),
        footprint_mib=_mib((m["model"] or {}).get("footprint_bytes")),
        load_s=round(sum(s["wall_s"] for s in m["stages"]), 3),
        error=None if m["error"] is None else f"{m['error']['type']}: {m['error']['message']}",
    )
    probe = m.get("probe") or {}
    for key in ("perplexity", "reference_perplexity", "top1_agreement", "mean_kl"):
        row[key] = probe.get(key)
    for stage in m["stages"]:
        if stage["name"] == "load" and stage["anon_peak_bytes"] is not None:
            row["load_stage_s"] = stage["wall_s"]
            row["load_anon_growth_mib"] = _mib(stage["anon_peak_bytes"] - stage["anon_start_bytes"])
        if stage["name"] in STAGE_NAMES:
            row[f"peak_anon_mib_{stage['name']}"] = _mib(stage["anon_peak_bytes"])
            row[f"peak_rss_mib_{stage['name']}"] = _mib(stage["rss_peak_bytes"])
    row["_baseline_key"] = (
        (m["checkpoint"] or {}).get("path"),
        (m["model"] or {}).get("dtype"),
    )
    return row


def _add_compression(rows: list[dict]) -> None:
    """footprint of the unquantized (`none`) job with the same checkpoint and dtype / this footprint."""
    baseline = {
        r["_baseline_key"]: r["footprint_mib"] for r in rows if r["quantization"] == "none" and r["footprint_mib"]
    }
    for r in rows:
        base = baseline.get(r.pop("_baseline_key", None))
        r["compression"] = round(base / r["footprint_mib"], 2) if base and r["footprint_mib"] else None


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job folder (any folder holding `.hydra/` or a manifest), in job order."""
    job_dirs = {p.parent for p in sweep_dir.glob("*/manifest.json")} | {p.parent for p in sweep_dir.glob("*/.hydra")}
    rows = [_row(d) for d in job_dirs]
    _add_compression(rows)
    return sorted(rows, key=lambda r: (str(type(r["job"])), r["job"]))


def markdown(rows: list[dict]) -> str:
    """The short table: the columns a reader compares at a glance."""
    cols = [
        ("job", "job"),
        ("overrides", "overrides"),
        ("status", "status"),
        ("footprint_mib", "footprint MiB"),
        ("compression", "compression"),
        ("load_s", "total s"),
        ("load_stage_s", "load stage s"),
        ("load_anon_growth_mib", "load anon growth MiB"),
        ("peak_anon_mib_load", "load peak anon MiB"),
        ("perplexity", "ppl"),
        ("top1_agreement", "top-1 agree"),
        ("mean_kl", "mean KL"),
        ("error", "error"),
    ]

    def cell(key: str, value) -> str:
        if value is None:
            return ""
        text = f"{value}x" if key == "compression" else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(key, r[key]) for key, _ in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "succeeded"]
    labels = [f"#{r['job']} {r['overrides']}" for r in done]
    fig, (mem, time) = plt.subplots(1, 2, figsize=(12, 1.5 + 0.5 * max(len(done), 1)))
    y = range(len(done))
    mem.barh([i - 0.2 for i in y], [r["footprint_mib"] for r in done], height=0.4, label="footprint")
    growth = [r["load_anon_growth_mib"] or 0 for r in done]
    mem.barh([i + 0.2 for i in y], growth, height=0.4, label="anon growth in load stage")
    mem.set_yticks(list(y), labels, fontsize=8)
    mem.set_xlabel("MiB")
    mem.legend(fontsize=8)
    mem.invert_yaxis()
    time.barh([i - 0.2 for i in y], [r["load_s"] for r in done], height=0.4, color="tab:green", label="all stages")
    time.barh([i + 0.2 for i in y], [r["load_stage_s"] or 0 for r in done], height=0.4, color="tab:olive", label="load")
    time.set_yticks(list(y), [""] * len(done))
    time.set_xlabel("seconds")
    time.legend(fontsize=8)
    time.invert_yaxis()
    fig.suptitle("qloader sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(sweep_dir: Path) -> list[dict]:
    """summary.csv, summary.md and summary.png in `sweep_dir`; returns the rows."""
    rows = collect(sweep_dir)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(markdown(rows))
    plot(rows, sweep_dir / "summary.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qloader-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir, e.g. multirun/2026-11-24/10-00-00")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"sweep dir '{args.sweep_dir}' does not exist")
    rows = write_summary(args.sweep_dir)
    print(markdown(rows), end="")
    print(f"wrote {args.sweep_dir}/summary.csv, summary.md, summary.png ({len(rows)} jobs)")
