"""The method registry: each plug-in registers itself, and everything that enumerates methods reads it (the
conf/quant options, the method sweep, the README's method table, the version pins)."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

import qloader.quant.methods
from qloader.config.compose import config_dir
from qloader.config.quant_options import QuantOptionError, quant_options
from qloader.core.errors import EnvironmentMismatchError
from qloader.measure import environment
from qloader.quant import base
from qloader.quant.base import QuantMethod, register_method
from qloader.quant.registry import METHODS, OtherMethod, method_for_target

REPO = Path(__file__).resolve().parent.parent
SHARED_MODULES = {"device"}  # the methods package's modules that hold a shared base, not a method


def builtin_methods() -> dict[str, QuantMethod]:
    """The registered methods qloader ships (a test may have imported a user's plug-in too)."""
    return {key: m for key, m in METHODS.items() if type(m).__module__.startswith("qloader.quant.methods.")}


def cpu_runnable(method: QuantMethod | None) -> bool:
    """Quantizes an unquantized checkpoint on a host without a GPU (or is quant=none)."""
    return method is None or (method.needs is None and not method.pre_quantized_only)


@pytest.fixture
def restored_registry():
    """What a test registers is gone after it."""
    before = dict(base._registered)
    yield
    base._registered.clear()
    base._registered.update(before)


# ---------------------------------------------------------------- registration


def test_every_method_module_registers_exactly_one_method() -> None:
    modules = set(qloader.quant.methods.PLUGIN_MODULES)
    registered = [type(m).__module__.rpartition(".")[2] for m in builtin_methods().values()]
    assert sorted(registered) == sorted(modules - SHARED_MODULES)  # one each, and every module but the shared base
    assert {"bnb", "torchao", "fp8", "eetq", "hqq"} <= modules
    for key, method in METHODS.items():
        assert method.quant_method == key


class Impostor(QuantMethod):
    quant_method = "bitsandbytes"
    config_class = "ImpostorConfig"


def test_register_refuses_a_quant_method_taken_naming_both_classes(restored_registry) -> None:
    owner = METHODS["bitsandbytes"]
    with pytest.raises(ValueError) as raised:
        register_method(Impostor)
    message = str(raised.value)
    assert "'bitsandbytes'" in message and "\n" not in message
    assert "test_registry.Impostor" in message and "qloader.quant.methods.bnb.Bitsandbytes" in message
    assert METHODS["bitsandbytes"] is owner


class NotAMethod:
    quant_method = "not_a_method"
    config_class = "NotAMethodConfig"


class NoQuantMethod(QuantMethod):
    config_class = "NoQuantMethodConfig"


class NoConfigClass(QuantMethod):
    quant_method = "no_config_class"


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (NotAMethod, "test_registry.NotAMethod is not a QuantMethod subclass; subclass qloader.quant.base.QuantMethod"),
        (NoQuantMethod, "test_registry.NoQuantMethod has no `quant_method`; set it as a class attribute"),
        (NoConfigClass, "test_registry.NoConfigClass has no `config_class`; set it as a class attribute"),
        (Impostor(), "is not a QuantMethod subclass"),  # an instance, not a class
    ],
)
def test_register_refuses_what_is_not_a_plug_in(cls, expected, restored_registry) -> None:
    before = dict(METHODS)
    with pytest.raises(TypeError, match=re.escape(expected)):
        register_method(cls)
    assert dict(METHODS) == before


PLUGIN_MODULE = '''
from qloader.quant.base import QuantMethod, register_method


class ByoConfig:
    pass


@register_method
class Byo(QuantMethod):
    quant_method = "byo_for_test"
    config_class = "ByoConfig"
'''


def test_method_for_target_imports_the_module_that_registers_it(tmp_path, monkeypatch, restored_registry) -> None:
    (tmp_path / "byo_plugin_for_test.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "byo_for_test" not in METHODS
    try:
        method = method_for_target("byo_plugin_for_test.ByoConfig")
    finally:
        sys.modules.pop("byo_plugin_for_test", None)
    assert type(method).__name__ == "Byo" and method is METHODS["byo_for_test"]


def test_method_for_target_falls_back_to_transformers_defaults() -> None:
    assert method_for_target("transformers.BitsAndBytesConfig") is METHODS["bitsandbytes"]
    assert method_for_target(None) is None
    unknown = method_for_target("no_such_module_for_qloader.SomeConfig")  # Hydra's instantiate names the module
    assert isinstance(unknown, OtherMethod) and unknown.config_class == "SomeConfig"
    assert "no_such_module_for_qloader" not in sys.modules


# ---------------------------------------------------------------- version pins: pyproject.toml only


def pyproject_pins(extra: str | None, packages: tuple[str, ...]) -> dict[str, SpecifierSet]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *(project["optional-dependencies"][extra] if extra else [])]
    wanted = {canonicalize_name(p) for p in packages}
    requirements = [Requirement(line) for line in lines]
    return {r.name: r.specifier for r in requirements if canonicalize_name(r.name) in wanted}


