"""The run manifest: one JSON record per run, written atomically (temp file, fsync, rename).

`running` is written first, and only where no manifest exists yet: another run's record is never
overwritten; it is rewritten as each stage starts (`running_stage`). The same file then becomes `succeeded`,
`failed` or `killed`; a `running` record whose process (`owner`: pid, start time, boot, host) has ended is
settled as `killed` by whoever reads it next (`settle_if_orphaned`). Its sections are
built from what the stages returned (the final `LoadContext`), never re-derived afterwards.
Its JSON Schema ships beside this module as `manifest.schema.json`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qloader.core.errors import OutputError, ProcessDied, RunDirInUseError
from qloader.core.files import remove_empty_folders, rewrite_json_in_place, write_json_atomic
from qloader.core.names import STAGE_NAMES, TASK_AUTO_CLASSES
from qloader.core.processes import is_alive, process_identity
from qloader.measure import environment
from qloader.measure.memory import StageStats, memory_method

SCHEMA_VERSION = 1
SCHEMA_PATH = files("qloader.runs") / "manifest.schema.json"


def manifest_schema() -> dict:
    """The manifest's JSON Schema, with the task names filled in from `qloader.core.names` (their one home)."""
    schema = json.loads(SCHEMA_PATH.read_text())
    schema["$defs"]["task"]["enum"] = [*TASK_AUTO_CLASSES, None]
    return schema


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def resolved_config(cfg: DictConfig) -> dict:
    """Plain values throughout: an Enum-typed field (model.task) as its name, which is its value."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of the resolved config (sorted keys, no whitespace)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_dir_stamp(root: Path) -> Path:
    """`root/DATE/HH-MM-SS-PID`: the name every run dir qloader picks itself has (Hydra's too, conf/config.yaml)."""
    now = datetime.now()
    return Path(root) / now.strftime("%Y-%m-%d") / f"{now.strftime('%H-%M-%S')}-{os.getpid()}"


def new_run_dir(root: Path) -> Path:
    """`root/DATE/HH-MM-SS-PID`, created now and by this process only (`-1`, `-2`, ... if taken).

    Two runs started in the same second never share a run dir, so neither record overwrites the other.
    """
    base = run_dir_stamp(root)
    for n in itertools.count():
        candidate = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"run dir '{candidate}' cannot be created: {e.strerror or e}") from e
    raise AssertionError("unreachable")


