"""The sweep summary from manifests alone: csv columns, the failed job's row, and what summary.png shows."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import pytest

from qloader.runs import report
from qloader.runs.report import COLUMNS, collect, plot, sweep_title, write_summary

MiB = 2**20
PNG = b"\x89PNG\r\n\x1a\n"


def stage(name: str, wall_s: float, anon_start_mib: int = 100, anon_peak_mib: int = 150) -> dict:
    return {
        "name": name,
        "wall_s": wall_s,
        "anon_start_bytes": anon_start_mib * MiB,
        "anon_peak_bytes": anon_peak_mib * MiB,
        "rss_peak_bytes": (anon_peak_mib + 50) * MiB,
    }


def manifest(
    overrides: list[str],
    quant: str | None,
    footprint_mib: float | None,
    probe: dict | None = None,
    status: str = "succeeded",
    error: tuple[str, str] | None = None,
    model: str | None = "smollm2-135m",
    model_options: dict | None = None,
    checkpoint: str | None = "/cache/smollm2-135m-abc123",
    planned_mib: float | None = None,
) -> dict:
    """The keys `report._row` reads, shaped as qloader writes them."""
    done = status == "succeeded"
    return {
        "overrides": overrides,
        "status": status,
        "quantization": {"description": quant} if quant else None,
        "model": {"footprint_bytes": int(footprint_mib * MiB), "dtype": "bfloat16"} if footprint_mib else None,
        "checkpoint": {"path": checkpoint} if checkpoint else None,
        "stages": [stage("resolve", 0.2), *([stage("load", 1.5, 120, 300)] if done else [])],
        "error": {"type": error[0], "message": error[1], "stage": "resolve"} if error else None,
        "probe": probe,
        "config": {"model": model_options or {"_target_": "qloader.checkpoint.sources.smollm2_checkpoint"}},
        "choices": {"model": model, "quant": "x"} if model else {},
        "plan": {"footprint_bytes": int(planned_mib * MiB)} if planned_mib else None,
    }


def probe(top1: float | None, ppl: float | None = 12.0, decode: float | None = None) -> dict:
    """The probe's figures; `decode` tokens/s: its timed generation too (else a manifest from before it)."""
    figures = {"perplexity": ppl, "reference_perplexity": 11.5, "top1_agreement": top1, "mean_kl": 0.01}
    if decode is not None:
        figures["speed"] = {
            "prompt_tokens": 36, "prefill_tokens_per_s": 10 * decode, "new_tokens": 32, "decode_tokens_per_s": decode,
            "peak_anon_bytes": 400 * MiB, "peak_anon_exact": decode != 13.0,
        }  # fmt: skip
    return figures


def make_sweep(sweep_dir: Path, manifests: list[dict | list[str]]) -> Path:
    """Job folders 0, 1, ... as Hydra leaves them; a list of overrides: a job that never wrote its manifest."""
    for num, m in enumerate(manifests):
        job = sweep_dir / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
        overrides = m if isinstance(m, list) else m["overrides"]
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if isinstance(m, dict):
            (job / "manifest.json").write_text(json.dumps(m))
    return sweep_dir


