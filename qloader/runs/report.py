"""Sweep summary: one row per job, built from the jobs' manifests alone.

`qloader-report SWEEP_DIR` rebuilds `summary.csv`, `summary.md` and `summary.png` at any time;
a sweep writes them when it ends.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from qloader.core.names import STAGE_NAMES
from qloader.runs.manifest import settle_if_orphaned

MiB = 2**20
COLUMNS = [
    "job",
    "overrides",
    "status",
    "model_class",
    "task",
    "quantization",
    "footprint_mib",
    "compression",
    "load_s",
    "load_stage_s",
    "load_anon_growth_mib",
    "load_anon_peak_exact",
    "postprocess_s",
    *[f"{kind}_mib_{stage}" for stage in STAGE_NAMES for kind in ("peak_anon", "peak_rss")],
    "perplexity",
    "reference_perplexity",
    "top1_agreement",
    "mean_kl",
    "prefill_tok_s",
    "decode_tok_s",
    "relative_decode_speed",
    "generate_peak_anon_mib",
    "error",
]


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MiB, 2)


def _job_number(job_dir: Path) -> int | str:
    from omegaconf import OmegaConf

    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    return OmegaConf.load(hydra_yaml).hydra.job.num if hydra_yaml.is_file() else job_dir.name


def _hydra_overrides(job_dir: Path) -> str | None:
    """The job's overrides as Hydra saved them, for a job that never wrote its manifest."""
    from omegaconf import OmegaConf

    saved = job_dir / ".hydra" / "overrides.yaml"
    return " ".join(OmegaConf.load(saved)) if saved.is_file() else None


def _row(job_dir: Path) -> dict:
    path = job_dir / "manifest.json"
    row: dict = dict.fromkeys(COLUMNS)
    row["job"] = _job_number(job_dir)
    if not path.is_file():
        return {
            **row,
            "overrides": _hydra_overrides(job_dir),
            "status": "missing",
            "error": f"no manifest.json in {job_dir}",
        }
    try:
        return _sanitized(_manifest_row(row, settle_if_orphaned(path)))  # a job whose process died: `killed`
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError) as e:
        why = f"{type(e).__name__}: {e}"[:200]
        return {
            **row,
            "overrides": _hydra_overrides(job_dir),
            "status": "unreadable",
            "error": f"ManifestError: {path} is not a qloader manifest ({why})",
        }


TEXT_COLUMNS = ("overrides", "status", "model_class", "task", "quantization", "error", "_model", "_error_type")


def _sanitized(row: dict) -> dict:
    """Figures that are numbers and labels that are text, whatever a hand-edited manifest holds."""
    for key, value in row.items():
        if key in TEXT_COLUMNS:
            row[key] = None if value is None else str(value)
        elif key not in ("job", "_baseline_key") and value is not None and not isinstance(value, bool):
            ok = isinstance(value, int | float) and math.isfinite(value) and abs(value) < 1e15
            row[key] = value if ok else None
    row["_baseline_key"] = json.dumps(row.get("_baseline_key"), default=str)
    return row


