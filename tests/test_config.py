"""Config composition: every shipped YAML composes, and typos fail at compose time."""

from __future__ import annotations

import pytest
from conftest import REPO, run_cli
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from qloader.config.compose import compose
from qloader.config.quant_options import quant_options
from qloader.quant.merge import build_quantization_config

GROUPS = ("model", "quant", "device_map", "dtype")


def all_options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((REPO / "conf" / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), all_options())
def test_every_shipped_yaml_composes(group: str, option: str) -> None:
    extra = {"local": ["model.path=/x"], "hub": ["model.repo_id=org/name"]}.get(option, [])
    cfg = compose([f"{group}={option}", *(extra if group == "model" else [])])
    assert cfg[group] is not None


def test_defaults_are_smollm2_quant_auto_nf4_auto_bf16() -> None:
    cfg = compose()
    assert cfg.model._target_ == "qloader.checkpoint.sources.smollm2_checkpoint"
    assert cfg.quant.auto is True  # quant=auto: bnb-nf4 unless the checkpoint is pre-quantized
    assert (cfg.quant.load_in_4bit, cfg.quant.bnb_4bit_quant_type, cfg.quant.bnb_4bit_use_double_quant) == (
        True,
        "nf4",
        True,
    )
    assert cfg.device_map.strategy == "auto"
    assert cfg.dtype.name == "bfloat16"


def test_overrides_use_transformers_field_names() -> None:
    cfg = compose(
        [
            "quant=bnb-nf4",
            "quant.bnb_4bit_use_double_quant=false",
            "quant.bnb_4bit_quant_storage=uint8",
            "quant.llm_int8_skip_modules=[model.layers.0.mlp]",
        ]
    )
    qconfig = build_quantization_config(cfg.quant)
    assert type(qconfig).__name__ == "BitsAndBytesConfig"
    assert qconfig.load_in_4bit and not qconfig.bnb_4bit_use_double_quant
    assert qconfig.llm_int8_skip_modules == ["model.layers.0.mlp"]
    assert build_quantization_config(compose(["quant=none"]).quant) is None


def test_unknown_key_fails_at_compose_naming_it() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose(["quant.bnb_4bit_quant_typ=nf4"])
    assert "bnb_4bit_quant_typ" in str(info.value.__cause__ or info.value)


def test_wrong_type_fails_at_compose_naming_the_key() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose(["quant.bnb_4bit_use_double_quant=maybe"])
    cause = info.value.__cause__
    assert isinstance(cause, ValidationError | ConfigKeyError)
    assert "bnb_4bit_use_double_quant" in str(cause)


def test_max_memory_override_needs_no_plus() -> None:
    cfg = compose(["device_map.max_memory.cpu=2GiB"])
    assert cfg.device_map.max_memory.cpu == "2GiB"


def test_cli_help_lists_groups_and_cfg_job_prints_config(tmp_path) -> None:
    help_out = run_cli("--help", run_dir=tmp_path).stdout
    for line in (
        "model: hub, local, smollm2-135m, synthetic-1b, tiny-llama",
        "quant: " + ", ".join(sorted(quant_options())),  # every registered method's options, and none and auto
        "device_map: auto, balanced, cpu, cuda, explicit, sequential",
        "dtype: auto, bf16, fp16, fp32",
    ):
        assert line in help_out
    job = run_cli("--cfg", "job", "quant=bnb-int8", "dtype=fp16", run_dir=tmp_path)
    assert job.returncode == 0
    assert "load_in_8bit: true" in job.stdout and "name: float16" in job.stdout
