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
    """A checkpoint folder or file is missing, unreadable, truncated or inconsistent with its index."""


class UnsafeCheckpointError(QloaderError):
    """Loading the checkpoint would run code from it (pickle, custom modeling code) and that was not allowed."""


class CheckpointMismatchError(QloaderError):
    """The checkpoint's tensors do not fit the model its config.json describes (missing, unexpected, shape)."""


class NonFiniteWeightError(QloaderError):
    """A loaded weight holds NaN or Inf."""


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


class SaveError(QloaderError):
    """The loaded model can no longer be saved as it was loaded (a forward pass rewrote its weights)."""


class ManifestError(QloaderError):
    """A manifest.json is not one qloader can read (not JSON, or a field of the wrong shape)."""


class OutputError(QloaderError):
    """The run's own output (manifest, run dir) cannot be written."""


class RunDirInUseError(OutputError):
    """The run (or sweep) dir already holds another run's record (manifest.json, .hydra/): never written over."""


class ProcessDied(QloaderError):
    """Recorded, not raised: a run's process ended without recording its end (SIGKILL, the OOM killer); whoever
    reads its `running` record next (a sweep, qloader-report, replay, the next run into that dir) marks it `killed`."""


class RunKilled(KeyboardInterrupt):
    """A termination signal (SIGTERM) arrived during a run; recorded like Ctrl-C, as `status: killed`."""

    def __init__(self, signal_name: str, reason: str | None = None, cause: str | None = None):
        self.signal_name = signal_name
        self.cause = cause
        """Who stopped the run, where known: the cluster's `time limit`, `cancelled`, `preempted`, ..."""
        super().__init__(reason or f"received {signal_name}")
