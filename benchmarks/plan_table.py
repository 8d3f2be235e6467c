"""Will it fit? Plans of public model configs (config.json alone, no weights) on GPUs this host need not have.

    python benchmarks/plan_table.py              # every model x method x device set
    python benchmarks/plan_table.py --models Llama-3.1-70B --methods bnb-nf4,bnb-int8

Each plan is `qloader mode=plan model=local model.path=tests/data/configs/<model>` with `quant=<method>` and
`device_map.max_memory.N=SIZE` for each GPU of the device set (and no CPU budget: what does not fit the GPUs
lands on disk, which qloader refuses without `device_map.offload_folder`). The plans run in this process; one
70B plan runs again as a whole process, timed from spawn to exit. Columns: fits (`plan.fits`), GPUs used (GPUs
holding any of the model), spill (bytes that land on cpu or disk), and the longest context that fits beside
the model at batch 1 (`plan.inference.max_tokens`, KV cache in the model's dtype).
Results: benchmarks/results/plan_table.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "configs"
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("Llama-3.1-8B", "Llama-3.1-70B", "Mixtral-8x7B-v0.1", "Qwen2.5-72B", "gemma-3-27b-text")
METHODS = ("none", "bnb-nf4", "bnb-int8", "torchao-int8wo")
DEVICE_SETS = {"1x24GiB": ["24GiB"], "1x80GiB": ["80GiB"], "2x80GiB": ["80GiB", "80GiB"]}
TIMED = ("Llama-3.1-70B", "bnb-nf4", "1x80GiB")
"""The plan also run as a whole process: `qloader ... mode=plan` from spawn to exit (target: at most 10 s)."""


def overrides(model: str, method: str, gpus: list[str]) -> list[str]:
    budgets = [f"device_map.max_memory.{index}={size}" for index, size in enumerate(gpus)]
    return [
        "model=local",
        f"model.path={CONFIGS / model}",
        f"quant={method}",
        "mode=plan",
        "plan.advice=false",
        *budgets,
    ]


def plan_row(model: str, method: str, devices: str, run_dir: Path) -> dict:
    import qloader

    start = time.perf_counter()
    plan = qloader.load(overrides(model, method, DEVICE_SETS[devices]), run_dir=run_dir).manifest["plan"]
    seconds = time.perf_counter() - start
    gpus = [d for d, e in plan["devices"].items() if d.isdigit() and e["total_bytes"]]
    spill = sum(e["total_bytes"] for d, e in plan["devices"].items() if d in ("cpu", "disk"))
    inference = plan.get("inference") or {}
    return {
        "model": model,
        "method": method,
        "devices": devices,
        "fits": plan["fits"],
        "gpus_used": len(gpus),
        "footprint_bytes": plan["footprint_bytes"],
        "spill_bytes": spill,
        "max_tokens": inference.get("max_tokens") if plan["fits"] else 0,
        "context_limit": inference.get("context_limit"),
        "kv_bytes_per_token": inference.get("kv_bytes_per_token"),
        "parameters": plan["parameters"],
        "computed_from": plan["computed_from"],
        "seconds_in_process": round(seconds, 2),
    }


ACCELERATE_DIVISOR = {"none": ("float16", 2), "bnb-nf4": ("int4", 8), "bnb-int8": ("int8", 4),
                      "torchao-int8wo": ("int8", 4)}  # fmt: skip
"""The row of `accelerate estimate-memory` a method's footprint compares with, and its divisor of the float32 size."""


def accelerate_float32_bytes(model: str) -> int:
    """What `accelerate estimate-memory` starts from: the model built empty in float32 from its config (as its
    `create_empty_model` does), sized by accelerate's `calculate_maximum_sizes`; it then divides by 2 (float16),
    4 (int8) or 8 (int4), whatever a method keeps unquantized."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(CONFIGS / model)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return calculate_maximum_sizes(empty)[0]


def whole_process_seconds(model: str, method: str, devices: str, run_dir: Path) -> float:
    command = [sys.executable, "-m", "qloader", *overrides(model, method, DEVICE_SETS[devices])]
    start = time.perf_counter()
    done = subprocess.run([*command, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 3):
        raise RuntimeError(done.stderr)
    return round(seconds, 2)


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def accelerate_cell(row: dict) -> str:
    """`accelerate estimate-memory`'s total for the method's dtype row, and how far it is from the plan."""
    if row.get("accelerate_bytes") is None:
        return "-"
    dtype, _ = ACCELERATE_DIVISOR[row["method"]]
    off = row["accelerate_bytes"] / row["footprint_bytes"] - 1
    return f"{gib(row['accelerate_bytes'])} ({dtype}; {off:+.0%})"


def markdown(rows: list[dict], timed: float) -> str:
    lines = [
        "# Will it fit? Plans from config.json alone",
        "",
        "`python benchmarks/plan_table.py`: `qloader mode=plan model=local model.path=tests/data/configs/<model> "
        "quant=<method> device_map.max_memory.0=80GiB ...` (no CPU budget: what the GPUs cannot hold lands on disk). "
        "Footprint: the model as loaded; spill: bytes on cpu or disk; max context: tokens per sequence at batch 1 "
        "whose KV cache (bf16) and prefill activations fit beside the model, at most the model's "
        "max_position_embeddings. "
        "accelerate estimate-memory: its total for the same config (float32 size from an empty model, divided by 2 "
        "for float16, 4 for int8, 8 for int4) and how far it is from the plan's footprint: it divides the kept "
        "layers (embeddings, lm_head, norms) and the quantization state too, which the plan counts as loaded.",
        "",
        "| model | method | devices | fits | GPUs used | footprint | spill | max context "
        "| accelerate estimate-memory |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        context = f"{row['max_tokens']:,}" if row["fits"] else "-"
        if row["fits"] and row["context_limit"] and row["max_tokens"] > row["context_limit"]:
            context = f"{row['context_limit']:,} (model limit; memory: {row['max_tokens']:,})"
        lines.append(
            f"| {row['model']} | {row['method']} | {row['devices']} | {'yes' if row['fits'] else 'no'} | "
            f"{row['gpus_used']} | {gib(row['footprint_bytes'])} | {gib(row['spill_bytes'])} | {context} | "
            f"{accelerate_cell(row)} |"
        )
    model, method, devices = TIMED
    lines += ["", f"Whole process, {model} {method} on {devices}: {timed} s (spawn to exit, this host)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            float32 = accelerate_float32_bytes(model)
            for method in args.methods.split(","):
                for devices in DEVICE_SETS:
                    rows.append(plan_row(model, method, devices, Path(tmp) / f"{model}-{method}-{devices}"))
                    divisor = ACCELERATE_DIVISOR.get(method, (None, None))[1]
                    rows[-1]["accelerate_bytes"] = float32 // divisor if divisor else None
                    print(json.dumps(rows[-1]), flush=True)
        timed = whole_process_seconds(*TIMED, Path(tmp) / "timed")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plan_table.json").write_text(json.dumps({"rows": rows, "whole_process_seconds": timed}, indent=2))
    (RESULTS / "plan_table.md").write_text(markdown(rows, timed))
    print(markdown(rows, timed))


if __name__ == "__main__":
    main()
