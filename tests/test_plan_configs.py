"""Plans of public large-model configs (tests/data/configs: config.json files only, no weights) on GPUs this host
need not have: sizes as published, placement across GPUs, and the KV cache of GQA and sliding-window layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import qloader

CONFIGS = Path(__file__).parent / "data" / "configs"
PARAMETERS = {
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.1-70B": 70_553_706_496,
    "Mixtral-8x7B-v0.1": 46_702_792_704,
    "Qwen2.5-72B": 72_706_203_648,
}
"""The parameter counts their model cards give (tied weights once)."""


def plan(tmp_path: Path, model: str, *overrides: str) -> dict:
    run = ["model=local", f"model.path={CONFIGS / model}", "mode=plan", "plan.advice=false", *overrides]
    return qloader.load(run, run_dir=tmp_path / "-".join([model, *overrides]).replace("/", "_")).manifest["plan"]


@pytest.mark.parametrize("model", sorted(p.name for p in CONFIGS.iterdir()))
def test_each_public_config_plans_from_config_alone(model: str, tmp_path) -> None:
    found = plan(tmp_path, model, "quant=bnb-nf4", "device_map.max_memory.0=80GiB", "device_map.max_memory.1=80GiB")
    assert found["computed_from"] == "config-only" and found["hypothetical_devices"] == ["0", "1"]
    assert found["parameters"] == PARAMETERS.get(model, found["parameters"])
    assert found["fits"] is True and set(found["devices"]) <= {"0", "1"}
    quantized = sum(d["quantized_bytes"] for d in found["devices"].values())
    kept = sum(group["parameters"] for group in found["kept"])
    assert quantized == pytest.approx(
        (found["parameters"] - kept) / 2, rel=1e-3
    )  # nf4: half a byte a weight (norms aside)


def test_llama_70b_in_nf4_and_int8_on_one_and_two_80gib_gpus(tmp_path) -> None:
    nf4 = plan(tmp_path, "Llama-3.1-70B", "quant=bnb-nf4", "device_map.max_memory.0=80GiB", "plan.seq_len=8192")
    assert nf4["fits"] and nf4["device_map"] == {"": "0"}
    assert nf4["inference"]["kv_bytes_per_token"] == 80 * 2 * 8 * 128 * 2  # 80 layers, K+V, 8 kv heads, bf16
    assert nf4["inference"]["kv_cache_bytes"] == {"0": 8192 * 327_680} and nf4["inference"]["fits"]
    activations = (4 * 8192 + 3 * 28672) * 2  # per token: 4 x hidden + 3 x intermediate, bf16
    logits = 128_256 * 4  # the last token's, float32
    assert nf4["inference"]["activation_bytes"] == {"0": 8192 * activations + logits}
    room = 80 * 2**30 - nf4["footprint_bytes"]
    assert nf4["inference"]["max_tokens"] == (room - logits) // (327_680 + activations)
    int8 = plan(tmp_path, "Llama-3.1-70B", "quant=bnb-int8", "device_map.max_memory.0=24GiB")
    assert int8["fits"] is False and int8["shortfall_bytes"]["disk"] > 0 and int8["refusals"]
    assert int8["inference"]["max_tokens"] == 0
    two = plan(
        tmp_path, "Llama-3.1-70B", "quant=none", "device_map.max_memory.0=80GiB", "device_map.max_memory.1=80GiB"
    )
    assert two["fits"] and {d for d in two["device_map"].values()} == {"0", "1"}
    assert 140e9 < two["footprint_bytes"] < 142e9  # 70.55 B parameters in bf16


def test_gemma3_sliding_layers_keep_1024_tokens(tmp_path) -> None:
    found = plan(tmp_path, "gemma-3-27b-text", "quant=bnb-nf4", "device_map.max_memory.0=80GiB", "plan.seq_len=4096")
    per_layer = 2 * 16 * 128 * 2  # K+V, 16 kv heads, head_dim 128, bf16
    full, sliding = 10, 52  # every 6th of 62 layers attends to every token; the others to the last 1024
    assert found["inference"]["kv_bytes_per_token"] == 62 * per_layer
    assert found["inference"]["kv_cache_bytes"] == {"0": (full * 4096 + sliding * 1024) * per_layer}


@pytest.mark.slow
def test_a_70b_plan_runs_as_a_whole_process_from_config_alone(tmp_path) -> None:
    """Its time is a benchmark's (benchmarks/plan_table.py times this plan from spawn to exit), not a test's."""
    command = [sys.executable, "-m", "qloader", "model=local", f"model.path={CONFIGS / 'Llama-3.1-70B'}", "mode=plan"]
    command += ["quant=bnb-nf4", "device_map.max_memory.0=80GiB", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "fits max_memory           yes" in done.stdout