def _manifest_row(row: dict, m: dict) -> dict:
    if not isinstance(m["status"], str):  # a hand-edited record: the row says `unreadable`, never a blank status
        raise TypeError(f"its status is {m['status']!r}, not one of the schema's words")
    row.update(
        overrides=" ".join(m["overrides"]),
        status=m["status"],
        model_class=(m["model"] or m.get("plan") or {}).get("class"),
        task=(m["model"] or m.get("plan") or {}).get("task"),
        quantization=(m["quantization"] or {}).get("description"),
        footprint_mib=_mib((m["model"] or {}).get("footprint_bytes")),
        _footprint_bytes=(m["model"] or {}).get("footprint_bytes"),
        load_s=round(sum(s["wall_s"] for s in m["stages"]), 3),
        error=None if m["error"] is None else f"{m['error']['type']}: {m['error']['message']}",
    )
    probe = m.get("probe") or {}
    for key in ("perplexity", "reference_perplexity", "top1_agreement", "mean_kl"):
        row[key] = probe.get(key)
    speed = probe.get("speed") or {}  # the probe's timed generation; manifests before it have none
    row["prefill_tok_s"] = speed.get("prefill_tokens_per_s")
    row["decode_tok_s"] = speed.get("decode_tokens_per_s")
    row["generate_peak_anon_mib"] = _mib(speed.get("peak_anon_bytes"))
    row["_generate_peak_exact"] = speed.get("peak_anon_exact")
    for stage in m["stages"]:
        if stage["name"] == "load" and stage["anon_peak_bytes"] is not None:
            row["load_stage_s"] = stage["wall_s"]
            row["load_anon_growth_mib"] = _mib(stage["anon_peak_bytes"] - stage["anon_start_bytes"])
            row["load_anon_peak_exact"] = stage.get("anon_peak_exact")  # False: the sampler may have missed the peak
        if stage["name"] == "postprocess":  # where a calibrating method (GPTQ) spends its time
            row["postprocess_s"] = stage["wall_s"]
        if stage["name"] in STAGE_NAMES:
            row[f"peak_anon_mib_{stage['name']}"] = _mib(stage["anon_peak_bytes"])
            row[f"peak_rss_mib_{stage['name']}"] = _mib(stage["rss_peak_bytes"])
    row["_baseline_key"] = (
        (m["checkpoint"] or {}).get("path"),
        (m["model"] or {}).get("dtype"),
    )
    row["_model"] = _model_name(m)
    row["_planned_footprint_mib"] = _mib((m.get("plan") or {}).get("footprint_bytes"))
    row["_error_type"] = (m["error"] or {}).get("cause") or (m["error"] or {}).get("type")  # `killed: time limit`
    return row


def _model_name(m: dict) -> str | None:
    """The model's Hydra option (`smollm2-135m`), with its path or repo when it has one; else the checkpoint folder."""
    options = (m.get("config") or {}).get("model") or {}
    detail = options.get("repo_id") or (Path(options["path"]).name if options.get("path") else None)
    choice = (m.get("choices") or {}).get("model")
    if choice:
        return f"{choice} ({detail})" if detail and detail != choice else choice
    if (m.get("checkpoint") or {}).get("path"):
        return Path(m["checkpoint"]["path"]).name
    return detail or (options.get("_target_") or "").rsplit(".", 1)[-1] or None


def _add_relative_to_unquantized(rows: list[dict]) -> None:
    """Against the unquantized (`none`) job with the same checkpoint and dtype: `compression` is its footprint /
    this footprint, in bytes as the manifests record them (the MiB columns are rounded: 1.35x from them where the
    bytes give 1.33x); `relative_decode_speed` is this decode tokens/s / its decode tokens/s (above 1: faster)."""
    reference = {r["_baseline_key"]: r for r in rows if r["quantization"] == "none"}
    for r in rows:
        base = reference.get(r.pop("_baseline_key", None)) or {}
        footprint, own = base.get("_footprint_bytes"), r.get("_footprint_bytes")
        r["compression"] = round(footprint / own, 2) if footprint and own else None
        decode, own = base.get("decode_tok_s"), r.get("decode_tok_s")
        r["relative_decode_speed"] = round(own / decode, 2) if decode and own else None


def job_dirs(sweep_dir: Path) -> set[Path]:
    """The sweep's job folders: any folder in it holding `.hydra/` or a manifest."""
    return {p.parent for p in sweep_dir.glob("*/manifest.json")} | {p.parent for p in sweep_dir.glob("*/.hydra")}


