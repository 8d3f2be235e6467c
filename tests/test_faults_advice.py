"""Issue #22, "advice that sends the user the wrong way": every message names the real cause and a fix qloader has.

Each test failed on the release the issue was filed against: a GPU budget blamed on `device_map 'auto'`, transformers'
`pre_quantized=True` and `from_pretrained` advice, loads that quantized nothing or skipped a misspelt module without a
word, an explicit map whose misspelt module placed nothing, replay and report commands that wrote the wrong file,
transformers' "the quantization_config from the model will be used" before qloader's error saying the opposite,
warnings in Hydra's log format, a compressed-tensors progress bar despite TQDM_DISABLE, and a sweep compression from
rounded MiB.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_manifest, run_cli_in_process
from families import FAMILIES, write_checkpoint

import qloader
from qloader.core.errors import ConfigError, DeviceMapError, EnvironmentMismatchError, QuantizationMismatchError
from qloader.runs import replay, report, summary

SKIP_TYPO = "quant.llm_int8_skip_modules=[qproj]"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 (Conv1D projections), as tests/families.py builds it."""
    return write_checkpoint(FAMILIES["gpt2"], tmp_path_factory.mktemp("gpt2") / "checkpoint")


@pytest.fixture(scope="module")
def nf4_checkpoint(tmp_path_factory) -> Path:
    """tiny-llama saved pre-quantized in nf4 by qloader."""
    root = tmp_path_factory.mktemp("nf4")
    qloader.load(
        ["model=tiny-llama", "quant=bnb-nf4", "save.enabled=true", f"save.dir={root / 'checkpoint'}"],
        run_dir=root / "run",
    )
    return root / "checkpoint"


@pytest.fixture(scope="module")
def compressed_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    pytest.importorskip("compressed_tensors")
    from test_compressed_tensors import build_checkpoint

    return build_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("ct") / "checkpoint", "W4A16")


@pytest.fixture(scope="module")
def plan_record(tmp_path_factory) -> Path:
    """A plan-mode run's dir (cheap: headers only)."""
    run_dir = tmp_path_factory.mktemp("recorded") / "run"
    qloader.load(["model=tiny-llama", "quant=bnb-int8", "mode=plan"], run_dir=run_dir)
    return run_dir


def failed_in(run_dir: Path, stage: str) -> None:
    manifest = read_manifest(run_dir)
    assert manifest["status"] == "failed" and manifest["error"]["stage"] == stage


# ---------------------------------------------------------------- what asks for a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_a_gpu_budget_on_a_cpu_host_names_max_memory_not_the_strategy(tmp_path) -> None:
    with pytest.raises(EnvironmentMismatchError) as raised:
        qloader.load(["model=tiny-llama", "quant=none", "device_map.max_memory.0=10GiB"], run_dir=tmp_path / "run")
    message = str(raised.value)
    assert message.startswith("device_map.max_memory.0=10GiB asks for CUDA, but this host has no CUDA device")
    assert "device_map 'auto'" not in message and "use device_map=cpu or device_map=auto" not in message
    assert "device_map.max_memory.0=null" in message and "device_map.max_memory.cpu=SIZE" in message
    failed_in(tmp_path / "run", "validate")
    fixed = ["model=tiny-llama", "quant=none", "device_map.max_memory.0=null", "device_map.max_memory.cpu=2GiB"]
    assert qloader.load(fixed, run_dir=tmp_path / "fixed").manifest["status"] == "succeeded"  # the fix exists


# ---------------------------------------------------------------- pre-quantized-only methods


def test_compressed_tensors_on_a_plain_checkpoint_says_it_loads_pre_quantized_ones_only(tmp_path) -> None:
    pytest.importorskip("compressed_tensors")
    with pytest.raises(ConfigError) as raised:
        qloader.load(["model=tiny-llama", "quant=compressed-tensors"], run_dir=tmp_path / "run")
    message = str(raised.value)
    assert "pre_quantized=True" not in message and "pass `pre_quantized" not in message
    assert "quant compressed-tensors loads pre-quantized checkpoints only" in message
    assert "use another method (quant=bnb-nf4 or quant=torchao-int8wo)" in message
    failed_in(tmp_path / "run", "instantiate")


# ---------------------------------------------------------------- bitsandbytes and offload