def register_run_dir_resolver() -> None:
    """`${qloader.pid:}` in conf/config.yaml's run and sweep dirs: the launching process's id, resolved
    once (cached, and carried to joblib's workers with the config like Hydra's `${now:}`)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("qloader.pid"):
        OmegaConf.register_new_resolver("qloader.pid", lambda: str(os.getpid()), use_cache=True)


def _device_map_json(device_map: dict | None) -> dict | None:
    return None if device_map is None else {module: str(device) for module, device in device_map.items()}


def checkpoint_section(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    files = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in checkpoint.files]
    return {
        "path": str(checkpoint.path),
        "shards": [s.name for s in checkpoint.shards],
        "files": files,
        "hash_seconds": checkpoint.hash_seconds,
        "hashed_files": checkpoint.hashed_files,
        "hub": checkpoint.hub,
    }


def _plain(value: Any) -> Any:
    """An enum (transformers' QuantizationMethod) as its plain value."""
    return getattr(value, "value", value)


def _plain_dict(config: dict) -> dict:
    return {key: _plain(value) for key, value in config.items()}


def _quantization_section(ctx) -> dict | None:
    from qloader.quant.merge import describe

    if ctx.checkpoint is None:
        return None
    quantization = ctx.quantization
    qconfig, method = quantization.config, quantization.method
    return {
        "method": "none" if qconfig is None else _plain(qconfig.quant_method),
        "description": describe(qconfig),
        "config": None if qconfig is None else _plain_dict(method.config_dict(qconfig)),
        "quantizer": None if ctx.quantizer is None else type(ctx.quantizer).__name__,
        "pre_quantized": quantization.pre_quantized,
        "choice": quantization.choice,
        "kernel": None if ctx.kernel is None else ctx.kernel.as_dict(),
        "merge": [row.__dict__ for row in quantization.merge],
    }


def model_choice_section(choice) -> dict:
    """The task and class model.task chose (hf_loading.ModelChoice), for the `model` and `plan` sections."""
    if choice is None:
        return {"task": None, "requested_task": None, "auto_class": None, "architecture": None, "chosen_by": None}
    return {
        "task": choice.task,
        "requested_task": choice.requested,
        "auto_class": choice.auto_class,
        "architecture": choice.architecture,
        "chosen_by": choice.chosen_by,
    }


def _model_section(ctx) -> dict | None:
    inv = ctx.inventory
    if inv is None:
        return None
    return {
        "class": inv.model_class,
        **model_choice_section(ctx.model_choice),
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "parameters": inv.parameters,
        "stored_elements": inv.stored_elements,
        "quantized_parameters": inv.quantized_parameters,
        "footprint_bytes": inv.footprint_bytes,
        "footprint_devices": inv.footprint_devices,
        "quantized_modules": inv.quantized_count,
        "quantized_module_classes": inv.quantized_modules,
        "skipped_modules": inv.skipped_modules,
        "kept": [group.as_dict() for group in inv.kept],
        "missing_keys": inv.missing_keys,
        "unexpected_keys": inv.unexpected_keys,
        "finite_check": ctx.finite_check,
        "device_map": _device_map_json(ctx.device_map),
    }


def _plan_section(ctx) -> dict:
    choice = ctx.model_choice
    model_class = None if choice is None else choice.cls.__name__
    computed_from = None if ctx.checkpoint is None else ctx.checkpoint.contents
    section = {"class": model_class, **model_choice_section(choice), **ctx.plan.as_dict()}
    return {**section, "computed_from": computed_from}


class RunManifest:
    def __init__(
        self,
        path: Path,
        cfg: DictConfig,
        overrides: list[str],
        choices: dict[str, str] | None = None,
        replay_of: str | None = None,
        previous_attempt: str | None = None,
    ):
        config = resolved_config(cfg)
        self.path = path
        self._on_disk: dict | None = None
        """The last record written to `path`."""
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "mode": cfg.get("mode", "load"),
            "status": "running",
            "started_at": _now(),
            "finished_at": None,
            "pid": os.getpid(),
            "owner": process_identity(),
            "running_stage": None,
            "run_dir": str(path.parent),
            "cwd": os.getcwd(),
            "config": config,
            "overrides": list(overrides),
            "choices": dict(choices or {}),
            "replay_of": replay_of,
            "previous_attempt": previous_attempt,
            "config_hash": config_hash(config),
            "versions": environment.versions(),
            "hardware": environment.hardware(),
            "measurement": memory_method(),
            "checkpoint": None,
            "quantization": None,
            "environment": None,
            "stages": [],
            "plan": None,
            "model": None,
            "weights_fingerprint": None,
            "saved": None,
            "cache": None,
            "probe": None,
            "warnings": [],
            "error": None,
        }

    def _write(self, exclusive: bool = False) -> None:
        try:
            write_json_atomic(self.path, self.data, exclusive=exclusive)
        except FileExistsError:
            with contextlib.suppress(Exception):  # the other run's record, if its process died, says so now
                settle_if_orphaned(self.path)
            raise run_dir_in_use(self.path.parent) from None
        except OSError as e:
            raise OutputError(f"cannot write the run manifest {self.path}: {e.strerror or e}") from e
        self._on_disk = copy.deepcopy(self.data)

    def _write_final(self) -> None:
        """The final record; where no temp file fits (a full disk), compact over the last record's own blocks."""
        try:
            self._write()
        except OutputError:
            with contextlib.suppress(OSError, ValueError):
                rewrite_json_in_place(self.path, self.data)
                self._on_disk = copy.deepcopy(self.data)
                return
            raise

    def _write_ending(self) -> None:
        """Where not even the whole final record fits: the last record written, with the status and error set."""
        ending = {key: self.data[key] for key in ("status", "finished_at", "error", "running_stage")}
        with contextlib.suppress(OSError, ValueError):
            rewrite_json_in_place(self.path, {**(self._on_disk or self.data), **ending})

    def begin(self) -> RunManifest:
        """Create the manifest (`running`); an existing one, another run's record, is an OutputError."""
        self._write(exclusive=True)
        return self

    def enter_stage(self, name: str) -> None:
        """Recorded before the stage runs: a run whose process dies in it is later settled as killed in `name`."""
        self.data["running_stage"] = name
        self._write()

    def add_stage(self, stats: StageStats) -> None:
        self.data["stages"].append(stats.as_dict())

    def _finish(self, status: str, ctx) -> dict:
        self.data.update(status=status, finished_at=_now(), running_stage=None)
        if ctx is not None:  # None: a job that was interrupted before its process ran a stage
            self.data.update(
                checkpoint=checkpoint_section(ctx.checkpoint),
                quantization=_quantization_section(ctx),
                environment=ctx.environment or None,
                plan=None if ctx.plan is None else _plan_section(ctx),
                model=_model_section(ctx),
                weights_fingerprint=None if ctx.inventory is None else ctx.inventory.weights_fingerprint,
                saved=checkpoint_section(ctx.saved),
                cache=None if ctx.cache is None else ctx.cache.as_dict(),
                probe=ctx.probe,
                warnings=list(ctx.warnings),
            )
        self.data["hardware"] = environment.hardware()  # GPUs are only known once torch is imported
        self._write_final()
        return self.data

    def succeed(self, ctx) -> dict:
        return self._finish("succeeded", ctx)

    def fail(self, error: BaseException, stage: str | None, ctx) -> dict:
        """Record the failure; if even that cannot be written, the file keeps its last complete state."""
        status = "killed" if isinstance(error, KeyboardInterrupt) else "failed"
        message = str(error) or ("interrupted (SIGINT)" if status == "killed" else type(error).__name__)
        self.data["error"] = {"type": type(error).__name__, "message": message, "stage": stage}
        if getattr(error, "cause", None):
            self.data["error"]["cause"] = error.cause
        try:
            return self._finish(status, ctx)
        except OutputError:
            self._write_ending()  # so the file does not say `running` for a run that ended
            return self.data