def _refused_rows(sweep_dir: Path) -> dict[str, dict]:
    """Rows of jobs refused before they wrote a manifest of their own (their folder held another run's), by job
    folder name: the sweep's `.qloader/job-<num>.json` records (qloader.runs.sweep)."""
    rows = {}
    for path in sorted(sweep_dir.glob(".qloader/job-*.json")):
        try:
            record = json.loads(path.read_text())
            error = record["error"]
            row = {
                **dict.fromkeys(COLUMNS), "job": record["job"], "overrides": " ".join(record["overrides"]),
                "status": record["status"], "error": f"{error['type']}: {error['message']}",
                "_error_type": error["type"],
            }  # fmt: skip
            rows[str(record["job_dir"])] = _sanitized(row)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return rows


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job folder, in job order; a job refused because its folder held another run's manifest has
    its own row instead of that run's."""
    refused = _refused_rows(sweep_dir)
    rows = [refused.pop(d.name, None) or _row(d) for d in job_dirs(sweep_dir)] + list(refused.values())
    _add_relative_to_unquantized(rows)
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
        ("postprocess_s", "postprocess s"),
        ("peak_anon_mib_load", "load peak anon MiB"),
        ("perplexity", "ppl"),
        ("top1_agreement", "top-1 agree"),
        ("mean_kl", "mean KL"),
        ("prefill_tok_s", "prefill tok/s"),
        ("decode_tok_s", "decode tok/s"),
        ("relative_decode_speed", "decode vs none"),
        ("generate_peak_anon_mib", "generate peak anon MiB"),
        ("error", "error"),
    ]

    def cell(key: str, value, row: dict) -> str:
        if value is None:
            return ""
        text = f"{value}x" if key in ("compression", "relative_decode_speed") else str(value)
        if key in ("load_anon_growth_mib", "peak_anon_mib_load") and row.get("load_anon_peak_exact") is False:
            text = f"≥ {text}"  # the sampler was starved during the stage: the true peak may be higher
        if key == "generate_peak_anon_mib" and row.get("_generate_peak_exact") is False:
            text = f"≥ {text}"
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(key, r[key], r) for key, _ in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# Quality figures a sweep may carry, best first: (column, axis label, higher is better).
QUALITY = [
    ("top1_agreement", "top-1 agreement with the unquantized reference", "top-1 agreement", True),
    ("perplexity", "perplexity", "perplexity", False),
]
MAX_FAILED_SHOWN = 6  # crosses on the quality panel; the note under the plot lists every failed job
FALLBACK_Y = ("load_s", "load time, s", "load time", False)