def test_bnb_with_disk_offload_is_refused_in_qloader_terms(tmp_path) -> None:
    overrides = [
        "model=tiny-llama",
        "quant=bnb-nf4",
        "device_map.max_memory.cpu=100KB",
        f"device_map.offload_folder={tmp_path / 'offload'}",
    ]
    with pytest.raises(DeviceMapError) as raised:
        qloader.load(overrides, run_dir=tmp_path / "run")
    message = str(raised.value)
    assert "from_pretrained" not in message and "Make sure you have enough GPU RAM" not in message
    assert "llm_int8_enable_fp32_cpu_offload=True" not in message
    assert "quant bitsandbytes cannot offload to disk" in message
    assert "device_map.max_memory" in message and "quant=none" in message
    failed_in(tmp_path / "run", "device_map")


def test_bnb_refusing_cpu_modules_beside_a_gpu_names_qloader_options() -> None:
    """transformers' check of a bitsandbytes map with cpu modules beside a GPU (no GPU is needed to run it)."""
    from transformers import AutoConfig

    from qloader.checkpoint.sources import checkpoint_folder
    from qloader.config.compose import compose
    from qloader.quant import lifecycle

    cfg = compose(["model=tiny-llama", "quant=bnb-nf4"])
    folder = checkpoint_folder(cfg.model)
    hf_config = AutoConfig.from_pretrained(folder)
    quantization = lifecycle.resolve_quantization(cfg.quant, "cuda", hf_config, folder / "config.json")
    quantizer, _, _ = lifecycle.instantiate_quantizer(quantization, torch.bfloat16, hf_config)
    with pytest.raises(DeviceMapError) as raised:
        lifecycle.validate_device_map(quantizer, "auto", {"model": 0, "lm_head": "cpu"})
    message = str(raised.value)
    assert "from_pretrained" not in message and "llm_int8_enable_fp32_cpu_offload=True" not in message
    assert message.startswith("device_map 'auto' places model on cuda:0; lm_head on cpu: quant bitsandbytes refuses")
    assert "quant.llm_int8_enable_fp32_cpu_offload=true" in message and "device_map=explicit" in message


# ---------------------------------------------------------------- nothing quantized


def assert_nothing_quantized(result, *why: str) -> None:
    manifest = result.manifest
    assert manifest["status"] == "succeeded" and manifest["model"]["quantized_modules"] == 0
    lines = [w for w in manifest["warnings"] if w.startswith("nothing was quantized: ")]
    assert len(lines) == 1, manifest["warnings"]
    assert "so the footprint is the unquantized one" in lines[0]
    for part in why:
        assert part in lines[0]
    assert f"  warnings       {lines[0]}" in summary.render(manifest).splitlines()  # the summary shows it


@pytest.mark.parametrize(
    ("quant", "library", "method"),
    [("torchao-int4", "torchao", "torchao"), ("quanto-int4", "optimum.quanto", "optimum-quanto")],
)
def test_a_method_that_leaves_every_conv1d_warns_that_nothing_was_quantized(
    quant: str, library: str, method: str, gpt2, tmp_path
) -> None:
    pytest.importorskip(library)
    result = qloader.load(["model=local", f"model.path={gpt2}", f"quant={quant}"], run_dir=tmp_path / "run")
    assert_nothing_quantized(
        result,
        f"{method} converts nn.Linear layers only",
        "Conv1D",
        "use quant=bnb-nf4, quant=bnb-fp4 or quant=bnb-int8",
    )


def test_an_int4_group_size_that_divides_no_layer_warns_that_nothing_was_quantized(tmp_path) -> None:
    pytest.importorskip("torchao")
    result = qloader.load(
        ["model=tiny-llama", "quant=torchao-int4", "quant.quant_type.group_size=7"], run_dir=tmp_path / "run"
    )
    assert_nothing_quantized(result, "the int4 group_size 7 divides no Linear layer's in_features", "group_size=64")
    fixed = ["model=tiny-llama", "quant=torchao-int4", "quant.quant_type.group_size=64"]
    again = qloader.load(fixed, run_dir=tmp_path / "fixed").manifest
    assert again["model"]["quantized_modules"] > 0 and not again["warnings"]  # the named fix quantizes


def test_plan_mode_warns_that_nothing_would_be_quantized(gpt2, tmp_path) -> None:
    pytest.importorskip("torchao")
    result = qloader.load(["model=local", f"model.path={gpt2}", "quant=torchao-int4", "mode=plan"], run_dir=tmp_path)
    assert [w for w in result.manifest["warnings"] if w.startswith("nothing would be quantized: ")]


# ---------------------------------------------------------------- skip lists


