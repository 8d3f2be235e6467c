"""Bad input: one clear line naming the offending value, a failed manifest, before any expensive work."""

from __future__ import annotations

import pytest
from conftest import read_manifest, run_cli

from qloader.loading.stages import STAGE_NAMES

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
    result = run_cli("model=tiny-llama", *overrides, run_dir=tmp_path)
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
    result = run_cli(
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
    result = run_cli(
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
    result = run_cli("model=local", f"model.path={folder}", "quant=none", run_dir=tmp_path / "run")
    assert result.returncode == 1
    assert f"model.path '{folder}' has no config.json" in result.stderr
    manifest = read_manifest(tmp_path / "run")
    assert (manifest["error"]["type"], manifest["error"]["stage"]) == ("CheckpointError", "resolve")


def test_checkpoint_without_weights(tmp_path, tiny_checkpoint) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    result = run_cli("model=local", f"model.path={folder}", run_dir=tmp_path / "run")
    assert result.returncode == 1
    assert "has no safetensors weights (expected model.safetensors or model.safetensors.index.json)" in result.stderr


def test_unknown_device_map_strategy(tmp_path) -> None:
    result = run_cli("model=tiny-llama", "device_map.strategy=everywhere", run_dir=tmp_path)
    assert result.returncode == 1
    assert "qloader: error: ConfigError: device_map.strategy: Invalid value 'everywhere', expected one of" in (
        result.stderr
    )


def test_max_memory_too_small_fails_in_device_map(tmp_path) -> None:
    result = run_cli("model=tiny-llama", "quant=none", "device_map.max_memory.cpu=20KB", run_dir=tmp_path)
    assert result.returncode == 1
    assert "DeviceMapError" in result.stderr and "does not fit" in result.stderr
    assert read_manifest(tmp_path)["error"]["stage"] == "device_map"
