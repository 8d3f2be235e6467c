"""The CLI end to end: a run dir with Hydra's .hydra/, a manifest and a printed summary."""

from __future__ import annotations

import pytest
import torch
from conftest import read_manifest, run_cli_in_process

import qloader


def test_local_checkpoint_run_writes_run_dir_and_summary(tiny_checkpoint, tmp_path) -> None:
    result = run_cli_in_process("model=local", f"model.path={tiny_checkpoint}", "quant=none", run_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "qloader: loaded LlamaForCausalLM" in result.stdout
    for stage in ("resolve", "instantiate", "validate", "device_map", "preprocess", "load", "postprocess"):
        assert f"\n  {stage} " in result.stdout
    assert (tmp_path / ".hydra" / "config.yaml").is_file() and (tmp_path / ".hydra" / "overrides.yaml").is_file()
    manifest = read_manifest(tmp_path)
    assert manifest["status"] == "succeeded"
    assert manifest["checkpoint"]["path"] == str(tiny_checkpoint)
    assert manifest["quantization"]["method"] == "none" and manifest["model"]["quantized_modules"] == 0


@pytest.mark.parametrize("option", ["auto", "balanced", "sequential", "cpu", "explicit"])
def test_every_device_map_option_lands_on_cpu_here(option: str, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("on a CUDA host these place modules on the GPU")
    result = qloader.load(["model=tiny-llama", "quant=bnb-int8", f"device_map={option}"], run_dir=tmp_path)
    assert result.manifest["model"]["device_map"] == {"": "cpu"}
    assert {p.device.type for p in result.model.parameters()} == {"cpu"}


@pytest.mark.parametrize(
    ("option", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32), ("auto", torch.bfloat16)]
)
def test_dtype_policy_applies_to_unquantized_layers(option: str, dtype: torch.dtype, tmp_path) -> None:
    result = qloader.load(["model=tiny-llama", "quant=bnb-nf4", f"dtype={option}"], run_dir=tmp_path)
    model = result.model
    assert model.model.norm.weight.dtype == dtype and model.lm_head.weight.dtype == dtype
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # packed 4-bit
    assert result.manifest["model"]["dtype"] == str(dtype).removeprefix("torch.")


def test_console_script_runs_the_same_cli(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("qloader")
    result = subprocess.run([script, "--cfg", "job", "model=tiny-llama"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "qloader.checkpoint.sources.tiny_llama_checkpoint" in result.stdout


def test_help_names_the_other_commands(tmp_path) -> None:
    help_out = run_cli_in_process("--help", run_dir=tmp_path).stdout
    assert "qloader replay MANIFEST [--check-only]" in help_out and "qloader-report SWEEP_DIR" in help_out


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("qloader replay --c", "--check-only"),
        ("qloader replay --", "--check-only --run-dir --save-dir"),
        ("qloader replay ", ""),
    ],
)
def test_completion_after_replay_offers_its_options_not_a_parse_error(line: str, expected: str) -> None:
    """Completion used to print a Hydra parse error; with no option to offer, the shell completes file names."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
    result = subprocess.run(
        [sys.executable, "-m", "qloader", "-sc", "query=bash"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.strip().startswith(expected) if expected else result.stdout.strip() == ""


def test_light_entry_points_import_neither_torch_nor_transformers() -> None:
    """`qloader --help`, completion and `qloader-report` must start fast: the heavy libraries load in the stages."""
    import subprocess
    import sys

    code = (
        "import sys, qloader, qloader.cli, qloader.runs.report, qloader.config.compose, qloader.runs.replay; "
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'bitsandbytes') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
