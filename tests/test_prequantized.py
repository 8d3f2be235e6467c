"""Pre-quantized checkpoints: save, detect, merge, and interoperate with plain transformers both ways."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_manifest, run_cli, run_cli_in_process, save_with_qloader
from oracle import MODES, assert_same_logits, assert_same_model, assert_same_weights, transformers_load
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig

import qloader

SAVED_MODES = ["nf4", "nf4-dq", "fp4", "int8"]


def check_interop(
    model: str, mode: str, tmp: Path, shard: str, saved: tuple[qloader.LoadResult, Path] | None = None
) -> None:
    """`saved`: the load and checkpoint `save_with_qloader` made for this mode, if a fixture already has them."""
    before, ckpt = saved or save_with_qloader(model, mode, tmp, shard)
    assert before.manifest["saved"]["path"] == str(ckpt.resolve())
    assert [s["name"] for s in before.manifest["stages"]][-1] == "save"

    # qloader saves -> plain transformers loads it with no extra arguments, and qloader reloads it with
    # no quant override (detected from config.json). Weights are compared before any forward pass.
    theirs = transformers_load(ckpt, None)
    again = qloader.load(["model=local", f"model.path={ckpt}"], run_dir=tmp / f"{mode}-reload")
    assert again.manifest["quantization"]["pre_quantized"] is True
    assert again.manifest["quantization"]["description"] == before.manifest["quantization"]["description"]
    assert_same_weights(theirs, before.model)
    assert_same_weights(again.model, before.model)
    assert_same_logits(theirs, before.model)
    assert_same_logits(again.model, before.model)

    # plain transformers quantizes and saves -> qloader loads it
    reference = transformers_load(before.checkpoint_path, MODES[mode][1])
    reference.save_pretrained(tmp / f"{mode}-hf", max_shard_size=shard)
    ours = qloader.load(["model=local", f"model.path={tmp / f'{mode}-hf'}"], run_dir=tmp / f"{mode}-from-hf")
    assert_same_model(ours.model, reference)


@pytest.mark.parametrize("mode", SAVED_MODES)
def test_tiny_llama_round_trips_both_ways(mode: str, tmp_path) -> None:
    check_interop("model=tiny-llama", mode, tmp_path, shard="30KB")


@pytest.mark.smollm2
@pytest.mark.parametrize(  # the other modes' SmolLM2 round trips repeat what the tiny ones cover: `make test-slow`
    "mode", [pytest.param(m, marks=() if m == "nf4-dq" else pytest.mark.slow) for m in SAVED_MODES]
)
def test_smollm2_round_trips_both_ways(mode: str, smollm2_checkpoint, tmp_path, request) -> None:
    saved = request.getfixturevalue("smollm2_nf4_dq_saved") if mode == "nf4-dq" else None
    check_interop("model=smollm2-135m", mode, tmp_path, shard="40MB", saved=saved)


@pytest.mark.smollm2
def test_saved_smollm2_carries_its_tokenizer(smollm2_checkpoint, smollm2_nf4_dq_saved) -> None:
    _, ckpt = smollm2_nf4_dq_saved
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ckpt / name).read_bytes() == (smollm2_checkpoint / name).read_bytes()


@pytest.mark.smollm2
def test_probe_on_a_prequantized_checkpoint_scores_perplexity_only(smollm2_nf4_dq_saved, tmp_path) -> None:
    _, ckpt = smollm2_nf4_dq_saved
    probe = qloader.load(
        ["model=local", f"model.path={ckpt}", "probe=quick", "probe.decode_tokens=4"], run_dir=tmp_path / "p"
    ).manifest["probe"]
    assert probe["perplexity"] > 1 and probe["top1_agreement"] is None and "Paris" in probe["sample"]["output"]


@pytest.fixture(scope="module")
def nf4_checkpoint(tmp_path_factory) -> Path:
    """tiny-llama saved by qloader in nf4 with double quant, in several shards."""
    _, ckpt = save_with_qloader("model=tiny-llama", "nf4-dq", tmp_path_factory.mktemp("nf4"), shard="30KB")
    return ckpt


def test_quant_auto_loads_as_saved_and_records_it(nf4_checkpoint, tmp_path) -> None:
    """The default quant=auto takes the checkpoint's config whole; a qloader setting such as quant.kernel is no
    request to merge (it used to be told apart by matching the command line's strings)."""
    result = qloader.load(["model=local", f"model.path={nf4_checkpoint}", "quant.kernel=fused"], run_dir=tmp_path)
    manifest = result.manifest
    assert manifest["config"]["quant"]["auto"] is True and manifest["choices"]["quant"] == "auto"
    assert manifest["quantization"]["pre_quantized"] is True and manifest["quantization"]["merge"] == []


def test_quant_chosen_by_an_experiments_defaults_is_a_request(nf4_checkpoint, tmp_path) -> None:
    """An experiment that picks `quant` in its defaults list asks for it as much as `quant=` on the command line."""
    experiment = tmp_path / "conf" / "experiment"
    experiment.mkdir(parents=True)
    (experiment / "fp4.yaml").write_text("# @package _global_\ndefaults:\n  - override /quant: bnb-fp4\n")
    overrides = ["model=local", f"model.path={nf4_checkpoint}", "+experiment=fp4"]
    result = run_cli_in_process(*overrides, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", run_dir=tmp_path / "run")
    assert result.returncode == 1
    assert "QuantizationMismatchError" in result.stderr and "checkpoint nf4, requested fp4" in result.stderr
    assert read_manifest(tmp_path / "run")["config"]["quant"]["auto"] is False


def test_merge_lists_every_difference_and_checkpoint_wins(nf4_checkpoint, tmp_path) -> None:
    overrides = ["quant=bnb-nf4", "quant.bnb_4bit_compute_dtype=float16", "quant.llm_int8_threshold=5.0"]
    result = run_cli_in_process("model=local", f"model.path={nf4_checkpoint}", *overrides, run_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "quant.bnb_4bit_compute_dtype: checkpoint 'bfloat16', requested 'float16' -> using 'bfloat16'" in (
        result.stdout + result.stderr
    )
    merge = read_manifest(tmp_path)["quantization"]["merge"]
    assert merge == [
        {"field": "llm_int8_threshold", "checkpoint": 6.0, "user": 5.0, "used": 6.0},
        {"field": "bnb_4bit_compute_dtype", "checkpoint": "bfloat16", "user": "float16", "used": "bfloat16"},
    ]


def test_merged_load_equals_transformers_with_the_same_request(nf4_checkpoint, tmp_path) -> None:
    ours = qloader.load(
        ["model=local", f"model.path={nf4_checkpoint}", "quant=bnb-nf4", "quant.bnb_4bit_compute_dtype=float16"],
        run_dir=tmp_path,
    )
    request = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16,
    )
    reference = transformers_load(nf4_checkpoint, None)
    reference_with_request = type(reference).from_pretrained(
        nf4_checkpoint, quantization_config=request, device_map="auto", dtype=torch.bfloat16
    )
    assert_same_model(ours.model, reference_with_request)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["quant=bnb-int8"], "quant.load_in_4bit: checkpoint True, requested False"),
        (
            ["quant=bnb-fp4", "quant.bnb_4bit_use_double_quant=true"],
            "quant.bnb_4bit_quant_type: checkpoint nf4, requested fp4",
        ),
        (["quant=none"], "quant=none asks for unquantized weights"),
    ],
)
def test_contradicting_request_names_both_sides(nf4_checkpoint, tmp_path, overrides, fragment) -> None:
    result = run_cli_in_process("model=local", f"model.path={nf4_checkpoint}", *overrides, run_dir=tmp_path)
    assert result.returncode == 1
    assert "QuantizationMismatchError" in result.stderr and fragment in result.stderr
    assert f"{nf4_checkpoint}/config.json is pre-quantized" in result.stderr
    manifest = read_manifest(tmp_path)
    assert manifest["status"] == "failed" and manifest["error"]["stage"] == "resolve"


