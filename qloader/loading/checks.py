"""Checks a load runs before it reads any tensor: the config as a whole, the devices asked for, pinned hashes."""

from __future__ import annotations

from omegaconf import DictConfig

from qloader.checkpoint import writer as checkpoint_writer
from qloader.checkpoint.reader import Checkpoint
from qloader.core.errors import CheckpointError, ConfigError, EnvironmentMismatchError
from qloader.core.names import DTYPE_CHOICES, MODES
from qloader.loading import devices
from qloader.quant.merge import check_quant_fields
from qloader.quant.registry import method_for_target


def check_config(cfg: DictConfig) -> None:
    """Every config problem at once (one ConfigError listing them all), before any file is read."""
    from qloader.config.schema import check_choices, missing_values, unknown_keys

    problems = unknown_keys(cfg) + missing_values(cfg) + check_choices(cfg)
    problems += check_quant_fields(cfg.quant) + devices.check_device_fields(cfg.device_map)
    problems += checkpoint_writer.check_save_fields(cfg.save)
    method = method_for_target(cfg.quant.get("_target_"))
    if cfg.save.enabled and method is not None and (why := method.check_save(cfg.quant)):
        problems.append(f"save.enabled=true: {why}; load without saving (save.enabled=false) or choose another quant")
    if cfg.dtype.name not in DTYPE_CHOICES:
        problems.append(
            f"dtype.name '{cfg.dtype.name}' is not a dtype qloader loads (one of {', '.join(DTYPE_CHOICES)})"
        )
    if cfg.mode not in MODES:
        problems.append(f"mode '{cfg.mode}' is not one of {', '.join(MODES)}")
    if problems:
        raise ConfigError(problems)
    if cfg.save.enabled and cfg.mode != "plan":
        checkpoint_writer.check_save_target(cfg.save)


def check_cuda_request(device_map: DictConfig) -> int:
    """The CUDA devices the device map asks for must be here; returns how many this host has."""
    import torch

    asked = devices.cuda_devices_asked(devices.device_map_request(device_map), devices.max_memory_request(device_map))
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if asked and not available:
        raise EnvironmentMismatchError(
            f"device_map '{device_map.strategy}' asks for CUDA, but this host has no CUDA device "
            f"(torch {torch.__version__}); use device_map=cpu or device_map=auto"
        )
    if asked and max(asked) >= available:
        raise EnvironmentMismatchError(
            f"device_map asks for cuda:{max(asked)}, but this host has {available} CUDA device(s)"
        )
    return available


def check_pinned_hashes(expected: dict, checkpoint: Checkpoint) -> None:
    """`model.expected_sha256`: every pinned file must hash to its pin."""
    found = {f.name: f.sha256 for f in checkpoint.files}
    problems = [
        f"{checkpoint.path / name}: sha256 {found.get(name, 'missing file')}, expected {digest}"
        for name, digest in expected.items()
        if found.get(name) != digest
    ]
    if problems:
        raise CheckpointError(f"model.expected_sha256 does not match: {'; '.join(problems)}")