def test_a_skip_name_that_matches_no_module_warns_with_the_nearest_name(tmp_path) -> None:
    result = qloader.load(["model=tiny-llama", "quant=bnb-nf4", SKIP_TYPO], run_dir=tmp_path / "run")
    line = "quant.llm_int8_skip_modules: 'qproj' matches no module of LlamaForCausalLM; did you mean 'q_proj'?"
    (warning,) = [w for w in result.manifest["warnings"] if w.startswith(line)]
    assert "lm_head, which the default keeps unquantized, is no longer skipped" in warning
    assert f"  warnings       {warning}" in summary.render(result.manifest).splitlines()
    fixed = qloader.load(
        ["model=tiny-llama", "quant=bnb-nf4", "quant.llm_int8_skip_modules=[q_proj,lm_head]"], run_dir=tmp_path / "ok"
    )
    assert not fixed.manifest["warnings"]
    kept = {group["modules"] for group in fixed.manifest["model"]["kept"]}
    assert {"2 q_proj blocks", "lm_head"} <= kept


def test_torchao_modules_to_not_convert_that_matches_nothing_warns(tmp_path) -> None:
    pytest.importorskip("torchao")
    overrides = [
        "model=tiny-llama",
        "quant=torchao-int8wo",
        "quant.modules_to_not_convert=[model.layers.0.mlp.gateproj]",
    ]
    result = qloader.load(overrides, run_dir=tmp_path)
    assert any(
        w.startswith("quant.modules_to_not_convert: 'model.layers.0.mlp.gateproj' matches no module")
        and "did you mean 'model.layers.0.mlp.gate_proj'?" in w
        for w in result.manifest["warnings"]
    ), result.manifest["warnings"]


# ---------------------------------------------------------------- explicit device maps


def test_an_explicit_map_naming_no_module_is_refused_with_the_nearest_name(tmp_path) -> None:
    overrides = ["model=tiny-llama", "quant=none", "device_map=explicit", "+device_map.modules={model.layerz: cpu}"]
    with pytest.raises(DeviceMapError) as raised:
        qloader.load(overrides, run_dir=tmp_path / "run")
    assert str(raised.value).startswith(
        "device_map.modules: 'model.layerz' is not a module of LlamaForCausalLM; did you mean 'model.layers'?"
    )
    failed_in(tmp_path / "run", "device_map")


