"""Every model family transformers quantizes: model.task picks the class, and the load equals plain transformers.

Tiny seeded checkpoints (tests/families.py) of GPT-2 (Conv1D), T5, BART, BERT for sequence classification,
Whisper, Llava, Mixtral (MoE), Qwen2 and Phi-3, each loaded with model.task=auto, unquantized, in nf4 and in
int8: every tensor and the model's output `torch.equal` to `<AutoClass>.from_pretrained` with the same settings.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from families import FAMILIES, mixtral_8x7b_shapes, write_shape_only_checkpoint
from oracle import (
    MODES,
    assert_same_logits,
    assert_same_model,
    assert_same_weights,
    cpu_forward_refusals,
    transformers_load,
)

import qloader
from qloader.core.errors import CheckpointError, CheckpointMismatchError, ConfigError, ProbeError
from qloader.runs.manifest import manifest_schema
from qloader.runs.summary import render

GiB = 2**30


@pytest.fixture(scope="session")
def checkpoint(family_checkpoint):
    """family name -> its checkpoint folder, written once per session (conftest's `family_checkpoint`)."""
    return family_checkpoint


def load(folder: Path, run_dir: Path, *overrides: str):
    """A qloader load of `folder`; its manifest, as written, must match the shipped JSON Schema."""
    import jsonschema

    from qloader.runs.manifest import manifest_schema

    result = qloader.load(["model=local", f"model.path={folder}", *overrides], run_dir=run_dir)
    jsonschema.validate(json.loads((run_dir / "manifest.json").read_text()), manifest_schema())
    return result


@pytest.mark.parametrize("mode", ["none", "nf4", "int8"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_equals_transformers(name: str, mode: str, checkpoint, tmp_path) -> None:
    family, folder = FAMILIES[name], checkpoint(name)
    overrides, bnb_kwargs = MODES[mode]
    result = load(folder, tmp_path, *overrides)
    model = result.manifest["model"]
    assert (model["class"], model["task"], model["auto_class"]) == (family.model_class, family.task, family.auto_class)
    assert model["requested_task"] == "auto" and model["chosen_by"] == "architectures"
    theirs = transformers_load(folder, bnb_kwargs, auto_class=family.auto_class)
    assert_same_weights(result.model, theirs)
    if refused := cpu_forward_refusals(theirs):  # AVX512-BF16 CPUs: bitsandbytes cannot run these shapes
        assert_forward_limit(result.manifest["warnings"], refused)
    else:
        assert result.manifest["warnings"] == []
        assert_same_logits(result.model, theirs, inputs=family.inputs(theirs), output=family.output)
    if mode != "none":
        assert model["quantized_modules"] > 0


def assert_forward_limit(warnings: list[str], modules: set[str]) -> None:
    """One warning, one line, naming exactly `modules` as the ones whose forward cannot run, and the fix."""
    (warning,) = warnings
    assert "\n" not in warning and warning.startswith(f"quant bitsandbytes: {len(modules)} quantized module(s) load")
    fix = re.search(r"; to run it here, keep them unquantized: quant\.llm_int8_skip_modules=\[([^]]*)\]$", warning)
    assert fix is not None and modules <= set(fix.group(1).split(",")), warning


def test_gpt2_conv1d_in_fp4_equals_transformers(checkpoint, tmp_path) -> None:
    """Conv1D weights are stored [in, out]; the quantizer transposes them into Linear4bit [out, in]."""
    overrides, bnb_kwargs = MODES["fp4"]
    result = load(checkpoint("gpt2"), tmp_path, *overrides)
    theirs = transformers_load(checkpoint("gpt2"), bnb_kwargs)
    assert_same_model(result.model, theirs, inputs=FAMILIES["gpt2"].inputs(theirs))
    assert result.manifest["model"]["quantized_module_classes"] == {"Linear4bit": 8}  # 2 layers x 4 Conv1D


@pytest.mark.parametrize("mode", ["none", "nf4"])
def test_gpt2_checkpoint_with_a_transposed_conv1d_weight_is_refused(mode: str, checkpoint, tmp_path) -> None:
    """The header check compares with the checkpoint-side shape ([in, out]) whether or not the load quantizes."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(checkpoint("gpt2"), tmp_path / "gpt2"))
    tensors = load_file(folder / "model.safetensors")
    key = "transformer.h.0.attn.c_attn.weight"
    tensors[key] = tensors[key].T.contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=rf"{key}: checkpoint \[192, 64\], model \[64, 192\]"):
        load(folder, tmp_path / "run", *MODES[mode][0])


# model.task: explicit tasks, disagreement with config.json, remote code ----------------------------------------


def test_explicit_task_builds_its_auto_class(checkpoint, tmp_path) -> None:
    result = load(checkpoint("t5"), tmp_path, "model.task=seq2seq-lm", "quant=bnb-nf4")
    model = result.manifest["model"]
    assert (model["class"], model["task"]) == ("T5ForConditionalGeneration", "seq2seq-lm")
    assert model["chosen_by"] == "model.task"


def test_task_without_a_class_for_the_model_names_the_task_to_use(checkpoint, tmp_path) -> None:
    with pytest.raises(ConfigError) as raised:
        load(checkpoint("t5"), tmp_path, "model.task=causal-lm")
    message = str(raised.value)
    assert "model.task=causal-lm: transformers' AutoModelForCausalLM has no class for config.json model_type 't5'" in (
        message
    )
    assert "use model.task=seq2seq-lm (the task of T5ForConditionalGeneration) or model.task=auto" in message
    assert json.loads((tmp_path / "manifest.json").read_text())["error"]["stage"] == "resolve"


def test_task_that_disagrees_with_architectures_says_which_task_to_use(checkpoint, tmp_path) -> None:
    with pytest.raises(CheckpointMismatchError) as raised:
        load(checkpoint("bert-cls"), tmp_path, "model.task=causal-lm", "quant=bnb-nf4")
    message = str(raised.value)
    assert "the weights do not fit BertLMHeadModel" in message
    assert (
        "config.json architectures names BertForSequenceClassification, but model.task=causal-lm builds "
        "BertLMHeadModel: use model.task=sequence-classification (or model.task=auto)"
    ) in message


def test_bad_task_fails_at_compose_listing_the_choices() -> None:
    from hydra.errors import ConfigCompositionException

    from qloader.config.compose import compose

    with pytest.raises(ConfigCompositionException) as raised:
        compose(["model=tiny-llama", "model.task=seq2seq"])
    cause = str(raised.value.__cause__)
    assert "Invalid value 'seq2seq', expected one of [auto, causal-lm, seq2seq-lm, masked-lm," in cause
    assert "image-text-to-text, base]" in cause


def test_task_choices_are_transformers_auto_classes() -> None:
    import transformers

    from qloader.config.schema import Task
    from qloader.core.names import TASK_AUTO_CLASSES
    from qloader.runs.manifest import manifest_schema

    assert [task.value for task in Task] == ["auto", *TASK_AUTO_CLASSES]
    assert all(hasattr(transformers, auto) for auto in TASK_AUTO_CLASSES.values())
    # the manifest's JSON Schema takes its task enum from the same names
    tasks = manifest_schema()["$defs"]["task"]["enum"]
    assert tasks[:-1] == list(TASK_AUTO_CLASSES) and tasks[-1] is None


def test_no_architectures_falls_back_to_causal_lm_or_names_the_tasks(checkpoint, tmp_path) -> None:
    folder = Path(shutil.copytree(checkpoint("t5"), tmp_path / "t5"))
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"names no architectures.*has no causal-LM class.*model.task=seq2seq-lm"):
        load(folder, tmp_path / "t5-run")
    qwen = Path(shutil.copytree(checkpoint("qwen2"), tmp_path / "qwen2"))
    config = json.loads((qwen / "config.json").read_text())
    del config["architectures"]
    (qwen / "config.json").write_text(json.dumps(config))
    model = load(qwen, tmp_path / "qwen-run", "quant=none").manifest["model"]
    assert (model["class"], model["task"], model["chosen_by"]) == ("Qwen2ForCausalLM", "causal-lm", "fallback")


MODELING = """
from transformers import T5ForConditionalGeneration


class MySeq2Seq(T5ForConditionalGeneration):
    pass
"""


def test_auto_map_class_for_the_task_when_trusted(checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = Path(shutil.copytree(checkpoint("t5"), tmp_path / "t5"))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSeq2SeqLM": "modeling_my.MySeq2Seq"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_my.py").write_text(MODELING)
    for task in ("auto", "seq2seq-lm"):
        overrides = ["model.trust_remote_code=true", f"model.task={task}", "quant=none"]
        model = load(folder, tmp_path / task, *overrides).manifest["model"]
        assert (model["class"], model["task"], model["chosen_by"]) == ("MySeq2Seq", "seq2seq-lm", "auto_map")


def test_probe_refuses_a_task_it_cannot_score_before_loading(checkpoint, tmp_path) -> None:
    with pytest.raises(ProbeError, match=r"cannot probe model.task speech-seq2seq \(WhisperForConditionalGeneration\)"):
        load(checkpoint("whisper"), tmp_path, "probe=quick")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["error"]["stage"] == "resolve" and [s["name"] for s in manifest["stages"]] == ["resolve"]


@pytest.mark.parametrize(
    ("name", "max_tokens"), [("qwen2", 64), ("t5", 96), ("bert-cls", 128)], ids=["causal-lm", "seq2seq", "classifier"]
)
def test_probe_per_task(name: str, max_tokens: int, checkpoint, tmp_path) -> None:
    """Unquantized: full agreement with its own reference (computed in a fresh process); nf4: close to it."""
    probe = ["probe=quick", f"probe.max_tokens={max_tokens}", "probe.max_new_tokens=4", "probe.decode_tokens=6"]
    unquantized = load(checkpoint(name), tmp_path / "none", "quant=none", *probe).manifest
    jsonschema.validate(unquantized, manifest_schema())
    none = unquantized["probe"]
    nf4_settings = ["quant=bnb-nf4"]
    theirs = transformers_load(checkpoint(name), MODES["nf4"][1], auto_class=FAMILIES[name].auto_class)
    if refused := sorted(cpu_forward_refusals(theirs)):  # AVX512-BF16 CPUs: the classifier's 3 rows; refused first
        with pytest.raises(ProbeError, match=r"^probe=quick cannot run the model on this host: ") as raised:
            load(checkpoint(name), tmp_path / "refused", *nf4_settings, *probe)
        fix = f"quant.llm_int8_skip_modules=[{','.join(refused)}]"
        assert f"{', '.join(refused)} (out_features 3 is not a multiple of 32)" in str(raised.value)
        assert f"{fix[:-1]}" in str(raised.value) and "\n" not in str(raised.value)
        manifest = json.loads((tmp_path / "refused" / "manifest.json").read_text())
        assert manifest["error"]["stage"] == "preprocess"  # before any shard is read
        nf4_settings.append(fix)  # what the refusal says to do
    nf4 = load(checkpoint(name), tmp_path / "nf4", *nf4_settings, *probe).manifest["probe"]
    task = FAMILIES[name].task
    assert none["task"] == nf4["task"] == task
    assert none["top1_agreement"] == 1.0 and none["mean_kl"] == 0.0  # its reference: computed, or cached before
    assert nf4["reference_cached"] is True and 0 <= nf4["top1_agreement"] <= 1 and nf4["mean_kl"] >= 0
    assert nf4["sample"]["output"] is not None
    if task == "sequence-classification":  # labels of each 32-token chunk: no perplexity
        assert none["perplexity"] is None and none["text_tokens"] == max_tokens
        assert none["sample"]["output"] in {"LABEL_0", "LABEL_1", "LABEL_2"}
    else:
        assert none["perplexity"] == none["reference_perplexity"] and nf4["perplexity"] > 1
    for speed in (none["speed"], nf4["speed"]):  # the generation's speed, after the sample as warm-up
        assert speed["prompt_tokens"] > 0 and speed["prefill_tokens_per_s"] > 0 and speed["device"] == "cpu"
        assert speed["peak_anon_bytes"] is None or speed["peak_anon_bytes"] > 0
        if task == "sequence-classification":  # a forward, nothing generated
            assert speed["new_tokens"] is speed["decode_tokens_per_s"] is speed["decode_s"] is None
            assert speed["decode"].startswith("not applicable")
        else:  # exactly probe.decode_tokens, EOS suppressed
            assert speed["new_tokens"] == 6 and speed["decode_tokens_per_s"] > 0 and speed["decode_s"] > 0
    printed = render(unquantized)
    assert f"prefill {none['speed']['prefill_tokens_per_s']} tok/s" in printed
    assert "  generating     peak anon" in printed and "load stage peak anon" in printed
    decode = "decode not applicable" if task == "sequence-classification" else "tok/s (6 new tokens, greedy)"
    assert decode in printed


@pytest.fixture
def avx512_bf16_layers(monkeypatch) -> None:
    """4-bit layers built from now on take the AVX512-BF16 CPU path, whatever this CPU (bitsandbytes' own test,
    forced): the same checks run on both kinds of CPU. Nothing here runs a forward, which would need that CPU."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


def test_forward_limit_is_one_warning_in_the_plan_and_its_fix_clears_it(checkpoint, tmp_path, avx512_bf16_layers):
    """A 3-label head loads in 4-bit, but bitsandbytes' AVX512-BF16 forward cannot take it: mode=plan says so."""
    plan = load(checkpoint("bert-cls"), tmp_path / "plan", "mode=plan", "quant=bnb-nf4").manifest
    assert_forward_limit(plan["warnings"], {"classifier"})
    fix = re.search(r"quant\.llm_int8_skip_modules=\[[^]]*\]$", plan["warnings"][0]).group(0)
    fixed = load(checkpoint("bert-cls"), tmp_path / "fixed", "quant=bnb-nf4", fix)
    assert fixed.manifest["warnings"] == [] and type(fixed.model.classifier).__name__ == "Linear"
    assert fixed.manifest["model"]["quantized_module_classes"] == {"Linear4bit": 13}  # 2 x 6 per layer, the pooler


def test_probe_refuses_a_model_this_cpu_cannot_run_before_loading(checkpoint, tmp_path, avx512_bf16_layers) -> None:
    with pytest.raises(ProbeError) as raised:
        load(checkpoint("bert-cls"), tmp_path, "quant=bnb-nf4", "probe=quick")
    message = str(raised.value)
    assert message.startswith("probe=quick cannot run the model on this host: quant bitsandbytes: 1 quantized module")
    assert "classifier (out_features 3 is not a multiple of 32)" in message and "\n" not in message
    assert "quant.llm_int8_skip_modules=[classifier" in message and message.endswith("(probe=off)")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["error"]["stage"] == "preprocess" and "load" not in [s["name"] for s in manifest["stages"]]


# MoE honesty, parameter counts -------------------------------------------------------------------------------


def test_moe_experts_kept_unquantized_say_why(checkpoint, tmp_path) -> None:
    from qloader.runs.summary import render

    manifest = load(checkpoint("mixtral"), tmp_path, "quant=bnb-nf4").manifest
    kept = {g["modules"]: g for g in manifest["model"]["kept"]}
    experts = kept["2 experts blocks"]
    assert (experts["module_class"], experts["reason"]) == ("MixtralExperts", "fused 3-D expert weights are not Linear")
    assert experts["parameters"] == 2 * 4 * 3 * 64 * 128  # layers x experts x (gate, up, down) x hidden x intermediate
    assert kept["lm_head"]["reason"] == "the output head; transformers keeps it in full precision"
    summary = render(manifest)
    assert "2 experts blocks (MixtralExperts: fused 3-D expert weights are not Linear)" in summary
    assert "% of the parameters" in summary and manifest["plan"]["compression"] < 1.1


def test_parameters_are_logical_and_stored_elements_separate(checkpoint, tmp_path) -> None:
    none = load(checkpoint("qwen2"), tmp_path / "none", "quant=none").manifest["model"]
    nf4 = load(checkpoint("qwen2"), tmp_path / "nf4", "quant=bnb-nf4").manifest["model"]
    assert nf4["parameters"] == none["parameters"] == none["stored_elements"]
    assert nf4["stored_elements"] < nf4["parameters"]  # packed 4-bit: two weights per stored uint8
    gpt2 = load(checkpoint("gpt2"), tmp_path / "gpt2", "quant=none")
    assert gpt2.manifest["model"]["parameters"] == sum(p.numel() for p in gpt2.model.parameters())  # tied once


@pytest.fixture(scope="module")
def mixtral_8x7b(tmp_path_factory) -> Path:
    """Mixtral-8x7B's shapes (46.7B parameters, 87 GiB in bf16) as sparse shards: headers, no data."""
    config, tensors = mixtral_8x7b_shapes()
    return write_shape_only_checkpoint(config, tensors, tmp_path_factory.mktemp("mixtral-8x7b"), shards=32)


def test_mixtral_8x7b_plan_shows_compression_kept_experts_and_host_memory(mixtral_8x7b, tmp_path, monkeypatch) -> None:
    from qloader.measure import plan

    monkeypatch.setattr(plan, "available_bytes", lambda device: 23 * GiB if device == "cpu" else None)
    manifest = load(mixtral_8x7b, tmp_path, "mode=plan", "quant=bnb-nf4", "device_map=cpu").manifest
    planned = manifest["plan"]
    assert (planned["class"], planned["task"]) == ("MixtralForCausalLM", "causal-lm")
    assert planned["compression"] == 1.02 and planned["parameters"] == 46_702_792_704
    experts = next(g for g in planned["kept"] if g["module_class"] == "MixtralExperts")
    assert experts["modules"] == "32 experts blocks" and experts["parameters"] == 32 * 8 * 3 * 4096 * 14336
    assert planned["fits"] is False and planned["budget_sources"] == {"cpu": "available"}
    text = plan.render(planned)
    assert "compression               1.02x" in text and "32 experts blocks (MixtralExperts: fused 3-D" in text
    assert "fits memory               does not fit: short on cpu by" in text and "no max_memory set" in text


def test_mixtral_8x7b_auto_map_without_budget_names_the_available_memory(mixtral_8x7b, tmp_path) -> None:
    import psutil

    if psutil.virtual_memory().available > 80 * GiB or torch.cuda.is_available():
        pytest.skip("this host could hold the model")
    # the plan records the refusal a load gets (a load would first hash the 87 GiB of shards: tests/test_plan.py
    # checks a load's refusal on a small model), and shows what lands on disk
    planned = load(mixtral_8x7b, tmp_path / "plan", "mode=plan", "quant=bnb-nf4", "plan.advice=false").manifest["plan"]
    (refusal,) = planned["refusals"]
    assert "with no max_memory set: the model does not fit the memory available (cpu " in refusal
    assert "allows 0.0 MiB" not in refusal and "short by" in refusal and "could not be placed: lm_head" in refusal
    assert planned["fits"] is False and planned["shortfall_bytes"]["disk"] > 0


# A sweep over model.path ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_over_model_paths_gives_one_summary(checkpoint, tmp_path) -> None:
    from test_sweep import sweep

    paths = ",".join(str(checkpoint(name)) for name in ("t5", "bert-cls"))
    result = sweep("model=local", f"model.path={paths}", "quant=none,bnb-nf4", sweep_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "summary.csv")
    assert list(table["status"]) == ["succeeded"] * 4
    assert list(table["model_class"]) == ["T5ForConditionalGeneration"] * 2 + ["BertForSequenceClassification"] * 2
    assert list(table["task"]) == ["seq2seq-lm"] * 2 + ["sequence-classification"] * 2
    assert list(table["compression"])[0::2] == [1.0, 1.0] and all(c > 1.0 for c in list(table["compression"])[1::2])