def _shorten(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width // 2 - 1] + "…" + text[-(width // 2) :]


def _failure(row: dict) -> str:
    """`failed: CheckpointError`, `killed: KeyboardInterrupt`, `killed: time limit` (the cluster's cause), `missing`."""
    kind = row.get("_error_type")
    if not kind and row["status"] in ("failed", "killed") and row["error"]:
        kind = row["error"].partition(":")[0]
    return f"{row['status']}: {kind}" if kind else row["status"]


def _job(row: dict, width: int = 200) -> str:
    """`#1 model=local model.path=/nope quant=none`."""
    return f"#{row['job']} {_shorten(row['overrides'] or '', width)}".rstrip()


def _failed_label(row: dict, width: int = 200) -> str:
    """`#1 model=local model.path=/nope quant=none (failed: CheckpointError)`."""
    return f"{_job(row, width)} ({_failure(row)})"


def _point_labels(rows: list[dict]) -> list[str]:
    """The quantization, or the overrides; jobs sharing one also get the overrides that tell them apart."""
    base = [r["quantization"] or r["overrides"] or f"#{r['job']}" for r in rows]
    labels = []
    for r, b in zip(rows, base, strict=True):
        group = [(o["overrides"] or "").split() for o, c in zip(rows, base, strict=True) if c == b]
        if len(group) > 1:
            values: dict[str, set] = {}
            for tokens in group:
                for key, _, value in (t.partition("=") for t in tokens):
                    values.setdefault(key, set()).add(value)
            own = (r["overrides"] or "").split()
            differ = " ".join(t for t in own if len(values[t.partition("=")[0]]) > 1) or f"#{r['job']}"
            b = f"{b}, {differ}" if differ != b else b
        labels.append(_shorten(b, 60))
    return labels


def common_overrides(rows: list[dict]) -> list[str]:
    """The overrides every job of a sweep of several has (`+experiment=method-sweep`): said once, in the title,
    rather than on every label."""
    if len(rows) < 2:
        return []
    each = [(r["overrides"] or "").split() for r in rows]
    return [token for token in each[0] if all(token in tokens for tokens in each[1:])]


def sweep_title(rows: list[dict], sweep_dir: Path) -> str:
    """`qloader sweep: smollm2-135m; every job +experiment=method-sweep — multirun/2026-11-25/10-00-00`: the sweep
    dir only where it lies under the working directory (a temporary or absolute folder says nothing to a reader)."""
    models = list(dict.fromkeys(r["_model"] for r in rows if r.get("_model")))
    named = ", ".join(models[:3]) + (f" +{len(models) - 3} more" if len(models) > 3 else "") or "unknown model"
    said = {f"model={m.split(' (')[0]}" for m in models}  # `model=smollm2-135m`: the model is named already
    if common := [token for token in common_overrides(rows) if token not in said]:
        named += f"; every job {_shorten(' '.join(common), 60)}"
    try:
        where = sweep_dir.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return f"qloader sweep: {named}"
    return f"qloader sweep: {named} — {where}" if str(where) != "." else f"qloader sweep: {named}"


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _place_labels(ax, renderer, points: list[tuple[str, float, float]], taken: list) -> None:
    """Label each point at the nearby offset that overlaps the fewest other labels and points."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    inside = ax.get_window_extent(renderer)
    marks = [Bbox.from_bounds(*(ax.transData.transform((x, y)) - 4), 8, 8) for _, x, y in points]
    # Beside the point first; further up or down with a leader line when those are taken.
    offsets = [(7, 5, "left"), (7, -12, "left"), (-7, 5, "right"), (-7, -12, "right")]
    offsets += [(dx, dy, ha) for dy in (18, -25, 31, -38, 44, -51) for dx, ha in ((14, "left"), (-14, "right"))]
    for i, (label, x, y) in enumerate(points):
        best = None
        for dx, dy, ha in offsets:
            leader = {"arrowstyle": "-", "color": "grey", "linewidth": 0.6} if abs(dy) > 12 else None
            text = ax.annotate(
                label, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, fontsize=9, arrowprops=leader
            )
            text.update_positions(renderer)
            box = Text.get_window_extent(text, renderer)  # the text alone, not its leader line
            outside = box.width * box.height - _overlap(box, inside)
            cost = 10 * outside + sum(_overlap(box, t) for t in taken)
            cost += sum(_overlap(box, m) for j, m in enumerate(marks) if j != i)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost == 0:
                break
        taken.append(best[2])


def _quality_points(rows: list[dict]) -> dict:
    """The y figure (the first of QUALITY any job has, else load time) and the succeeded jobs that have it."""
    done = [r for r in rows if r["status"] == "succeeded"]
    column, ylabel, short, higher = next((q for q in QUALITY if any(r[q[0]] is not None for r in rows)), FALLBACK_Y)
    points, unplotted = [], []
    for r, label in zip(done, _point_labels(done), strict=True):
        if r["footprint_mib"] and r[column] is not None:
            points.append((label, r["footprint_mib"], r[column]))
        else:
            unplotted.append(_job(r, 70))
    ylabel = f"{ylabel} ({'higher' if higher else 'lower'} is better)"
    if column == FALLBACK_Y[0]:
        ylabel += "\nno probe figures in this sweep (run it with probe=quick)"
    return {
        "metric": column,
        "short": short,
        "ylabel": ylabel,
        "higher_is_better": higher,
        "points": points,
        "unplotted": unplotted,
    }


def _quality_panel(ax, rows: list[dict], drawn: dict) -> None:
    """Quality (or load time) against footprint, one point per job; a band on the worse edge for failed jobs."""
    from matplotlib.lines import Line2D

    done = [r for r in rows if r["status"] == "succeeded"]
    failed = [r for r in rows if r["status"] != "succeeded"]
    column, short, ylabel, higher, points = (
        drawn[k] for k in ("metric", "short", "ylabel", "higher_is_better", "points")
    )

    # Axis limits: the points, with a band on the worse-quality edge kept free for the failed jobs.
    xs = [x for _, x, _ in points] + [r["_planned_footprint_mib"] for r in failed if r.get("_planned_footprint_mib")]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    x_pad = 0.15 * (x_hi - x_lo) or 0.15 * abs(x_hi) or 1.0
    ax.set_xlim(max(0.0, x_lo - x_pad), x_hi + x_pad)
    ys = [y for _, _, y in points]
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    span = (y_hi - y_lo) or 0.1 * abs(y_hi) or 1.0
    band = 0.05 + 0.07 * min(len(failed), MAX_FAILED_SHOWN) if failed else 0.0
    total = span / (1 - band - 0.24)
    below, above = (band + 0.12) * total, 0.12 * total
    ax.set_ylim(*((y_lo - below, y_hi + above) if higher else (y_lo - above, y_hi + below)))

    for label, x, y in points:  # the unquantized job, the reference, as a star
        marker, color = ("*", "black") if _is_reference(label) else ("o", "tab:blue")
        ax.scatter([x], [y], s=90 if marker == "*" else 40, marker=marker, color=color, zorder=3)
    ax.set_xlabel("footprint, MiB (smaller is better)")
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
    refs = {r["reference_perplexity"] for r in done if r["reference_perplexity"] is not None}
    if column == "perplexity" and len(refs) == 1:
        ax.axhline(refs.pop(), color="grey", linestyle="--", linewidth=1, label="unquantized reference perplexity")
    if not points:
        ax.text(0.5, 0.5, "no succeeded job to plot", transform=ax.transAxes, ha="center", color="grey")

    arrow = ("↖" if higher else "↙") + f" better: smaller footprint, {'higher' if higher else 'lower'} {short}"
    handles = [Line2D([], [], marker="o", linestyle="", color="tab:blue", label="job (succeeded)")]
    if any(_is_reference(label) for label, _, _ in points):
        handles.append(Line2D([], [], marker="*", markersize=10, linestyle="", color="black", label="unquantized"))
    if failed:
        handles.append(
            Line2D([], [], marker="x", linestyle="", color="red", markeredgewidth=2, label="job not succeeded")
        )
    handles += [h for h in ax.get_lines() if h.get_label() == "unquantized reference perplexity"]
    handles.append(Line2D([], [], linestyle="", label=arrow))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), ncols=2, fontsize=9, frameon=False)
    drawn.update(xlabel=ax.get_xlabel(), failed=[_failed_label(r) for r in failed])


def _label_quality_panel(ax, rows: list[dict], points: list[tuple[str, float, float]], higher: bool) -> None:
    """Failed jobs as red crosses stacked on the worse-quality edge (at their planned footprint, else the left
    edge), then a label by each point where it overlaps least. Needs the axes' final position."""
    renderer = ax.figure.canvas.get_renderer()
    taken = []
    failed = [r for r in rows if r["status"] != "succeeded"][:MAX_FAILED_SHOWN]
    for i, r in enumerate(failed):
        label = _failed_label(r, 70)
        y = 0.04 + 0.07 * (len(failed) - 1 - i) if higher else 0.96 - 0.07 * i  # first job nearest the points
        planned = r.get("_planned_footprint_mib")
        at_x = (planned - ax.get_xlim()[0]) / (ax.get_xlim()[1] - ax.get_xlim()[0]) if planned else 0.015
        left = at_x > 0.6
        ax.plot(at_x, y, "x", color="red", markersize=9, markeredgewidth=2, transform=ax.transAxes, clip_on=False)
        text = ax.annotate(
            label, (at_x, y), xycoords="axes fraction", xytext=(-8 if left else 8, 0), textcoords="offset points",
            ha="right" if left else "left", va="center", fontsize=8, color="red",
        )  # fmt: skip
        taken.append(text.get_window_extent(renderer))
    _place_labels(ax, renderer, points, taken)


# Speed figures a sweep may carry, best first: (column, axis label, reference value or None).
SPEED = [
    ("relative_decode_speed", "decode tokens/s relative to unquantized, log scale (higher is faster)", 1.0),
    ("decode_tok_s", "decode tokens/s (higher is faster)", None),
    ("prefill_tok_s", "prefill tokens/s (higher is faster)", None),
]


def _speed_points(rows: list[dict]) -> dict:
    """The speed figure (relative decode speed where an unquantized job is the reference) against footprint."""
    done = [r for r in rows if r["status"] == "succeeded"]
    column, ylabel, reference = next((q for q in SPEED if any(r[q[0]] is not None for r in done)), SPEED[0])
    points = [
        (label, r["footprint_mib"], r[column])
        for r, label in zip(done, _point_labels(done), strict=True)
        if r["footprint_mib"] and r[column] is not None
    ]
    if not points:
        ylabel = "speed: no generation timings in this sweep (run it with probe=quick)"
    return {"metric": column, "ylabel": ylabel, "reference": reference, "points": points}


def _is_reference(label: str) -> bool:
    return label == "none" or label.startswith("none, ")


def _speed_panel(ax, speed: dict) -> None:
    """Speed against footprint, one point per succeeded job; the unquantized job is the reference line."""
    from matplotlib.lines import Line2D

    points = speed["points"]
    for label, x, y in points:
        marker, color = ("*", "black") if _is_reference(label) else ("o", "tab:purple")
        ax.scatter([x], [y], s=90 if marker == "*" else 40, marker=marker, color=color, zorder=3)
    ax.set_xlabel("footprint, MiB (smaller is better)")
    ax.set_ylabel(speed["ylabel"], fontsize=9)
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color="tab:purple", label="job")]
    if any(_is_reference(label) for label, _, _ in points):
        handles.append(Line2D([], [], marker="*", markersize=10, linestyle="", color="black", label="unquantized"))
    if speed["reference"] is not None and points:
        ax.axhline(speed["reference"], color="grey", linestyle="--", linewidth=1)
        handles.append(Line2D([], [], color="grey", linestyle="--", label="unquantized (1.0x)"))
    if not points:
        ax.text(0.5, 0.5, "no speed figures", transform=ax.transAxes, ha="center", color="grey")
    else:
        xs, ys = [x for _, x, _ in points], [y for _, _, y in points] + [speed["reference"] or points[0][2]]
        x_pad = 0.15 * (max(xs) - min(xs)) or 0.15 * max(xs)
        ax.set_xlim(max(0.0, min(xs) - x_pad), max(xs) + x_pad)
        if speed["reference"] is not None:  # ratios: half as fast and twice as fast lie as far from 1.0x
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log", base=2)
            ax.set_ylim(min(ys) / 1.4, max(ys) * 1.4)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        else:
            y_pad = 0.15 * (max(ys) - min(ys)) or 0.15 * max(ys)
            ax.set_ylim(max(0.0, min(ys) - y_pad), max(ys) + y_pad)
    speed["scale"] = ax.get_yscale()
    handles.append(Line2D([], [], linestyle="", label="↖ better: smaller and faster"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), ncols=2, fontsize=9, frameon=False)