def quant_sweep(sweep_dir: Path) -> Path:
    return make_sweep(
        sweep_dir,
        [
            manifest(["model=smollm2-135m", "quant=none"], "none", 256.0, probe(1.0, 11.5)),
            manifest(["model=smollm2-135m", "quant=bnb-nf4"], "bnb nf4 (double quant)", 104.3, probe(0.91, 12.4)),
            manifest(["model=smollm2-135m", "quant=bnb-int8"], "bnb int8", 160.8, probe(0.97, 11.7)),
            manifest(
                ["model=smollm2-135m", "quant=bnb-fp4"],
                None,
                None,
                status="failed",
                error=("CheckpointError", "model.path '/nope' is not a directory"),
                checkpoint=None,
            ),
        ],
    )


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("QLOADER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def drawn(monkeypatch) -> list[dict]:
    """What each `plot` call drew, as it returns it."""
    calls: list[dict] = []

    def recording_plot(*args, **kwargs) -> dict:
        calls.append(plot(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(report, "plot", recording_plot)
    return calls


def test_summary_files_have_one_row_per_job_and_no_private_keys(tmp_path, drawn) -> None:
    sweep_dir = quant_sweep(tmp_path / "multirun" / "2026-11-25" / "10-00-00")
    rows = write_summary(sweep_dir)
    with (sweep_dir / "summary.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames == COLUMNS
    assert [r["job"] for r in table] == ["0", "1", "2", "3"]
    assert [r["status"] for r in table] == ["succeeded"] * 3 + ["failed"]
    assert table[1]["compression"] == str(round(256.0 / 104.3, 2))
    assert all(r["_model"] == "smollm2-135m" for r in rows)  # private keys stay on the rows, out of the csv
    markdown = (sweep_dir / "summary.md").read_text()
    assert len(markdown.splitlines()) == 2 + 4  # header and rule, then one row per job
    failed_line = next(line for line in markdown.splitlines() if line.startswith("| 3 |"))
    assert "| failed |" in failed_line and "CheckpointError: model.path '/nope' is not a directory" in failed_line
    assert (sweep_dir / "summary.png").read_bytes()[:8] == PNG
    assert len(drawn) == 1


def test_plot_shows_quality_against_footprint_and_the_failed_job(tmp_path, drawn, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a sweep under the working directory: its folder in the title, relative
    sweep_dir = quant_sweep(tmp_path / "multirun" / "2026-11-25" / "10-00-00")
    write_summary(sweep_dir)
    (shown,) = drawn
    # every job's `model=smollm2-135m` is the model the title names: said once, on no label
    assert shown["title"] == f"qloader sweep: smollm2-135m — {Path('multirun') / '2026-11-25' / '10-00-00'}"
    assert shown["metric"] == "top1_agreement" and shown["higher_is_better"]
    assert "top-1 agreement" in shown["ylabel"] and "higher is better" in shown["ylabel"]
    assert "footprint, MiB" in shown["xlabel"]
    assert shown["points"] == [("none", 256.0, 1.0), ("bnb nf4 (double quant)", 104.3, 0.91), ("bnb int8", 160.8, 0.97)]
    assert shown["failed"] == ["#3 quant=bnb-fp4 (failed: CheckpointError)"]
    assert shown["note"] == ["#3 quant=bnb-fp4: failed — CheckpointError: model.path '/nope' is not a directory"]
    assert shown["bar_labels"][0] == "#0 quant=none" and shown["bar_labels"][3] == "#3 quant=bnb-fp4 ✗ failed"


def test_plot_falls_back_to_perplexity_then_to_load_time(tmp_path) -> None:
    ppl_only = make_sweep(
        tmp_path / "ppl",
        [
            manifest(["quant=none"], "none", 256.0, probe(None, 11.5)),
            manifest(["quant=bnb-nf4"], "bnb nf4", 104.3, probe(None, 12.4)),
        ],
    )
    shown = plot(collect(ppl_only), tmp_path / "ppl.png")
    assert shown["metric"] == "perplexity" and "lower is better" in shown["ylabel"]
    assert shown["points"] == [("none", 256.0, 11.5), ("bnb nf4", 104.3, 12.4)]

    no_probe = make_sweep(
        tmp_path / "no-probe",
        [manifest(["quant=none"], "none", 256.0), manifest(["quant=bnb-nf4"], "bnb nf4", 104.3)],
    )
    shown = plot(collect(no_probe), tmp_path / "load.png")
    assert shown["metric"] == "load_s" and not shown["higher_is_better"]
    assert shown["ylabel"] == "load time, s (lower is better)\nno probe figures in this sweep (run it with probe=quick)"
    assert shown["points"] == [("none", 256.0, 1.7), ("bnb nf4", 104.3, 1.7)]
    assert (tmp_path / "load.png").read_bytes()[:8] == PNG


def test_every_job_that_did_not_succeed_is_marked(tmp_path) -> None:
    """Failed (at its planned footprint), killed, and never started: all marked, none silently dropped."""
    sweep_dir = make_sweep(
        tmp_path / "sweep",
        [
            manifest(["quant=none"], "none", 256.0, probe(1.0)),
            manifest(["quant=bnb-int8"], None, None, status="failed", error=("OOM", "out of memory"), planned_mib=170),
            manifest(["quant=bnb-nf4"], None, None, status="killed", error=("KeyboardInterrupt", "interrupted")),
            ["quant=bnb-fp4"],
        ],
    )
    rows = collect(sweep_dir)
    assert rows[1]["_planned_footprint_mib"] == 170.0
    shown = plot(rows, tmp_path / "summary.png", title=sweep_title(rows, sweep_dir))
    assert shown["failed"] == [
        "#1 quant=bnb-int8 (failed: OOM)",
        "#2 quant=bnb-nf4 (killed: KeyboardInterrupt)",
        "#3 quant=bnb-fp4 (missing)",
    ]
    assert shown["note"][2].startswith("#3 quant=bnb-fp4: missing — no manifest.json in ")
    assert [p[0] for p in shown["points"]] == ["none"]
    assert (tmp_path / "summary.png").read_bytes()[:8] == PNG


def test_jobs_sharing_a_quantization_are_told_apart_by_what_differs(tmp_path) -> None:
    sweep_dir = make_sweep(
        tmp_path / "sweep",
        [
            manifest(["model=smollm2-135m", "dtype=bf16", "quant=none"], "none", 256.0, probe(1.0)),
            manifest(["model=smollm2-135m", "dtype=fp32", "quant=none"], "none", 512.0, probe(1.0)),
        ],
    )
    shown = plot(collect(sweep_dir), tmp_path / "summary.png")
    assert [p[0] for p in shown["points"]] == ["none, dtype=bf16", "none, dtype=fp32"]


def test_title_names_every_model(tmp_path) -> None:
    local = {"_target_": "qloader.checkpoint.sources.local_checkpoint", "path": "/data/my-llama"}
    sweep_dir = make_sweep(
        tmp_path / "sweep",
        [
            manifest(["model=smollm2-135m"], "none", 256.0),
            manifest(["model=local"], "none", 300.0, model="local", model_options=local, checkpoint="/data/my-llama"),
            manifest(["model=smollm2-135m", "quant=bnb-nf4"], "bnb nf4", 104.0),
            manifest([], "none", 10.0, model=None, checkpoint="/cache/tiny-llama-55a7a78bcf35"),
        ],
    )
    rows = collect(sweep_dir)
    assert [r["_model"] for r in rows] == [
        "smollm2-135m",
        "local (my-llama)",
        "smollm2-135m",
        "tiny-llama-55a7a78bcf35",
    ]
    title = sweep_title(rows, sweep_dir)
    # the sweep ran in a folder outside the working directory (a temporary one): the title does not print it
    assert title == "qloader sweep: smollm2-135m, local (my-llama), tiny-llama-55a7a78bcf35"


def method_sweep(sweep_dir: Path) -> Path:
    """`+experiment=method-sweep` as it ends here: the unquantized reference, two methods with speed figures, a
    calibrating method's 620 s postprocess (a manifest from before the speed figures), and gptq failed in resolve."""
    common = ["+experiment=method-sweep"]
    gptq = manifest(["quant=gptq-4bit", *common], "gptq 4-bit", 109.2, probe(0.74, 50.7))
    gptq["stages"].append(stage("postprocess", 620.0))
    return make_sweep(
        sweep_dir,
        [
            manifest(["quant=none", *common], "none", 256.0, probe(1.0, 11.5, decode=20.0)),
            manifest(["quant=bnb-nf4", *common], "bnb nf4", 104.3, probe(0.72, 12.4, decode=13.0)),
            manifest(["quant=torchao-int8wo", *common], "torchao int8wo", 156.0, probe(0.95, 11.7, decode=30.0)),
            gptq,
            manifest(["quant=gptq-4bit", "quant.bits=3", *common], None, None, status="failed",
                     error=("MissingDependencyError", "pip install 'qloader[gptq]'")),
        ],
    )  # fmt: skip


def test_speed_beside_size_and_quality_with_the_unquantized_job_as_reference(tmp_path, drawn) -> None:
    sweep_dir = method_sweep(tmp_path / "ms")
    rows = write_summary(sweep_dir)
    with (sweep_dir / "summary.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["relative_decode_speed"] for r in table] == ["1.0", "0.65", "1.5", "", ""]  # decode / none's decode
    assert [r["decode_tok_s"] for r in table[:3]] == ["20.0", "13.0", "30.0"]
    assert [r["prefill_tok_s"] for r in table[:3]] == ["200.0", "130.0", "300.0"]
    assert table[0]["generate_peak_anon_mib"] == "400.0" and table[3]["generate_peak_anon_mib"] == ""
    assert rows[0]["relative_decode_speed"] == 1.0 and rows[0]["compression"] == 1.0
    markdown = (sweep_dir / "summary.md").read_text()
    assert "| decode tok/s | decode vs none | generate peak anon MiB |" in markdown
    assert "| 20.0 | 1.0x | 400.0 |" in markdown and "| 13.0 | 0.65x | ≥ 400.0 |" in markdown  # starved sampler

    (shown,) = drawn
    assert shown["title"] == "qloader sweep: smollm2-135m; every job +experiment=method-sweep"
    assert str(tmp_path) not in shown["title"]
    assert not any("+experiment" in label for label in shown["bar_labels"] + shown["failed"] + shown["note"])
    assert shown["bar_labels"][:2] == ["#0 quant=none", "#1 quant=bnb-nf4"]
    speed = shown["speed"]
    assert speed["metric"] == "relative_decode_speed" and speed["reference"] == 1.0 and speed["scale"] == "log"
    assert speed["points"] == [("none", 256.0, 1.0), ("bnb nf4", 104.3, 0.65), ("torchao int8wo", 156.0, 1.5)]
    assert shown["time_scale"] == "log"  # 620 s beside 2 s: both readable
    assert [p[0] for p in shown["points"]] == ["none", "bnb nf4", "torchao int8wo", "gptq 4-bit"]
    assert (sweep_dir / "summary.png").read_bytes()[:8] == PNG


def test_speed_panel_without_timings_says_how_to_get_them(tmp_path) -> None:
    shown = plot(collect(quant_sweep(tmp_path / "sweep")), tmp_path / "summary.png")
    assert shown["speed"]["points"] == [] and "run it with probe=quick" in shown["speed"]["ylabel"]


def test_report_imports_neither_torch_nor_transformers() -> None:
    tree = ast.parse(Path(report.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}
