"""Run the seven stages in order, measure each one from outside, and write the manifest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qloader.core.interrupts import as_interrupt, signals_as_interrupt
from qloader.core.library_logs import library_records_to, own_records_to
from qloader.core.names import STAGE_NAMES
from qloader.loading.context import LoadContext
from qloader.loading.stages import stages_for
from qloader.measure.memory import measure_stage
from qloader.runs.manifest import RunManifest

WEIGHTS_FINAL_AFTER = STAGE_NAMES[-1]
"""After this stage (postprocess) the weights are what `save` writes and the fingerprint covers."""


class ForwardWatch:
    """Notes the model's first forward pass (a pre-hook on every module that holds weights, then removed).

    Some methods rewrite their weights on the first forward (bitsandbytes repacks 4-bit weights for
    AVX512-BF16 CPUs, compressed-tensors decompresses): `layout_changed` then tells whether the
    parameters still are the tensors the load produced, without calling `state_dict()`, which itself
    converts such weights back.
    """

    def __init__(self, model: Any) -> None:
        self.forward_ran = False
        self.layout = weights_layout(model)
        modules = [model, *(m for m in model.modules() if next(m.parameters(recurse=False), None) is not None)]
        self._hooks = [m.register_forward_pre_hook(self._seen) for m in modules]

    def _seen(self, module, args) -> None:
        self.forward_ran = True
        for hook in self._hooks:
            hook.remove()

    def layout_changed(self, model: Any) -> bool:
        return self.forward_ran and weights_layout(model) != self.layout


def weights_layout(model: Any) -> list[tuple]:
    """Which tensors hold the weights: name, storage address, shape and dtype of every parameter and buffer."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [(name, t.data_ptr(), tuple(t.shape), t.dtype) for name, t in tensors]


@dataclass
class LoadResult:
    model: Any
    """The loaded transformers model."""
    manifest: dict
    run_dir: Path
    checkpoint_path: Path
    cfg: DictConfig | None = None
    quantization_config: Any = None
    _watch: ForwardWatch | None = field(default=None, repr=False)

    def tokenizer(self):
        """The checkpoint's tokenizer (AutoTokenizer from the same folder); CheckpointError if it has none."""
        from qloader.checkpoint.sources import checkpoint_tokenizer

        return checkpoint_tokenizer(self.checkpoint_path)

    def save(self, directory: str | Path, max_shard_size: str | None = None) -> dict:
        """Write the model as loaded into a new folder, through the same writer as `save.enabled=true`.

        Refused (SaveError) once a forward pass has rewritten the weights: a checkpoint written then would
        not hold what was loaded. Returns the saved checkpoint's record (path, files with sha256).
        """
        from omegaconf import OmegaConf

        from qloader.checkpoint.writer import check_save_fields, lock_save_dir, save_loaded_model
        from qloader.core.errors import ConfigError, SaveError
        from qloader.runs.manifest import checkpoint_section

        if self._watch is not None and self._watch.layout_changed(self.model):
            raise SaveError(
                f"cannot save to '{directory}': the model's first forward pass rewrote its weights (its quantization,"
                f" {self.quantization_description()}, repacks or decompresses them for this host), so a checkpoint"
                " written now would not hold the weights as loaded; call save() before running the model, or load"
                " again with save.enabled=true save.dir=DIR"
            )
        default = self.cfg.save.max_shard_size if self.cfg is not None else "5GB"
        save = OmegaConf.create({"enabled": True, "dir": str(directory), "max_shard_size": max_shard_size or default})
        if problems := check_save_fields(save):
            raise ConfigError(problems)
        with lock_save_dir(save):  # a run or another save() writing there refuses this one, naming its pid
            saved = save_loaded_model(self.model, self.quantization_config, self.checkpoint_path, save)
        return checkpoint_section(saved)

    def quantization_description(self) -> str:
        return (self.manifest.get("quantization") or {}).get("description") or "its quantization"


def run(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    *,
    choices: dict[str, str] | None = None,
    replay_of: str | None = None,
    before_success: Callable[[], None] | None = None,
    previous_attempt: str | None = None,
) -> LoadResult:
    """Compose -> stages -> manifest. Any failure leaves a `failed` manifest and re-raises.

    `choices` are the config-group options the run composed (model, quant, ...); `replay_of` links
    a replay to the manifest it re-runs. Ctrl-C and SIGTERM leave a `killed` manifest naming the stage.
    `before_success` runs before `succeeded` is recorded and may raise to record the run otherwise (a sweep
    job whose sweep has ended); `previous_attempt` names the record of this job's earlier attempt (a requeued or
    resumed sweep job). A final record that cannot be written leaves `failed` (OutputError) and re-raises.
    """
    manifest = RunManifest(Path(run_dir) / "manifest.json", cfg, overrides, choices, replay_of, previous_attempt)
    ctx, current, watch = LoadContext(cfg=cfg, overrides=tuple(overrides)), None, None
    stages_done = False
    with signals_as_interrupt():
        manifest.begin()  # an unwritable run dir, or one holding another run's manifest, fails here
        try:
            with library_records_to(Path(run_dir) / "qloader.log"), own_records_to(Path(run_dir) / "qloader.log"):
                for current, stage in stages_for(cfg):
                    stats = None
                    manifest.enter_stage(current)
                    try:
                        with measure_stage(current) as stats:
                            ctx = stage(ctx)
                    finally:
                        if stats is not None:
                            manifest.add_stage(stats)  # filled in on exit, also when the stage failed
                    if current == WEIGHTS_FINAL_AFTER and ctx.model is not None:
                        watch = ForwardWatch(ctx.model)  # the weights as loaded, before the probe's forward
            if cfg.mode == "plan" and cfg.plan.advice and ctx.plan is not None and not ctx.plan.fits:
                ctx = ctx.next(plan=_with_advice(ctx.plan, overrides, (choices or {}).get("quant"), ctx.pre_quantized))
            if before_success is not None:
                before_success()
            stages_done = True
            record = manifest.succeed(ctx)
        except BaseException as error:
            ended_by = as_interrupt(error)  # an interrupt a library turned into an error of its own is still one
            manifest.fail(ended_by, None if stages_done else current, ctx)
            if ended_by is not error:
                raise ended_by from error
            raise
        finally:
            if ctx.cache is not None:  # a cache hit's entry, held since `resolve` so no eviction removes it mid-load
                ctx.cache.release()
            if ctx.save_lock is not None:  # save.dir's lock, taken in `resolve`: held until the record is final
                ctx.save_lock.release()
    return LoadResult(ctx.model, record, Path(run_dir), ctx.checkpoint.path, cfg, ctx.quantization_config, _watch=watch)


def _with_advice(plan: Any, overrides: list[str], quant: str | None, pre_quantized: bool) -> Any:
    """A plan that does not fit, with the methods whose plans fit the same budgets (none for a pre-quantized
    checkpoint: it loads as saved)."""
    import dataclasses

    from qloader.runs.advice import methods_that_fit

    return dataclasses.replace(plan, advice=methods_that_fit(overrides, quant) if not pre_quantized else [])
