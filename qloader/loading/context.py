"""The run's state, passed from stage to stage: each stage returns a new one with what it found."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from qloader.checkpoint.reader import Checkpoint
from qloader.quant.base import QuantMethod
from qloader.quant.lifecycle import Quantization

if TYPE_CHECKING:
    from qloader.measure.inventory import Inventory
    from qloader.measure.plan import Plan


@dataclass(frozen=True)
class LoadContext:
    cfg: DictConfig
    overrides: tuple[str, ...] = ()
    # resolve
    checkpoint: Checkpoint | None = None
    hf_config: Any = None
    model_choice: Any = None
    """hf_loading.ModelChoice: the class model.task picks, and why."""
    quantization: Quantization = field(default_factory=Quantization)
    """The merged quantization config, its plug-in, and what decided them (`qloader.quant.lifecycle`)."""
    dtype: Any = None
    save_lock: Any = None
    """With save.enabled: the lock on save.dir (`qloader.core.locks.OwnerLock`), held until the run ends."""
    cache: Any = None
    """`qloader.loading.cache_use.CacheUse`: hit, miss or not cached (None in plan mode); a hit's entry is held
    until the run ends."""
    # instantiate
    quantizer: Any = None
    # validate
    environment: dict = field(default_factory=dict)
    hypothetical_devices: tuple[str, ...] = ()
    """mode=plan: GPUs that device_map.max_memory budgets and this host does not have ('0', '1')."""
    # device_map
    device_map_request: Any = None
    device_map: dict | None = None
    offload_folder: Path | None = None
    refusals: tuple[str, ...] = ()
    """mode=plan: why a load of this device map would be refused (modules on disk without an offload folder, a
    method that cannot run them there); a load raises DeviceMapError instead of recording them."""
    source: Any = None
    """hf_loading.SourceFacts: the skeleton before the quantizer's swaps (checkpoint-side shapes, logical size)."""
    # preprocess
    model: Any = None
    load_config: Any = None
    plan: Plan | None = None
    warnings: tuple[str, ...] = ()
    """One line each: what the run should know that no error stops (modules whose forward cannot run here)."""
    # load
    kernel: Any = None
    loading_info: Any = None
    offload_index: dict | None = None
    # postprocess
    finite_check: str | None = None
    inventory: Inventory | None = None
    # save (only when save.enabled)
    saved: Checkpoint | None = None
    # probe (only when probe.enabled)
    probe: dict | None = None

    def next(self, **changes: Any) -> LoadContext:
        return dataclasses.replace(self, **changes)

    @property
    def method(self) -> QuantMethod | None:
        """The quantization method's plug-in; None when unquantized."""
        return self.quantization.method

    @property
    def quantization_config(self) -> Any:
        """transformers' quantization config object; None when unquantized."""
        return self.quantization.config

    @property
    def pre_quantized(self) -> bool:
        """The weights load as stored, quantized already (a pre-quantized checkpoint, or a cache hit)."""
        return self.quantization.pre_quantized

    @property
    def cache_hit(self) -> bool:
        return self.cache is not None and self.cache.status == "hit"

    @property
    def weights_checkpoint(self) -> Checkpoint | None:
        """The checkpoint the weights are read from: the cached quantized one on a cache hit, else the input."""
        return self.cache.weights if self.cache_hit else self.checkpoint
