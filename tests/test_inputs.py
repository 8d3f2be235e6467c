"""Bad input found by users: each is refused in one `qloader: error:` line naming the field and the fix.

Compose-time refusals (a misspelt key, a value outside a choice) come before any run dir exists;
the others leave a `failed` manifest whose `error.type` is a documented qloader class.
"""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import read_manifest, run_cli, run_cli_in_process
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import qloader
from qloader.config.compose import compose, compose_with_choices
from qloader.core.errors import CheckpointError, OutputError
from qloader.runs.manifest import resolved_config


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("qloader: error:")]


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_misspelt_key_is_refused_whatever_the_prefix(prefix: str, tmp_path) -> None:
    """Hydra's own hint ("To append to your config use +quant.bnb_4bit_quant_typ=nf4") led to a silent load."""
    result = run_cli_in_process("model=tiny-llama", f"{prefix}quant.bnb_4bit_quant_typ=nf4", run_dir=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith("qloader: error: ConfigError: quant.bnb_4bit_quant_typ is not a field of BnbQuantConfig")
    assert "(valid: auto, load_in_4bit, " in line and "did you mean quant.bnb_4bit_quant_type?" in line
    if prefix:  # composed (struct mode is lifted for + and ++): refused in resolve, before any file is read
        manifest = read_manifest(tmp_path)
        assert (manifest["status"], manifest["error"]["type"]) == ("failed", "ConfigError")
        assert manifest["checkpoint"] is None and manifest["config"]["quant"]["bnb_4bit_quant_typ"] == "nf4"
    else:  # refused while composing: no run dir
        assert not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("device_map.strategy=everywhere", "[auto, balanced, balanced_low_0, sequential, cpu, cuda, cuda:0,"),
        ("quant.bnb_4bit_quant_type=nf5", "[nf4, fp4]"),
        ("quant.bnb_4bit_compute_dtype=float17", "[bfloat16, float16, float32, float64]"),
        ("quant.bnb_4bit_quant_storage=int3", "[uint8, int8, bfloat16, float16, float32]"),
        ("dtype.name=float17", "[bfloat16, float16, float32, float64, auto, bf16, fp16, fp32]"),
        ("mode=apply", "[load, plan]"),
        ("model.task=chat", "[auto, causal-lm, seq2seq-lm,"),
    ],
)
def test_choice_outside_its_values_fails_at_compose_listing_them(override: str, allowed: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    assert allowed in str(info.value.__cause__)


def test_choice_error_is_one_line_from_the_cli(tmp_path) -> None:
    result = run_cli_in_process("device_map.strategy=everywhere", run_dir=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert error_lines(result.stderr) == [
        "qloader: error: ConfigError: device_map.strategy: Invalid value 'everywhere', expected one of [auto, "
        "balanced, balanced_low_0, sequential, cpu, cuda, cuda:0, cuda:1, cuda:2, cuda:3, cuda:4, cuda:5, cuda:6, "
        "cuda:7, explicit]"
    ]


def test_choice_fields_stay_plain_strings_in_yaml_and_manifest() -> None:
    cfg = compose(["device_map=cuda", "dtype=fp16", "quant=bnb-fp4", "mode=plan"])
    config = resolved_config(cfg)
    values = [config["device_map"]["strategy"], config["dtype"]["name"], config["quant"]["bnb_4bit_quant_type"]]
    assert values == ["cuda", "float16", "fp4"] and config["mode"] == "plan"
    assert all(type(v) is str for v in [*values, config["mode"]])
    assert "strategy: cuda\n" in OmegaConf.to_yaml(cfg) and f"{cfg.device_map.strategy}" == "cuda"


def test_validate_finite_takes_booleans_and_auto_only(tmp_path) -> None:
    assert compose(["validate.finite=false"]).validate.finite is False  # an Enum would refuse a boolean
    result = run_cli_in_process("model=tiny-llama", "validate.finite=maybe", run_dir=tmp_path)
    assert error_lines(result.stderr) == [
        "qloader: error: ConfigError: validate.finite 'maybe' is not one of true, false, auto"
    ]


def test_probe_decode_tokens_below_two_is_refused(tmp_path) -> None:
    """Decoding speed needs a token after the prefill's; off, the probe's fields are not checked."""
    result = run_cli_in_process("model=tiny-llama", "probe=quick", "probe.decode_tokens=1", run_dir=tmp_path)
    assert error_lines(result.stderr) == [
        "qloader: error: ConfigError: probe.decode_tokens 1 is below 2: the first new token comes from the prompt's"
        " forward (prefill), so decoding speed needs at least 2"
    ]
    assert compose(["probe=quick"]).probe.decode_tokens == 32


def test_model_local_without_path_is_one_line(tmp_path) -> None:
    """It was a 25-line MissingMandatoryValue traceback from the model source's instantiate."""
    result = run_cli_in_process("model=local", run_dir=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [
        "qloader: error: ConfigError: model.path is required and has no value; add model.path=... to the command line"
    ]
    manifest = read_manifest(tmp_path)
    assert (manifest["error"]["type"], manifest["error"]["stage"]) == ("ConfigError", "resolve")


def test_quant_auto_is_a_config_fact() -> None:
    cfg, choices = compose_with_choices()
    assert choices["quant"] == "auto" and cfg.quant.auto is True
    assert (cfg.quant.bnb_4bit_quant_type, cfg.quant.bnb_4bit_use_double_quant) == ("nf4", True)  # bnb-nf4's
    assert compose(["quant=bnb-nf4"]).quant.auto is False
    assert compose(["quant=none"]).quant.auto is False


def test_unwritable_save_dir_fails_before_the_checkpoint_is_read(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli_in_process(
        "model=tiny-llama", "save.enabled=true", f"save.dir={blocker}/ckpt", run_dir=tmp_path / "run"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [
        f"qloader: error: OutputError: save.dir '{blocker}/ckpt' cannot be created: '{blocker}' is not a directory; "
        "choose another save.dir"
    ]
    manifest = read_manifest(tmp_path / "run")
    assert (manifest["error"]["type"], manifest["error"]["stage"]) == ("OutputError", "resolve")
    assert manifest["checkpoint"] is None


def test_save_dir_without_room_for_the_planned_footprint_fails_before_loading(tmp_path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    overrides = ["model=tiny-llama", "quant=bnb-nf4", "save.enabled=true", f"save.dir={tmp_path / 'ckpt'}"]
    with pytest.raises(OutputError, match=r"needs about 0\.\d MiB \(the planned footprint\), but .* has 0\.0 MiB free"):
        qloader.load(overrides, run_dir=tmp_path / "run")
    manifest = read_manifest(tmp_path / "run")
    assert manifest["error"]["stage"] == "preprocess" and "load" not in [s["name"] for s in manifest["stages"]]
    assert not (tmp_path / "ckpt").exists()


def test_tokenizer_of_a_checkpoint_without_one_is_a_checkpoint_error(tmp_path) -> None:
    result = qloader.load(["model=tiny-llama", "quant=none", "validate.fingerprint=false"], run_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"has no tokenizer \(none of tokenizer.json, .*\); copy the tokenizer"):
        result.tokenizer()


def test_probe_summary_of_a_prequantized_checkpoint_says_what_was_compared() -> None:
    from qloader.runs.summary import _probe_line

    compared_with = "a pre-quantized checkpoint has no unquantized weights (perplexity and sample only)"
    prequantized = {"perplexity": 46.9, "reference_perplexity": None, "top1_agreement": None, "mean_kl": None}
    line = _probe_line({**prequantized, "compared_with": compared_with})
    assert line == f"perplexity 46.9, not compared: {compared_with}" and "None" not in line
    quantized = {"perplexity": 46.9, "reference_perplexity": 40.3, "top1_agreement": 0.72, "mean_kl": 0.26}
    line = _probe_line({**quantized, "compared_with": "the same checkpoint unquantized (bfloat16)"})
    assert line == (
        "perplexity 46.9 (unquantized 40.3), top-1 agreement 0.72, mean KL 0.26, "
        "against the same checkpoint unquantized (bfloat16)"
    )


def _hub_cache(root: Path, source: Path, repo: str, commit: str) -> Path:
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/...}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return folder


@pytest.mark.slow
def test_hub_model_records_repo_revision_and_commit(tiny_checkpoint, tmp_path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(tmp_path / "hub", tiny_checkpoint, "org/tiny", commit)
    # A process of its own: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, when it is imported.
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    hub = ["model=hub", "model.revision=main", "quant=none", "mode=plan"]
    result = run_cli(*hub, "model.repo_id=org/tiny", run_dir=tmp_path / "run", env=env)
    assert result.returncode == 0, result.stderr
    hub_record = read_manifest(tmp_path / "run")["checkpoint"]["hub"]
    assert hub_record == {"repo_id": "org/tiny", "revision": "main", "commit": commit}
    result = run_cli(*hub, "model.repo_id=org/absent", run_dir=tmp_path / "absent", env=env)
    [line] = error_lines(result.stderr)
    assert line.startswith("qloader: error: CheckpointError: model.repo_id 'org/absent@main' could not be fetched")


def test_misspelt_key_added_with_plus_fails_a_sweep_job_too(tmp_path) -> None:
    """A sweep job re-runs its saved config in a process of its own: it is typed again, so `resolve` sees the key.
    The sweep itself runs in a process too: it installs signal handlers for its whole process."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    overrides = ["-m", "model=tiny-llama", "quant=bnb-nf4", "+quant.bnb_4bit_quant_typ=nf4", "mode=plan"]
    result = subprocess.run(
        [sys.executable, "-m", "qloader", *overrides, f"hydra.sweep.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ,
        timeout=300,
    )
    assert result.returncode == 1
    manifest = read_manifest(tmp_path / "0")
    assert (manifest["status"], manifest["error"]["type"]) == ("failed", "ConfigError")
    assert manifest["error"]["message"].startswith("quant.bnb_4bit_quant_typ is not a field of BnbQuantConfig")
