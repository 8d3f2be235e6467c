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


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The same config `qloader <overrides>` would run (Hydra's compose API, no run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