def _positive_bars(ax, y: list[float], values: list, **style) -> None:
    """Bars on a log axis: a job without the figure (or with 0) has no bar rather than one from -infinity."""
    shown = [(i, v) for i, v in zip(y, values, strict=True) if v]
    if shown:
        ax.barh([i for i, _ in shown], [v for _, v in shown], **style)
    else:
        ax.barh([], [], **style)  # still in the legend


def _bar_panels(mem, time, rows: list[dict]) -> list[str]:
    """Per job: footprint and the peak anonymous memory of the load stage and of generating; time on a log axis
    (a calibrating method's minutes beside others' seconds), with postprocess (calibration) and the load stage
    apart from the whole load. Returns the row labels."""
    y = list(range(len(rows)))
    labels = [_job(r, 60) for r in rows]
    labels = [
        lab if r["status"] == "succeeded" else f"{lab} ✗ {r['status']}" for lab, r in zip(labels, rows, strict=True)
    ]
    bars = [
        ("footprint_mib", "footprint", "tab:blue"),
        ("peak_anon_mib_load", "peak anon, load stage", "tab:orange"),
        ("generate_peak_anon_mib", "peak anon, generating", "tab:purple"),
    ]
    for k, (column, label, color) in enumerate(bars):
        values = [r[column] or 0 for r in rows]
        mem.barh([i - 0.27 + 0.27 * k for i in y], values, height=0.27, label=label, color=color)
    mem.set_yticks(y, labels, fontsize=8)
    for tick, r in zip(mem.get_yticklabels(), rows, strict=True):
        tick.set_color("black" if r["status"] == "succeeded" else "red")
    mem.set_xlabel("MiB")
    time.set_xscale("log")
    stages = [
        ("load_s", "all stages", "tab:green"),
        ("postprocess_s", "postprocess (calibration)", "tab:red"),
        ("load_stage_s", "load stage", "tab:olive"),
    ]
    for k, (column, label, color) in enumerate(stages):
        _positive_bars(time, [i - 0.27 + 0.27 * k for i in y], [r[column] for r in rows], height=0.27, label=label,
                       color=color)  # fmt: skip
    time.set_yticks(y, [""] * len(rows))
    time.set_xlabel("seconds (log scale)")
    for ax in (mem, time):
        ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1), ncols=3, frameon=False)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # the first job on top
        ax.grid(axis="x", alpha=0.3)
    return labels


