"""Choice fields for the structured-config schemas: str-valued Enums that OmegaConf 2.3 validates.

OmegaConf 2.3 rejects `Literal` annotations but validates Enums: a bad value then fails while the
config is composed, and the message lists every allowed value. Members are plain strings too
(`==`, `str()`, f-strings, JSON all give the value), so YAML, manifests and stage code see strings.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A str Enum whose `str()` and format are its value (as `enum.StrEnum`, which needs Python 3.11)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)


def choice_enum(name: str, values: tuple[str, ...] | list[str]) -> type[Choice]:
    """An Enum named `name` whose members' names and values are `values`, in order."""
    return Choice(name, [(value, value) for value in values])