def record_killed_job(job_dir: Path, error_type: str, message: str, cause: str | None = None) -> str:
    """After an interrupted sweep: a job whose process ended without writing its end becomes `killed`.

    A manifest still `running` gets the status and the error; a job dir with no manifest (the job was
    launched but its process never began) gets a `killed` manifest built from Hydra's `.hydra/` record.
    Returns the job's final status (`missing` for a folder with neither).
    """
    path = job_dir / "manifest.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict) or data.get("status") != "running":
            return data.get("status", "unreadable") if isinstance(data, dict) else "unreadable"
        stage = _stage_name(data.get("running_stage"))
        data.update(
            status="killed", finished_at=_now(), running_stage=None,
            error={"type": error_type, "message": message, "stage": stage, **({"cause": cause} if cause else {})},
        )  # fmt: skip
        write_json_atomic(path, data)
        return "killed"
    hydra_dir = job_dir / ".hydra"
    if not (hydra_dir / "config.yaml").is_file():
        return "missing"
    cfg = OmegaConf.load(hydra_dir / "config.yaml")
    overrides = list(OmegaConf.load(hydra_dir / "overrides.yaml")) if (hydra_dir / "overrides.yaml").is_file() else []
    manifest = RunManifest(path, cfg, overrides)
    manifest.data["error"] = {"type": error_type, "message": message, "stage": None}
    if cause:
        manifest.data["error"]["cause"] = cause
    manifest._finish("killed", None)
    return "killed"


