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


def check_model_size(hf_config, checkpoint: Checkpoint, device_map: DictConfig) -> None:
    """Meta-free, before any skeleton is built (building one is what a hostile layer count costs): the layers
    config.json declares against those the shards' headers hold, and the size it implies against this host."""
    from pathlib import Path

    from qloader.checkpoint import config_files
    from qloader.measure.environment import check_host_capacity

    config_json = checkpoint.path / "config.json"
    declared = config_files.declared_layers(hf_config)
    config_files.check_layer_count(declared, checkpoint.shapes, config_json)
    parameters = config_files.implied_parameters(max(declared.values(), default=0), checkpoint.shapes)
    disk = Path(device_map.offload_folder).expanduser().absolute() if device_map.offload_folder else checkpoint.path
    check_host_capacity(parameters, disk, str(config_json))


def hypothetical_gpus(device_map: DictConfig) -> list[str]:
    """mode=plan: the GPUs `device_map.max_memory` budgets that this host does not have ('0', '1', ...)."""
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    budgets = devices.max_memory_request(device_map) or {}
    return [str(key) for key in sorted(k for k in budgets if isinstance(k, int) and k >= available)]


def check_cuda_request(device_map: DictConfig, hypothetical: list[str] = ()) -> int:
    """The CUDA devices the device map asks for must be here, except the `hypothetical` ones a plan budgets; returns
    how many this host has."""
    import torch

    settings = devices.cuda_settings(device_map)
    settings = {
        s: i for s, i in settings.items() if not (s.startswith("device_map.max_memory.") and str(i) in hypothetical)
    }
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if settings and not available:
        raise EnvironmentMismatchError(
            f"{' and '.join(settings)} {'asks' if len(settings) == 1 else 'ask'} for CUDA, but this host has no CUDA "
            f"device (torch {torch.__version__}); {_cpu_instead(settings)}"
        )
    if beyond := {setting: index for setting, index in settings.items() if index >= available}:
        raise EnvironmentMismatchError(
            f"{' and '.join(beyond)} {'asks' if len(beyond) == 1 else 'ask'} for cuda:{max(beyond.values())}, but "
            f"this host has {available} CUDA device(s) (cuda:0 … cuda:{available - 1})"
        )
    return available


def _cpu_instead(settings: dict[str, int]) -> str:
    """The fix for each kind of setting that asked for a GPU on a host without one."""
    fixes = []
    if any(s.startswith("device_map '") for s in settings):
        fixes.append("use device_map=cpu or device_map=auto")
    if any(s.startswith("device_map.modules") for s in settings):
        fixes.append("place those modules on cpu in device_map.modules, or use device_map=auto")
    if budgets := [s.split("=", 1)[0] for s in settings if s.startswith("device_map.max_memory.")]:
        which = "that GPU budget" if len(budgets) == 1 else "those GPU budgets"
        fixes.append(
            f"drop {which} ({' '.join(f'{k}=null' for k in budgets)}) "
            "and budget the CPU with device_map.max_memory.cpu=SIZE, or plan for GPUs that are not here with mode=plan"
        )
    return "; ".join(fixes)


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
