"""Plan mode: the cost of a load, known before loading, from the meta skeleton alone."""

from __future__ import annotations

import pytest
from conftest import read_manifest, run_cli_in_process

import qloader
from qloader.core.exits import PLAN_DOES_NOT_FIT
from qloader.core.names import STAGE_NAMES


@pytest.fixture(scope="module")
def loaded_manifest(tmp_path_factory):
    """The manifest of a full load of `model` in `quant`, loaded once per module: the tests only read it."""
    manifests: dict[tuple[str, str], dict] = {}

    def load(model: str, quant: str) -> dict:
        if (model, quant) not in manifests:
            run_dir = tmp_path_factory.mktemp(f"{model}-{quant}")
            manifests[model, quant] = qloader.load([f"model={model}", f"quant={quant}"], run_dir=run_dir).manifest
        return manifests[model, quant]

    return load


@pytest.mark.parametrize("quant", ["none", "bnb-nf4", "bnb-int8"])
@pytest.mark.parametrize("model", ["tiny-llama", pytest.param("smollm2-135m", marks=pytest.mark.smollm2)])
def test_planned_footprint_is_within_10_percent_of_measured(model: str, quant: str, loaded_manifest) -> None:
    manifest = loaded_manifest(model, quant)
    planned, measured = manifest["plan"]["footprint_bytes"], manifest["model"]["footprint_bytes"]
    assert abs(planned - measured) <= 0.10 * measured, (planned, measured)
    assert manifest["plan"]["peak_load_bytes"] > planned and manifest["plan"]["fits"] is True


