"""Bad input: one clear line naming the offending value, a failed manifest, before any expensive work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import read_manifest, run_cli, run_cli_in_process

from qloader.core.names import STAGE_NAMES

CASES = {
    "4bit_and_8bit": (
        ["quant=bnb-nf4", "quant.load_in_8bit=true"],
        "ConfigError",
        "resolve",
        "quant.load_in_4bit and quant.load_in_8bit are both true",
    ),
    "misspelt_key_added_with_plus": (
        ["+quant.bnb_4bit_quant_typ=nf4"],
        "ConfigError",
        "resolve",
        "quant.bnb_4bit_quant_typ is not a field of BnbQuantConfig",
    ),
    "model_local_without_path": (
        ["model=local"],
        "ConfigError",
        "resolve",
        "model.path is required and has no value",
    ),
    "unknown_kernel": (
        ["quant.kernel=triton"],
        "ConfigError",
        "resolve",
        "quant.kernel 'triton' is not one of auto, bnb, fused",
    ),
    "cuda_on_cpu_host": (
        ["device_map=cuda"],
        "EnvironmentMismatchError",
        "validate",
        "device_map 'cuda' asks for CUDA, but this host has no CUDA device",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_clearly_with_failed_manifest(case: str, tmp_path) -> None:
    import torch

    overrides, error_type, stage, message = CASES[case]
    if case == "cuda_on_cpu_host" and torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    result = run_cli_in_process("model=tiny-llama", *overrides, run_dir=tmp_path)
    assert result.returncode == 1
    assert f"qloader: error: {error_type}: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    manifest = read_manifest(tmp_path)
    assert manifest["status"] == "failed"
    assert manifest["error"]["type"] == error_type and manifest["error"]["stage"] == stage
    assert message in manifest["error"]["message"]
    ran = [s["name"] for s in manifest["stages"]]
    assert ran == list(STAGE_NAMES[: STAGE_NAMES.index(stage) + 1])  # nothing after the failing stage
    assert "load" not in ran and manifest["model"] is None


def test_config_errors_come_before_the_checkpoint_is_touched(tmp_path) -> None:
    missing = tmp_path / "never-created"
    result = run_cli_in_process(
        "model=local",
        f"model.path={missing}",
        "quant=bnb-nf4",
        "quant.load_in_8bit=true",
        run_dir=tmp_path / "run",
    )
    assert result.returncode == 1
    manifest = read_manifest(tmp_path / "run")
    assert manifest["error"]["type"] == "ConfigError" and manifest["checkpoint"] is None


def test_all_config_problems_are_reported_together(tmp_path) -> None:
    result = run_cli_in_process(
        "model=tiny-llama",
        "quant.load_in_8bit=true",
        "quant.kernel=triton",
        "validate.finite=maybe",
        "+device_map.spread=2",
        run_dir=tmp_path,
    )
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("qloader: error:")]
    for fragment in ("load_in_4bit and quant.load_in_8bit", "'triton'", "'maybe'", "device_map.spread"):
        assert fragment in line


def test_model_path_without_config_json(tmp_path) -> None:
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    result = run_cli_in_process("model=local", f"model.path={folder}", "quant=none", run_dir=tmp_path / "run")
    assert result.returncode == 1
    assert f"model.path '{folder}' has no config.json" in result.stderr
    manifest = read_manifest(tmp_path / "run")
    assert (manifest["error"]["type"], manifest["error"]["stage"]) == ("CheckpointError", "resolve")


def test_checkpoint_without_weights(tmp_path, tiny_checkpoint) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    result = run_cli_in_process("model=local", f"model.path={folder}", run_dir=tmp_path / "run")
    assert result.returncode == 1
    assert "has no safetensors weights (expected model.safetensors or model.safetensors.index.json)" in result.stderr


def test_unknown_device_map_strategy(tmp_path) -> None:
    result = run_cli_in_process("model=tiny-llama", "device_map.strategy=everywhere", run_dir=tmp_path)
    assert result.returncode == 1
    assert "qloader: error: ConfigError: device_map.strategy: Invalid value 'everywhere', expected one of" in (
        result.stderr
    )


def test_max_memory_too_small_fails_in_device_map(tmp_path) -> None:
    result = run_cli_in_process("model=tiny-llama", "quant=none", "device_map.max_memory.cpu=20KB", run_dir=tmp_path)
    assert result.returncode == 1
    assert "DeviceMapError" in result.stderr and "does not fit" in result.stderr
    assert read_manifest(tmp_path)["error"]["stage"] == "device_map"


# One bad input per error class the CLI reports, in a real `python -m qloader` process: the exit code, the one
# stderr line and the failed manifest as a shell sees them. The tests above check the same paths in this process.


def _composition_error(tmp_path: Path, tiny_checkpoint: Path) -> tuple[list[str], str]:
    return ["model=tiny-llama", "device_map.strategy=everywhere"], "device_map.strategy: Invalid value 'everywhere'"


def _no_config_json(tmp_path: Path, tiny_checkpoint: Path) -> tuple[list[str], str]:
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    return ["model=local", f"model.path={folder}", "quant=none"], f"model.path '{folder}' has no config.json"


def _contradicted_prequantized(tmp_path: Path, tiny_checkpoint: Path) -> tuple[list[str], str]:
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "nf4-config"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (folder / "config.json").write_text(json.dumps(config))
    return ["model=local", f"model.path={folder}", "quant=bnb-int8"], f"{folder}/config.json is pre-quantized"


def _cuda_on_cpu_host(tmp_path: Path, tiny_checkpoint: Path) -> tuple[list[str], str]:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    return ["model=tiny-llama", "device_map=cuda"], "device_map 'cuda' asks for CUDA, but this host has no CUDA device"


def _max_memory_too_small(tmp_path: Path, tiny_checkpoint: Path) -> tuple[list[str], str]:
    return ["model=tiny-llama", "quant=none", "device_map.max_memory.cpu=20KB"], "does not fit"


def _unwritable_save_dir(tmp_path: Path, tiny_checkpoint: Path) -> tuple[list[str], str]:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return ["model=tiny-llama", "save.enabled=true", f"save.dir={blocker}/ckpt"], f"'{blocker}' is not a directory"


PROCESS_CASES = {
    "ConfigError": (_composition_error, None),  # refused while composing: no run dir, no manifest
    "CheckpointError": (_no_config_json, "resolve"),
    "QuantizationMismatchError": (_contradicted_prequantized, "resolve"),
    "EnvironmentMismatchError": (_cuda_on_cpu_host, "validate"),
    "DeviceMapError": (_max_memory_too_small, "device_map"),
    "OutputError": (_unwritable_save_dir, "resolve"),
}


@pytest.mark.slow  # a real process of its own (signals, umask, import side effects): make test-slow
@pytest.mark.parametrize("error_type", list(PROCESS_CASES))
def test_each_error_class_exits_1_with_one_line_from_a_real_process(error_type: str, tmp_path, tiny_checkpoint) -> None:
    make_case, stage = PROCESS_CASES[error_type]
    overrides, message = make_case(tmp_path, tiny_checkpoint)
    run_dir = tmp_path / "run"
    result = run_cli(*overrides, run_dir=run_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("qloader: error:")]
    assert line.startswith(f"qloader: error: {error_type}: ") and message in line
    if stage is None:
        assert not (run_dir / "manifest.json").exists()
        return
    assert f"qloader: manifest (failed): {run_dir / 'manifest.json'}" in result.stderr
    manifest = read_manifest(run_dir)
    assert manifest["status"] == "failed"
    assert (manifest["error"]["type"], manifest["error"]["stage"]) == (error_type, stage)