def test_an_explicit_module_without_plus_names_the_override_that_adds_it(tmp_path) -> None:
    override = "device_map.modules.model.layers.0=cpu"
    result = run_cli_in_process("model=tiny-llama", "quant=none", "device_map=explicit", override, run_dir=tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("qloader: error: ConfigError: device_map.modules.model: Key 'model' is not in struct")
    assert line.endswith(f"needs a leading +: +{override}")
    # that override works: the dotted name is the module model.layers.0
    placed = qloader.load(
        ["model=tiny-llama", "quant=none", "device_map=explicit", f"+{override}"], run_dir=tmp_path / "r"
    )
    assert placed.manifest["status"] == "succeeded"
    assert placed.manifest["config"]["device_map"]["modules"]["model"] == {"layers": {"0": "cpu"}}


# ---------------------------------------------------------------- replay and report


def test_write_experiment_to_a_path_without_yaml_writes_what_the_printed_command_runs(plan_record, tmp_path) -> None:
    folder = tmp_path / "conf" / "experiment"
    folder.mkdir(parents=True)
    assert replay.main([str(plan_record / "manifest.json"), "--write-experiment", str(folder / "my-run")]) == 0
    assert (folder / "my-run.yaml").is_file() and not (folder / "my-run").exists()
    printed = run_cli_in_process(
        "--cfg", "job", "--config-dir", str(tmp_path / "conf"), "+experiment=my-run", run_dir=tmp_path
    )
    assert printed.returncode == 0, printed.stderr
    assert "load_in_8bit: true" in printed.stdout


def test_write_experiment_refuses_yml_which_hydra_does_not_read(plan_record, tmp_path, capsys) -> None:
    folder = tmp_path / "experiment"
    folder.mkdir()
    assert replay.main([str(plan_record / "manifest.json"), "--write-experiment", str(folder / "x.yml")]) == 1
    assert "Hydra reads an experiment from NAME.yaml only; name it x.yaml" in capsys.readouterr().err
    assert not any(folder.iterdir())


def test_replay_takes_a_run_dir_for_its_manifest(plan_record, capsys) -> None:
    assert replay.main([str(plan_record), "--check-only"]) == 0, capsys.readouterr().err
    assert "config_hash" in capsys.readouterr().out


def test_replay_of_a_dir_without_a_manifest_says_what_it_expects(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        replay.main([str(tmp_path), "--check-only"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path}' is a directory with no manifest.json; give a run's manifest.json (or its run dir)" in err
    assert "does not exist" not in err


def test_report_refuses_a_single_run_dir_in_one_line_and_writes_nothing(plan_record, capsys) -> None:
    before = sorted(p.name for p in plan_record.iterdir())
    with pytest.raises(SystemExit) as raised:
        report.main([str(plan_record)])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"qloader-report: error: '{plan_record}' is a single run's dir")
    assert "qloader-report takes a sweep dir" in err
    assert sorted(p.name for p in plan_record.iterdir()) == before  # no summary.csv, .md or .png in the run dir


def test_report_refuses_a_dir_with_no_jobs(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        report.main([str(tmp_path)])
    assert "holds no sweep jobs" in capsys.readouterr().err and not list(tmp_path.iterdir())


def job_manifest(status: str, quantization: str, footprint_bytes: int) -> dict:
    return {
        "overrides": [f"quant={quantization}"],
        "status": status,
        "model": {
            "class": "LlamaForCausalLM",
            "task": "causal-lm",
            "dtype": "bfloat16",
            "footprint_bytes": footprint_bytes,
        },
        "plan": {"footprint_bytes": footprint_bytes},
        "quantization": {"description": quantization},
        "checkpoint": {"path": "/checkpoint"},
        "stages": [],
        "error": None,
    }


def test_sweep_compression_is_computed_from_bytes_not_rounded_mib(tmp_path) -> None:
    """Rounded to 0.01 MiB, 15,000 and 10,000 bytes are both 0.01 MiB: 1.0x; the bytes give 1.5x."""
    for job, (quantization, size) in enumerate([("none", 15_000), ("bnb nf4", 10_000)]):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "manifest.json").write_text(json.dumps(job_manifest("succeeded", quantization, size)))
    rows = report.collect(tmp_path)
    assert [r["footprint_mib"] for r in rows] == [0.01, 0.01]
    assert [r["compression"] for r in rows] == [1.0, 1.5]


# ---------------------------------------------------------------- transformers' and qloader's own lines


def test_no_transformers_merge_warning_before_a_quantization_mismatch(nf4_checkpoint, tmp_path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(QuantizationMismatchError, match="checkpoint nf4, requested fp4"):
            qloader.load(["model=local", f"model.path={nf4_checkpoint}", "quant=bnb-fp4"], run_dir=tmp_path / "run")
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "quantization_config` from the model will be used" in m], said


MERGED = ("quant=bnb-nf4", "quant.bnb_4bit_compute_dtype=float16")
MERGE_WARNING = "quant.bnb_4bit_compute_dtype: checkpoint 'bfloat16', requested 'float16' -> using 'bfloat16'"


def test_qloader_warnings_print_as_qloader_lines_and_reach_the_log(nf4_checkpoint, tmp_path) -> None:
    result = run_cli_in_process("model=local", f"model.path={nf4_checkpoint}", *MERGED, run_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"qloader: warning: {MERGE_WARNING}" in result.stderr.splitlines()
    assert "[qloader][WARNING]" not in result.stdout + result.stderr
    assert f"[qloader][WARNING] - {MERGE_WARNING}" in (tmp_path / "qloader.log").read_text()


def test_qloader_warnings_from_python_without_logging_set_up(nf4_checkpoint, tmp_path, monkeypatch, capsys) -> None:
    """`qloader.load` in a script (and a sweep job's own process): nothing configured logging."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    qloader.load(["model=local", f"model.path={nf4_checkpoint}", *MERGED], run_dir=tmp_path)
    warning = MERGE_WARNING
    assert f"qloader: warning: {warning}" in capsys.readouterr().err.splitlines()
    assert f"[qloader][WARNING] - {warning}" in (tmp_path / "qloader.log").read_text()
    assert not logging.getLogger("qloader").handlers  # taken off after the run


def test_compressed_tensors_progress_bar_honours_tqdm_disable(compressed_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    capsys.readouterr()
    qloader.load(["model=local", f"model.path={compressed_checkpoint}"], run_dir=tmp_path)
    assert "Applying quantization config" not in capsys.readouterr().err


@pytest.mark.slow
def test_no_progress_bar_at_all_with_tqdm_disable(compressed_checkpoint, tmp_path) -> None:
    """Set before the process starts, as a user sets it: every bar of a compressed-tensors load stays off."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qloader",
            "model=local",
            f"model.path={compressed_checkpoint}",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "TQDM_DISABLE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "it/s]" not in result.stderr and "%|" not in result.stderr, result.stderr
