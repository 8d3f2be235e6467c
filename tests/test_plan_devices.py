"""Plans for GPUs this host does not have: budgets name them, accelerate places the modules as transformers would."""

from __future__ import annotations

import pytest
import torch
from conftest import read_manifest, run_cli_in_process

from qloader.config.compose import compose

GPUS = ("device_map.max_memory.0=150KiB", "device_map.max_memory.1=80KiB", "device_map.max_memory.cpu=200MiB")


def transformers_device_map(checkpoint, quant: str, max_memory: dict) -> dict:
    """The map `from_pretrained(device_map='auto', max_memory=...)` computes: transformers' own `_get_device_map` on
    the meta skeleton, with the quantizer's preprocessing (the oracle)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations.accelerate import _get_device_map
    from transformers.quantizers.auto import AutoHfQuantizer

    config = AutoConfig.from_pretrained(checkpoint)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    quantizer = None
    if quant == "bnb-nf4":
        quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
        quantizer.preprocess_model(model=model, dtype=torch.bfloat16, device_map="auto", checkpoint_files=None)
    return {name: str(device) for name, device in _get_device_map(model, "auto", dict(max_memory), quantizer).items()}


def test_gpu_budgets_need_no_plus_and_any_index() -> None:
    cfg = compose(["device_map.max_memory.0=80GiB", "device_map.max_memory.1=80GiB", "device_map.max_memory.11=1GiB"])
    assert dict(cfg.device_map.max_memory) == {"cpu": None, "0": "80GiB", "1": "80GiB", "11": "1GiB"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans GPUs this host does not have")
@pytest.mark.parametrize(
    "quant, budgets",
    [
        ("none", {0: "150KiB", 1: "80KiB", "cpu": "200MiB"}),  # spills to cpu
        ("bnb-nf4", {0: "200KiB", 1: "200KiB"}),  # bitsandbytes refuses modules on cpu: GPUs only
    ],
)
def test_plan_places_modules_on_absent_gpus_as_transformers_would(quant, budgets, tiny_checkpoint, tmp_path) -> None:
    settings = [f"device_map.max_memory.{device}={size}" for device, size in budgets.items()]
    result = run_cli_in_process("mode=plan", "model=tiny-llama", f"quant={quant}", *settings, run_dir=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is not available" not in result.stdout + result.stderr  # accelerate's warning, for GPUs named on purpose
    plan = read_manifest(tmp_path)["plan"]
    expected = transformers_device_map(tiny_checkpoint, quant, budgets)
    assert plan["device_map"] == expected
    assert {"0", "1"} <= set(expected.values())  # the budgets do spread the model over both GPUs
    assert plan["hypothetical_devices"] == ["0", "1"] and plan["budgets"]["1"] == int(budgets[1][:-3]) * 1024
    assert list(plan["devices"])[:2] == ["0", "1"] and plan["fits"] is True
    assert "cuda:0*" in result.stdout and "* not on this host" in result.stdout
    if spilled := [m for m, d in expected.items() if d == "cpu"]:
        assert f"on cpu: {', '.join(spilled)} ({len(spilled)} module(s))" in result.stdout
    assert (quant == "none") == bool(spilled)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_a_load_refuses_absent_gpus_in_one_line_naming_the_budgets(tmp_path) -> None:
    result = run_cli_in_process("model=tiny-llama", "quant=none", *GPUS, run_dir=tmp_path)
    assert result.returncode == 1
    line, manifest_line = result.stderr.splitlines()
    assert line.startswith(
        "qloader: error: EnvironmentMismatchError: device_map.max_memory.0=150KiB and device_map.max_memory.1=80KiB "
        "ask for CUDA, but this host has no CUDA device"
    )
    assert "device_map 'auto'" not in line and line.count("drop those GPU budgets") == 1
    assert "device_map.max_memory.0=null device_map.max_memory.1=null" in line and "mode=plan" in line
    assert read_manifest(tmp_path)["error"]["type"] == "EnvironmentMismatchError"


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans GPUs this host does not have")
def test_advice_gives_the_fewest_of_the_budgeted_gpus_each_method_needs(tmp_path) -> None:
    budgets = [f"device_map.max_memory.{gpu}=130KiB" for gpu in range(3)]
    result = run_cli_in_process("mode=plan", "model=tiny-llama", "quant=none", *budgets, run_dir=tmp_path / "none")
    assert result.returncode == 3, result.stderr
    advice = {row["quant"]: row for row in read_manifest(tmp_path / "none")["plan"]["advice"]}
    fewest = advice["bnb-nf4"]["fewest_gpus"]
    assert fewest in (1, 2, 3) and f"quant=bnb-nf4 (0.2 MiB, {fewest} GPU(s))" in result.stdout
    for gpus, fits in ((fewest, 0), (fewest - 1, 3)):  # the first `fewest` GPUs hold it, one fewer does not
        if gpus:
            run = tmp_path / f"nf4-{gpus}"
            asked = [*budgets[:gpus], *(f"device_map.max_memory.{gpu}=null" for gpu in range(gpus, 3))]
            planned = run_cli_in_process("mode=plan", "model=tiny-llama", "quant=bnb-nf4", *asked, run_dir=run)
            assert planned.returncode == fits, planned.stdout
