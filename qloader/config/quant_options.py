"""Which registered method each `quant` option (`conf/quant/<option>.yaml`) stands for.

YAML cannot read Python, so what enumerates options (the README's method table, the method sweep, the tests)
maps them through the schema each option names in its `defaults` (`/quant_<schema>_schema@_here_`) and the
plug-in that declares that schema (`QuantMethod.schemas`). An option that extends another (`auto` extends
`bnb-nf4`) stands for what that one stands for.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from qloader.config.compose import config_dir
from qloader.quant.base import QuantMethod
from qloader.quant.registry import method_for_schema

SCHEMA_ENTRY = re.compile(r"^/quant_(?P<schema>\w+)_schema@_here_$")


class QuantOptionError(ValueError):
    """A `conf/quant/<option>.yaml` that names no schema, or one no registered method declares."""


def quant_options(folder: Path | None = None) -> dict[str, QuantMethod | None]:
    """Option name -> its method (None for `none`), for every YAML file of `folder` (default: conf/quant)."""
    folder = config_dir() / "quant" if folder is None else folder
    files = {path.stem: path for path in sorted(folder.glob("*.yaml"))}
    return {option: method_of_option(option, files) for option in files}


def method_of_option(option: str, files: dict[str, Path], seen: tuple[str, ...] = ()) -> QuantMethod | None:
    """The method of one option file, following a defaults entry that names another option of the group."""
    path = files[option]
    if option in seen:
        raise QuantOptionError(f"{path}: its defaults extend each other in a circle ({' -> '.join((*seen, option))})")
    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []:
        if not isinstance(entry, str):
            continue
        if match := SCHEMA_ENTRY.match(entry):
            return _method_for_schema(match["schema"], path)
        if entry in files:
            return method_of_option(entry, files, (*seen, option))
    raise QuantOptionError(
        f"{path} names no schema in its defaults; add `- /quant_<schema>_schema@_here_` (e.g. /quant_bnb_schema@_here_)"
    )


def _method_for_schema(schema: str, path: Path) -> QuantMethod | None:
    try:
        return method_for_schema(schema)
    except KeyError:
        raise QuantOptionError(
            f"{path} names schema '{schema}', which no registered method declares in its `schemas`"
        ) from None
