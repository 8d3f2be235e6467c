"""Where the YAML config groups live, and composing them outside the CLI."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from qloader.config.schema import register_configs

CONFIG_NAME = "config"


def config_dir() -> Path:
    """`qloader/conf` in an installed wheel; the repository's `conf/` in a checkout."""
    from importlib.resources import files

    package = Path(str(files("qloader")))
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.resolve().parent / "conf"


GROUPS = ("model", "quant", "device_map", "dtype", "probe")


def share_config_store() -> None:
    """Copies of Hydra's config repository share the process-wide ConfigStore instead of deep-copying it.

    Hydra copies its repository for every compose and, in `--help`, once per config group (about 80
    times here), and each copy deep-copies the ConfigStore with every schema in it: most of `--help`'s
    start-up. The copy guards nothing: `ConfigStore.load` already deep-copies each node it hands out.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.__deepcopy__ = lambda self, memo: self


_DEVICE_BUDGET = re.compile(r"^device_map\.max_memory\.[^=.]+=")


def with_device_budgets(overrides: Sequence[str]) -> list[str]:
    """`device_map.max_memory.N=SIZE` for any device N, with no `+`: Hydra adds a key only when asked (`++` adds or
    sets), and a budget names a device, not a schema field (`check_device_fields` checks each key)."""
    return [f"++{o}" if _DEVICE_BUDGET.match(o) else o for o in overrides]


@contextmanager
def _beside_a_running_app() -> Iterator[None]:
    """Composing inside a run (a plan's advice composes the other methods' configs): Hydra's global state is the
    running app's, put back as it was afterwards."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    if not GlobalHydra.instance().is_initialized():
        yield
        return
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        restore_gh_from_backup(backup)


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The same config `qloader <overrides>` would run (Hydra's compose API, no run dir)."""
    return compose_with_choices(overrides)[0]


def compose_with_choices(overrides: Sequence[str] = ()) -> tuple[DictConfig, dict[str, str]]:
    """The config, and the option chosen in each config group (`{"quant": "bnb-nf4", ...}`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    register_configs()
    share_config_store()
    with _beside_a_running_app(), initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=CONFIG_NAME, overrides=with_device_budgets(overrides), return_hydra_config=True)
    choices = {group: cfg.hydra.runtime.choices.get(group) for group in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def typed_config(saved: DictConfig | dict, choices: dict[str, str]) -> DictConfig:
    """A saved resolved config (a manifest's, a sweep job's `.hydra/config.yaml`), typed by today's schemas.

    The recorded group options are composed and the saved values put on top: a value of the wrong type
    fails here (OmegaConf's error), settings added since take their defaults, and a key no schema declares
    is kept, for `resolve` to refuse by name (as after `+key=`). Hydra's errors (an option deleted from
    conf/ since) pass through.
    """
    from omegaconf import OmegaConf

    typed, _ = compose_with_choices([f"{group}={option}" for group, option in choices.items()])
    _put_saved(typed, OmegaConf.to_container(saved) if isinstance(saved, DictConfig) else saved)
    return typed


def _put_saved(node: DictConfig, saved: dict) -> None:
    """Each saved value into its typed field (validated); a schema node's unknown key is added as `+key=` would."""
    import dataclasses

    from omegaconf import OmegaConf, open_dict

    for key, value in saved.items():
        child = node._get_node(key) if key in node else None
        if (
            isinstance(value, dict)
            and isinstance(child, DictConfig)
            and dataclasses.is_dataclass(OmegaConf.get_type(child))
        ):
            _put_saved(child, value)
        else:
            with open_dict(node):
                node[key] = value


def omegaconf_error(error: Exception) -> str:
    """An OmegaConf error as one line: the key, what is wrong, and the valid keys or values."""
    import dataclasses

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from qloader.config.schema import unknown_key_message

    key = getattr(error, "full_key", None)
    schema = getattr(error, "object_type", None)
    if isinstance(error, ConfigKeyError | ConfigAttributeError) and key and dataclasses.is_dataclass(schema):
        return unknown_key_message(key, schema)
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{key}: {first}" if key else first


def composition_error(error: Exception) -> str:
    """A Hydra composition error as one line (an override's OmegaConf error, a missing option, a parse error)."""
    if error.__cause__ is not None and getattr(error.__cause__, "full_key", None):
        return omegaconf_error(error.__cause__) + _append_hint(error)
    text = str(error).split("Config search path:")[0]
    head, found, options = text.partition("Available options in")
    if found:
        group, _, names = options.partition(":")
        return f"{head.strip()}; available options in {group.strip()}: {', '.join(names.split())}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("See https://")]
    return "; ".join(lines)


def _append_hint(error: Exception) -> str:
    """A key new to a free-form mapping (`device_map.modules`, `device_map.max_memory`) needs Hydra's `+`: Hydra's
    own hint, which OmegaConf's line leaves out. A schema field (a typo) gets the did-you-mean instead."""
    import dataclasses

    appended = str(error).partition("To append to your config use ")[2].strip()
    schema = getattr(error.__cause__, "object_type", None)
    if not appended or (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return ""
    return f"; a key that is not there yet needs a leading +: {appended}"