def test_plan_mode_stops_after_preprocess_and_reads_no_tensor_data(tmp_path) -> None:
    result = run_cli_in_process(
        "mode=plan", "model=tiny-llama", "quant=bnb-nf4", "device_map.max_memory.cpu=2GiB", run_dir=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "qloader plan: device_map {'': 'cpu'}" in result.stdout and "fits max_memory           yes" in result.stdout
    manifest = read_manifest(tmp_path)
    assert manifest["mode"] == "plan" and manifest["status"] == "succeeded"
    assert [s["name"] for s in manifest["stages"]] == list(STAGE_NAMES[:5])
    assert manifest["model"] is None and manifest["weights_fingerprint"] is None
    assert all(f["sha256"] is None for f in manifest["checkpoint"]["files"])  # no file was read to hash it
    cpu = manifest["plan"]["devices"]["cpu"]
    assert cpu["quantized_bytes"] > 0 and cpu["quant_state_bytes"] > 0 and cpu["unquantized_bytes"] > 0
    assert manifest["plan"]["budgets"] == {"cpu": 2 * 2**30}


@pytest.mark.smollm2
def test_plan_mode_on_smollm2_matches_a_full_load(smollm2_checkpoint, loaded_manifest, tmp_path) -> None:
    plan = run_cli_in_process("mode=plan", "model=smollm2-135m", "quant=bnb-nf4", run_dir=tmp_path / "plan")
    assert plan.returncode == 0, plan.stderr
    planned = read_manifest(tmp_path / "plan")["plan"]["footprint_bytes"]
    loaded = loaded_manifest("smollm2-135m", "bnb-nf4")["model"]["footprint_bytes"]
    assert abs(planned - loaded) <= 0.10 * loaded


def test_plan_that_does_not_fit_exits_3_with_the_shortfall_and_why_a_load_is_refused(tmp_path) -> None:
    result = run_cli_in_process(
        "mode=plan", "model=tiny-llama", "quant=none", "device_map.max_memory.cpu=100KB", run_dir=tmp_path
    )
    assert result.returncode == PLAN_DOES_NOT_FIT == 3, result.stderr
    assert "does not fit: short on disk by 0.3 MiB (no offload_folder)" in result.stdout
    assert "a load is refused:" in result.stdout and "could not be placed" in result.stdout
    manifest = read_manifest(tmp_path)
    assert (manifest["mode"], manifest["status"]) == ("plan", "succeeded")
    plan = manifest["plan"]
    assert plan["fits"] is False and plan["budgets"]["disk"] == 0 and plan["shortfall_bytes"]["disk"] > 0
    assert plan["budget_sources"]["disk"] == "no offload_folder" and len(plan["refusals"]) == 1


def test_load_that_does_not_fit_is_refused_before_reading_a_weight(tmp_path) -> None:
    overrides = ["model=tiny-llama", "quant=none", "device_map=cpu", "device_map.max_memory.cpu=100KB"]
    plan = run_cli_in_process("mode=plan", *overrides, run_dir=tmp_path / "plan")
    assert plan.returncode == 3 and "does not fit: short on cpu by" in plan.stdout
    short = read_manifest(tmp_path / "plan")["plan"]["shortfall_bytes"]["cpu"]
    result = run_cli_in_process(*overrides, run_dir=tmp_path / "load")
    assert result.returncode == 1
    line = result.stderr.splitlines()[0]
    assert line.startswith("qloader: error: DeviceMapError: the plan does not fit device_map.max_memory: cpu needs")
    assert f"(short by {short:,} B)" in line and f"device_map.max_memory.cpu={short + 100_000} at least" in line
    manifest = read_manifest(tmp_path / "load")
    assert (manifest["status"], manifest["error"]["type"], manifest["error"]["stage"]) == (
        "failed",
        "DeviceMapError",
        "preprocess",
    )
    assert [s["name"] for s in manifest["stages"]] == list(STAGE_NAMES[:5])  # `load` never began


def test_load_that_does_not_fit_with_device_map_auto_still_fails_in_device_map(tmp_path) -> None:
    result = run_cli_in_process("model=tiny-llama", "quant=none", "device_map.max_memory.cpu=100KB", run_dir=tmp_path)
    assert result.returncode == 1
    assert "DeviceMapError" in result.stderr and "the model does not fit" in result.stderr
    assert "short by" in result.stderr and "could not be placed" in result.stderr
    manifest = read_manifest(tmp_path)
    assert (manifest["status"], manifest["error"]["stage"]) == ("failed", "device_map")


def test_a_plan_that_does_not_fit_lists_the_methods_that_would(tmp_path) -> None:
    budget = ["model=tiny-llama", "device_map=cpu", "device_map.max_memory.cpu=200KB"]
    result = run_cli_in_process("mode=plan", "quant=none", *budget, run_dir=tmp_path / "none")
    assert result.returncode == PLAN_DOES_NOT_FIT
    advice = read_manifest(tmp_path / "none")["plan"]["advice"]
    nf4 = run_cli_in_process("mode=plan", "quant=bnb-nf4", *budget, run_dir=tmp_path / "nf4")
    assert nf4.returncode == 0
    nf4_plan = read_manifest(tmp_path / "nf4")["plan"]
    assert {
        "quant": "bnb-nf4",
        "footprint_bytes": nf4_plan["footprint_bytes"],
        "devices": {"cpu": nf4_plan["footprint_bytes"]},
        "fewest_gpus": None,  # no GPU budgets
    } in advice
    assert all(row["footprint_bytes"] <= 200_000 for row in advice)
    assert not {"none", "auto", "bnb-int8"} & {row["quant"] for row in advice}  # int8 is 9,600 B short here
    assert "would fit instead         quant=" in result.stdout and "quant=bnb-nf4 (0.2 MiB)" in result.stdout
    assert read_manifest(tmp_path / "nf4")["plan"]["advice"] is None  # asked only when it does not fit


def test_the_plan_for_cpu_and_disk_budgets_is_the_map_the_load_uses(tmp_path) -> None:
    budget = ["model=tiny-llama", "quant=none", "device_map.max_memory.cpu=200KB"]
    budget += [f"device_map.offload_folder={tmp_path / 'offload'}"]
    planned = run_cli_in_process("mode=plan", *budget, run_dir=tmp_path / "plan")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    plan = read_manifest(tmp_path / "plan")["plan"]
    assert {"cpu", "disk"} <= set(plan["device_map"].values()) and "on disk:" in planned.stdout
    loaded = qloader.load(budget, run_dir=tmp_path / "load").manifest
    assert loaded["plan"]["device_map"] == plan["device_map"] == loaded["model"]["device_map"]
    assert loaded["plan"]["devices"] == plan["devices"]
