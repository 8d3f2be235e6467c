"""The method plug-ins: one module per method, each registering itself with `register_method`.

Importing this package imports every module in it, so adding a method is adding its module (and its
`conf/quant/<option>.yaml`). Every module here is imported when the config is composed: keep module level
light (no torch, no transformers); heavy helpers live outside this package (`qloader.quant.bnb_kernel`).
"""

from __future__ import annotations

import importlib
import pkgutil


def import_plugins() -> list[str]:
    """Import every module of this package (each registers its method); returns their names."""
    names = [info.name for info in pkgutil.iter_modules(__path__)]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


PLUGIN_MODULES = import_plugins()