def test_unknown_quant_method_is_named(nf4_checkpoint, tmp_path) -> None:
    broken = tmp_path / "ckpt"
    shutil.copytree(nf4_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "magic", "bits": 3}
    (broken / "config.json").write_text(json.dumps(config))
    result = run_cli_in_process("model=local", f"model.path={broken}", run_dir=tmp_path / "run")
    assert result.returncode == 1
    assert f"{broken}/config.json: quantization_config.quant_method 'magic' is not a method" in result.stderr
    assert read_manifest(tmp_path / "run")["error"]["type"] == "CheckpointError"


def test_shard_missing_quant_state_is_named(nf4_checkpoint, tmp_path) -> None:
    broken = tmp_path / "ckpt"
    shutil.copytree(nf4_checkpoint, broken)
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.0.self_attn.q_proj.weight.absmax"
    shard = broken / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    weight_shard = broken / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]

    result = run_cli_in_process("model=local", f"model.path={broken}", run_dir=tmp_path / "run")
    assert result.returncode == 1
    assert f"{weight_shard}: tensor '{key}' is missing" in result.stderr
    manifest = read_manifest(tmp_path / "run")
    assert (manifest["error"]["type"], manifest["error"]["stage"]) == ("CheckpointError", "load")


def test_save_dir_must_be_new(tmp_path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    result = run_cli_in_process("model=tiny-llama", "save.enabled=true", f"save.dir={taken}", run_dir=tmp_path / "run")
    assert result.returncode == 1
    assert f"save.dir '{taken}' already exists and is not empty" in result.stderr
    assert (taken / "x").read_text() == "keep me" and read_manifest(tmp_path / "run")["checkpoint"] is None


WIDE = [
    "model=tiny-llama",
    "model.hidden_size=1024",
    "model.intermediate_size=2816",
    "model.num_hidden_layers=4",
    "model.num_attention_heads=8",
    "model.num_key_value_heads=4",
    "model.max_shard_size=30MB",
]


@pytest.mark.slow  # a real process of its own (signals, umask, import side effects): make test-slow
def test_prequantized_load_never_materializes_full_precision(tmp_path) -> None:
    """The default tiny model is too small to tell; a wider one (about 93 MB of bf16 linears) can."""
    overrides, _ = MODES["nf4-dq"]
    ckpt = tmp_path / "wide-nf4"
    saved = qloader.load(
        [*WIDE, *overrides, "save.enabled=true", f"save.dir={ckpt}", "save.max_shard_size=8MB"], run_dir=tmp_path / "s"
    )
    bf16_bytes = sum(
        m.weight.quant_state.shape.numel() * 2 for m in saved.model.modules() if type(m).__name__ == "Linear4bit"
    )
    del saved

    # A fresh process: its memory holds nothing an earlier load freed, so the load stage's anonymous peak is its own
    # (in this process, a dequantizing load could reuse the freed pages and pass unseen).
    result = run_cli("model=local", f"model.path={ckpt}", run_dir=tmp_path / "reload")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "reload")
    load = next(s for s in manifest["stages"] if s["name"] == "load")
    largest_shard = max(f["size"] for f in manifest["checkpoint"]["files"] if f["name"].endswith(".safetensors"))
    bound = manifest["model"]["footprint_bytes"] + largest_shard + 16 * 2**20  # allocator-noise margin
    assert bf16_bytes > bound  # a load that dequantized would break the bound
    assert load["anon_peak_bytes"] - load["anon_start_bytes"] <= bound