def plot(rows: list[dict], path: Path, title: str = "qloader sweep") -> dict:
    """summary.png: quality and speed against footprint above, per-job memory and time below, failures listed.
    Overrides every job shares are left off the labels (the title says them once).

    Returns what it drew: title, axis labels, `points` [(label, footprint MiB, y)], `failed` [labels], `note`,
    `speed` (its metric, label, reference and points), `bar_labels`, `time_scale`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    common = set(common_overrides(rows))
    rows = [{**r, "overrides": " ".join(t for t in (r["overrides"] or "").split() if t not in common)} for r in rows]
    failed = [r for r in rows if r["status"] != "succeeded"]
    errors = [" ".join((r["error"] or "no error recorded").split()) for r in failed]
    note = [
        f"{_job(r, 70)}: {r['status']} — {e if len(e) < 110 else e[:109] + '…'}"
        for r, e in zip(failed, errors, strict=True)
    ]
    drawn = _quality_points(rows)
    speed = _speed_points(rows)
    note += [f"{job}: succeeded, but has no footprint or {drawn['metric']} to plot" for job in drawn["unplotted"]]
    bars_h = 1.4 + 0.55 * max(len(rows), 1)
    heights = [6, bars_h] + ([0.3 + 0.2 * (len(note) + 1)] if note else [])
    fig = Figure(figsize=(16, sum(heights)), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subfigures(len(heights), 1, height_ratios=heights)  # each laid out on its own
    quality, speed_ax = panels[0].subplots(1, 2, width_ratios=[1.2, 1])
    mem, time = panels[1].subplots(1, 2)
    fig.suptitle(title, fontsize=13)
    bar_labels = _bar_panels(mem, time, rows)
    _quality_panel(quality, rows, drawn)
    _speed_panel(speed_ax, speed)
    if note:
        text = "\n".join(["jobs without a point on the quality plot:", *note])
        panels[2].text(0.005, 0.95, text, va="top", fontsize=8, color="darkred").set_in_layout(False)
    fig.canvas.draw()  # lay the panels out once, then freeze them so the labels can be placed without overlap
    fig.set_layout_engine("none")
    _label_quality_panel(quality, rows, drawn["points"], drawn["higher_is_better"])
    _place_labels(speed_ax, fig.canvas.get_renderer(), speed["points"], [])
    fig.savefig(path, dpi=100)
    return {
        "title": title, **drawn, "note": note, "speed": speed, "bar_labels": bar_labels,
        "time_scale": time.get_xscale(),
    }  # fmt: skip


def write_summary(sweep_dir: Path) -> list[dict]:
    """summary.csv, summary.md and summary.png in `sweep_dir`; returns the rows."""
    rows = collect(sweep_dir)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")  # not the private `_` keys
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(markdown(rows))
    plot(rows, sweep_dir / "summary.png", title=sweep_title(rows, sweep_dir))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qloader-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir, e.g. multirun/2026-11-24/10-00-00")
    args = parser.parse_args(argv)
    if problem := _not_a_sweep_dir(args.sweep_dir):
        parser.exit(2, f"qloader-report: error: {problem}\n")  # one line: nothing is written
    rows = write_summary(args.sweep_dir)
    print(markdown(rows), end="")
    print(f"wrote {args.sweep_dir}/summary.csv, summary.md, summary.png ({len(rows)} jobs)")


def _not_a_sweep_dir(folder: Path) -> str | None:
    """Why `folder` is not a sweep dir to summarize (None: it is): a summary is never written into anything else."""
    takes = "qloader-report takes a sweep dir (multirun/DATE/TIME, one folder per job)"
    if not folder.is_dir():
        return f"sweep dir '{folder}' does not exist; {takes}"
    if (folder / "manifest.json").is_file():
        return (
            f"'{folder}' is a single run's dir (it holds manifest.json), not a sweep dir; {takes}; a single run's "
            "record is its manifest.json"
        )
    if not job_dirs(folder):
        return f"'{folder}' holds no sweep jobs (no N/manifest.json or N/.hydra/); {takes}"
    return None