@pytest.mark.parametrize("key", sorted(builtin_methods()))
def test_method_version_pins_are_pyproject_extras(key) -> None:
    method = METHODS[key]
    assert {name: SpecifierSet(spec) for name, spec in method.versions.items()} == pyproject_pins(
        method.extra, method.packages
    ), "the installed qloader's metadata is older than pyproject.toml: run `make setup`"


def test_pins_are_read_not_written_down() -> None:
    assert METHODS["torchao"].versions == {"torchao": str(pyproject_pins("torchao", ("torchao",))["torchao"])}
    assert METHODS["bitsandbytes"].versions  # a core dependency's pin counts for a method without an extra
    assert all("versions" not in vars(type(m)) for m in builtin_methods().values())


def test_check_versions_refuses_a_version_outside_the_pins(monkeypatch) -> None:
    pins = METHODS["torchao"].versions
    environment.check_versions(pins)  # the installed torchao is in range
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.17.0" if name == "torchao" else real(name))
    with pytest.raises(EnvironmentMismatchError) as raised:
        environment.check_versions(pins)
    assert str(raised.value) == f"torchao 0.17.0 is installed; qloader needs torchao{pins['torchao']}"


# ---------------------------------------------------------------- what enumerates methods: options, sweep, README


def test_every_quant_option_maps_to_a_registered_method_and_every_method_has_one() -> None:
    options = quant_options()
    assert options["none"] is None and options["auto"] is METHODS["bitsandbytes"]  # auto extends bnb-nf4
    assert sorted(options) == sorted(path.stem for path in (config_dir() / "quant").glob("*.yaml"))
    assert all(m is None or m is METHODS[m.quant_method] for m in options.values())
    with_option = {m.quant_method for m in options.values() if m is not None}
    assert with_option == set(builtin_methods())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("defaults:\n  - _self_\n", "names no schema in its defaults; add `- /quant_<schema>_schema@_here_`"),
        ("defaults:\n  - /quant_nope_schema@_here_\n", "names schema 'nope', which no registered method declares"),
    ],
)
def test_quant_option_without_a_known_schema_is_named(text, expected, tmp_path) -> None:
    (tmp_path / "mine.yaml").write_text(text)
    with pytest.raises(QuantOptionError) as raised:
        quant_options(tmp_path)
    assert str(raised.value).startswith(str(tmp_path / "mine.yaml")) and expected in str(raised.value)


def test_method_sweep_lists_every_cpu_runnable_method() -> None:
    """conf/experiment/method-sweep.yaml cannot read the registry: this keeps it in step."""
    options = quant_options()
    sweep = OmegaConf.load(config_dir() / "experiment" / "method-sweep.yaml")
    listed = [option.strip() for option in str(sweep.hydra.sweeper.params.quant).split(",")]
    assert set(listed) <= set(options), f"not a conf/quant option: {set(listed) - set(options)}"
    assert all(cpu_runnable(options[option]) for option in listed)
    runnable = {key for key, m in builtin_methods().items() if cpu_runnable(m)}
    swept = {options[option].quant_method for option in listed if options[option] is not None}
    assert swept == runnable, f"method-sweep.yaml lacks an option of {sorted(runnable - swept)}"
    assert {"bitsandbytes", "torchao", "quanto", "gptq"} <= runnable


def readme_method_rows() -> list[tuple[list[str], str]]:
    """(options, transformers-config cell) of each row of the README's method table."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Quantization methods\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("\n| option | transformers config |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.strip().splitlines()[1:]:  # past the header's separator row
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((re.findall(r"`([\w-]+)`", cells[0]), cells[1]))
    return rows


def test_readme_method_table_lists_exactly_the_registered_methods() -> None:
    options = quant_options()
    rows = readme_method_rows()
    listed = [option for names, _ in rows for option in names]
    assert sorted(listed) == sorted(set(options) - {"auto", "none"})
    for names, config_cell in rows:
        for option in names:
            assert f"`{options[option].config_class}" in config_cell, f"README row of `{option}`"
    assert {options[o].quant_method for o in listed} == set(builtin_methods())
