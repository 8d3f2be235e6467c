"""Room for inference: the KV cache per device beside the model, and the longest context that fits."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import read_manifest, run_cli_in_process

TINY_KV_PER_TOKEN = 2 * (2 * 2 * 16 * 2)
"""tiny-llama: 2 layers x K and V x 2 key/value heads (GQA: 4 query heads) x head_dim 16 x 2 bytes (bf16)."""
TINY_ACT_PER_TOKEN = (4 * 64 + 3 * 128) * 2
"""tiny-llama's prefill activations per token: 4 x hidden 64 + 3 x intermediate 128, in bf16."""
TINY_LOGITS = 512 * 4
"""The last token's logits: vocab 512 x float32."""
PER_TOKEN = TINY_KV_PER_TOKEN + TINY_ACT_PER_TOKEN


def plan(run_dir: Path, *overrides: str) -> tuple[dict, str]:
    result = run_cli_in_process("mode=plan", "quant=none", "device_map=cpu", *overrides, run_dir=run_dir)
    assert result.returncode in (0, 3), result.stderr
    return read_manifest(run_dir)["plan"], result.stdout


def test_kv_cache_room_counts_key_value_heads_and_batch(tmp_path) -> None:
    base, _ = plan(tmp_path / "base", "model=tiny-llama")
    budget = f"device_map.max_memory.cpu={base['footprint_bytes'] + 1000 * PER_TOKEN + TINY_LOGITS}"
    one, out = plan(tmp_path / "one", "model=tiny-llama", budget, "plan.seq_len=1000")
    assert one["inference"]["kv_bytes_per_token"] == TINY_KV_PER_TOKEN
    assert one["inference"]["max_tokens"] == 1000 and one["inference"]["fits"] is True
    assert one["inference"]["kv_cache_bytes"] == {"cpu": 1000 * TINY_KV_PER_TOKEN}
    assert one["inference"]["activation_bytes"] == {"cpu": 1000 * TINY_ACT_PER_TOKEN + TINY_LOGITS}
    assert "fits for inference at 1 x 1,000 (KV cache 0.2 MiB bfloat16, activations about 1.2 MiB); " in out
    assert "longest context at batch 1: 1,000" in out
    two, out = plan(tmp_path / "two", "model=tiny-llama", budget, "plan.seq_len=1000", "plan.batch_size=2")
    at_two = (1000 * PER_TOKEN + TINY_LOGITS - 2 * TINY_LOGITS) // (2 * PER_TOKEN)  # 499: two sequences' logits
    assert two["inference"]["max_tokens"] == at_two == 499 and two["inference"]["fits"] is False
    assert two["fits"] is True  # the model alone fits: plan.fits keeps its meaning
    assert "does not fit for inference at 2 x 1,000" in out and "longest context at batch 2: 499 tokens" in out


def test_sliding_window_layers_keep_at_most_their_window(tiny_checkpoint, tmp_path) -> None:
    folder = tmp_path / "mistral"
    folder.mkdir()
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config |= {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 64}
    (folder / "config.json").write_text(json.dumps(config))
    base, _ = plan(tmp_path / "base", "model=local", f"model.path={folder}")
    assert base["inference"]["max_tokens"] > 1_000_000  # every layer slides: the cache stops growing at 64 tokens
    # (only the activations still grow with the prompt)
    tight = f"device_map.max_memory.cpu={base['footprint_bytes'] + 63 * PER_TOKEN + TINY_LOGITS}"
    short, _ = plan(tmp_path / "tight", "model=local", f"model.path={folder}", tight, "plan.seq_len=4096")
    assert short["inference"]["max_tokens"] == 63 and short["inference"]["fits"] is False
    assert short["inference"]["kv_cache_bytes"] == {"cpu": 64 * TINY_KV_PER_TOKEN}  # 4096 tokens, 64 kept


def test_models_without_a_kv_cache_have_no_inference_section(tmp_path) -> None:
    from families import FAMILIES, write_checkpoint

    folder = write_checkpoint(FAMILIES["bert-cls"], tmp_path / "bert")
    found, out = plan(tmp_path / "run", "model=local", f"model.path={folder}", "model.task=sequence-classification")
    assert found["inference"] is None and "inference" not in out


def test_bad_batch_and_length_are_config_errors(tmp_path) -> None:
    result = run_cli_in_process(
        "mode=plan", "model=tiny-llama", "plan.batch_size=0", "plan.seq_len=-5", run_dir=tmp_path
    )
    assert result.returncode == 1
    assert "plan.batch_size 0 is not a number of sequences" in result.stderr
    assert "plan.seq_len -5 is not a number of tokens" in result.stderr