RECORDED_STAGES = (*STAGE_NAMES, "cache", "save", "probe")


def _stage_name(value: object) -> str | None:
    return value if value in RECORDED_STAGES else None


def run_dir_in_use(run_dir: Path, record: str = "a manifest.json") -> RunDirInUseError:
    """The refusal of a run dir that holds `record`, another run's: never written over."""
    return RunDirInUseError(
        f"run dir '{run_dir}' already holds {record}, the record of another run; "
        "choose a new run dir (hydra.run.dir=..., or run_dir=... in qloader.load): "
        "a manifest is never overwritten"
    )


def settle_if_orphaned(path: Path) -> Any:
    """The record at `path`; if it says `running` but its process (`owner`) has ended, first marked `killed` with
    the stage it was in and "process died", and written back where the folder allows. Raises what reading
    raises (OSError, ValueError for a file that is not JSON)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("status") != "running" or is_alive(data.get("owner")) is not False:
        return data
    stage = _stage_name(data.get("running_stage"))
    where = f" in its {stage} stage" if stage else ""
    message = (
        f"process died: pid {data['owner']['pid']} ended{where} without recording its end "
        "(SIGKILL, the out-of-memory killer, or the machine stopped)"
    )
    data.update(
        status="killed", finished_at=_now(), running_stage=None,
        error={"type": ProcessDied.__name__, "message": message, "stage": stage},
    )  # fmt: skip
    with contextlib.suppress(OSError, ValueError):
        write_json_atomic(Path(path), data)
    return data


def claim_run_dir(run_dir: Path, hydra_subdir: str | None) -> None:
    """Before Hydra writes its `.hydra/` record into `run_dir`: refuse a dir holding another run's manifest or
    `.hydra/`, then make that folder exclusively, so of two runs started into one dir at once one is refused."""
    if (run_dir / "manifest.json").exists():
        with contextlib.suppress(Exception):  # the other run's record, if its process died, says so now
            settle_if_orphaned(run_dir / "manifest.json")
        raise run_dir_in_use(run_dir)
    if hydra_subdir is None:
        return
    try:
        (run_dir / hydra_subdir).mkdir(parents=True)
    except FileExistsError:
        raise run_dir_in_use(run_dir, f"{hydra_subdir}/") from None
    except OSError as e:
        raise OutputError(f"run dir '{run_dir}' cannot be written: {e.strerror or e}") from e


def release_run_dir(run_dir: Path, hydra_subdir: str | None, kept: Path) -> None:
    """Undo `claim_run_dir` after Hydra failed to write its record (a full disk): its `.hydra/`, an empty log, and
    then every empty folder up to `kept` (the nearest folder that existed before), so nothing empty is left."""
    import shutil

    if hydra_subdir is not None:
        shutil.rmtree(run_dir / hydra_subdir, ignore_errors=True)
    for log in run_dir.glob("*.log"):
        with contextlib.suppress(OSError):
            if log.stat().st_size == 0:
                log.unlink()
    remove_empty_folders(run_dir, kept)


def record_unstarted_run(run_dir: Path, cfg: DictConfig, overrides: list[str], choices: dict, error: Exception) -> bool:
    """A `failed` manifest for a run that failed before its first stage, if one can still be written (never over
    another's); False if none could (a full disk)."""
    manifest = RunManifest(run_dir / "manifest.json", cfg, overrides, choices)
    error_record = {"type": type(error).__name__, "message": str(error), "stage": None}
    manifest.data.update(status="failed", finished_at=_now(), error=error_record)
    try:
        manifest._write(exclusive=True)
    except OutputError:
        return False
    return True
