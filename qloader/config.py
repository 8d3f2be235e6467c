"""Where the YAML config groups live, and composing them outside the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from qloader.schema import register_configs

CONFIG_NAME = "config"


def config_dir() -> Path:
    """`qloader/conf` in an installed wheel; the repository's `conf/` in a checkout."""
    packaged = Path(__file__).with_name("conf")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


GROUPS = ("model", "quant", "device_map", "dtype", "probe")


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The same config `qloader <overrides>` would run (Hydra's compose API, no run dir)."""
    return compose_with_choices(overrides)[0]


def compose_with_choices(overrides: Sequence[str] = ()) -> tuple[DictConfig, dict[str, str]]:
    """The config, and the option chosen in each config group (`{"quant": "bnb-nf4", ...}`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)
    choices = {group: cfg.hydra.runtime.choices.get(group) for group in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices
