"""One exception class per kind of failure; the manifest records the class name as `error.type`."""

from __future__ import annotations


class QloaderError(Exception):
    """Base class: a failure qloader explains in one line."""


class ConfigError(QloaderError):
    """The resolved config is invalid. Collects every problem, so one run shows them all."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class CheckpointError(QloaderError):
    """A checkpoint folder or file is missing or unreadable."""


class QuantizationMismatchError(QloaderError):
    """The requested quantization contradicts a pre-quantized checkpoint's own."""


class EnvironmentMismatchError(QloaderError):
    """The machine cannot run what the config asks for (devices, library versions, memory)."""


class DeviceMapError(QloaderError):
    """The device map cannot be built or does not fit."""


class LoadError(QloaderError):
    """Weights could not be loaded into the model skeleton."""


class ProbeError(QloaderError):
    """The fidelity probe cannot run on this model."""
