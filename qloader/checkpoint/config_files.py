"""What a checkpoint's config.json and generation_config.json may hold, checked before transformers reads them.

transformers turns a wrong-typed field into a traceback (or, for a layer count of a billion, into minutes of
building a skeleton on the meta device); these checks name the file and the field instead, and compare the
layer count config.json declares with the layers the shards' headers hold, before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from pathlib import Path

from qloader.core.errors import CheckpointError

RESTORE = "restore config.json from the model's source (the file is damaged or was edited)"
FAR_MORE_FACTOR = 4
FAR_MORE_SLACK = 256
"""A config.json that declares more than max(FACTOR x, SLACK +) the layers the headers hold contradicts them. The
margin keeps models that share one layer's weights across many (ALBERT: 24 layers, one set of weights) loading."""
_INDEXED = re.compile(r"^(.*?)\.(\d+)\.")
"""A tensor in a stack of layers: `model.layers.3.mlp.up_proj.weight` -> ('model.layers', '3')."""


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; unreadable, invalid, nested too deep or not an object is one
    CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text())
    except RecursionError as e:
        raise CheckpointError(f"{path}: not valid JSON (nested deeper than any config needs); {_restore(path)}") from e
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {shown(data)}; {_restore(path)}")
    return data


def _restore(path: Path) -> str:
    return RESTORE.replace("config.json", path.name)


def shown(value: object) -> str:
    """A JSON value as a message shows it: `"2" (a string)`, `null`, `Infinity`, `a list`."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)  # Infinity, -Infinity, NaN: JSON extensions Python reads
    if isinstance(value, str):
        return f"{json.dumps(value[:40])}{'…' if len(value) > 40 else ''} (a string)"
    if isinstance(value, list | dict):
        return f"a {'list' if isinstance(value, list) else 'JSON object'}"
    return repr(value)


def check_config_fields(raw: dict, config_json: Path) -> None:
    """config.json's integer fields (those the config class types `int`: the sizes of the model) must be integers,
    and `quantization_config` an object; every problem in one CheckpointError."""
    problems, fix = _integer_problems(raw, _config_class(raw), ""), RESTORE
    quantization = raw.get("quantization_config")
    if quantization is not None and not isinstance(quantization, dict):
        problems.append(
            f"quantization_config must be a JSON object naming its quant_method, found {shown(quantization)}"
        )
        fix += ", or drop quantization_config if the weights are not pre-quantized"
    if problems:
        raise CheckpointError(f"{config_json}: {'; '.join(problems)}; {fix}")


def _config_class(raw: dict) -> type | None:
    """transformers' config class for config.json's model_type (None: unknown, left to AutoConfig to refuse)."""
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None
    return CONFIG_MAPPING[model_type]


def _integer_kind(annotation: object) -> str | None:
    """'an integer' for a field typed `int`, 'an integer or null' for `int | None`; None for other types."""
    if isinstance(annotation, str):
        text = annotation.replace(" ", "")
        return {"int": "an integer", "int|None": "an integer or null", "None|int": "an integer or null"}.get(text)
    if annotation is int:
        return "an integer"
    return "an integer or null" if set(typing.get_args(annotation)) == {int, type(None)} else None


def _integer_problems(raw: dict, cls: type | None, prefix: str, depth: int = 0) -> list[str]:
    if cls is None or not dataclasses.is_dataclass(cls) or depth > 4:
        return []
    problems = []
    for field in dataclasses.fields(cls):
        if field.name not in raw or (kind := _integer_kind(field.type)) is None:
            continue
        value = raw[field.name]
        integer = isinstance(value, int) and not isinstance(value, bool)
        if not integer and not (value is None and kind.endswith("null")):
            problems.append(f"{prefix}{field.name} must be {kind}, found {shown(value)}")
    for name, sub in (getattr(cls, "sub_configs", None) or {}).items():
        if isinstance(value := raw.get(name), dict):
            sub_cls = sub if dataclasses.is_dataclass(sub) else _config_class(value)
            problems += _integer_problems(value, sub_cls, f"{prefix}{name}.", depth + 1)
    return problems


def declared_layers(hf_config) -> dict[str, int]:
    """config.json field name -> the layer count it declares (`num_hidden_layers`, or the name the config class maps
    it to, e.g. GPT-2's `n_layer`), for the config and each of its sub-configs (`text_config.num_hidden_layers`)."""
    found = {}
    subs = getattr(hf_config, "sub_configs", None) or {}
    configs = [("", hf_config)] + [(f"{name}.", getattr(hf_config, name, None)) for name in subs]
    for prefix, config in configs:
        layers = getattr(config, "num_hidden_layers", None)
        if isinstance(layers, int) and not isinstance(layers, bool):
            field = (getattr(config, "attribute_map", None) or {}).get("num_hidden_layers", "num_hidden_layers")
            found[f"{prefix}{field}"] = layers
    return found


def layer_stacks(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """Stacks of numbered layers in the shards' headers: prefix -> (layers: the highest index + 1, parameters)."""
    stacks: dict[str, tuple[int, int]] = {}
    for name, shape in shapes.items():
        if found := _INDEXED.match(name):
            layers, parameters = stacks.get(found[1], (0, 0))
            stacks[found[1]] = (max(layers, int(found[2]) + 1), parameters + math.prod(shape))
    return stacks


def check_layer_count(declared: dict[str, int], shapes: dict[str, tuple[int, ...]], config_json: Path) -> None:
    """A config.json that declares far more layers than the headers hold contradicts them: refused before a
    skeleton of that many layers is built (which, for a billion, would take minutes and gigabytes)."""
    stacks = layer_stacks(shapes)
    if not stacks:
        return
    prefix, (held, _) = max(stacks.items(), key=lambda item: item[1][0])
    for field, layers in declared.items():
        if layers > max(FAR_MORE_FACTOR * held, held + FAR_MORE_SLACK):
            raise CheckpointError(
                f"{config_json}: {field} is {layers:,}, but the shards' headers hold {held} layer(s) "
                f"({prefix}.0 … {prefix}.{held - 1}): config.json describes far more layers than the checkpoint "
                f"has; {RESTORE}"
            )


def implied_parameters(layers: int, shapes: dict[str, tuple[int, ...]]) -> int:
    """The parameters a model of `layers` layers has, from the headers alone: every tensor, plus the deepest stack's
    parameters per layer for each layer config.json declares beyond those the headers hold."""
    total = sum(math.prod(shape) for shape in shapes.values())
    stacks = layer_stacks(shapes)
    if not stacks:
        return total
    held, parameters = max(stacks.values())
    return total + max(layers - held, 0) * parameters // held
