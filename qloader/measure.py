"""Per-stage measurement: wall time, peak RSS and peak anonymous RSS *during* the stage, CUDA peaks.

Peak RSS comes from the kernel's high-water mark (`VmHWM`), reset at each stage start through
`/proc/self/clear_refs`. The kernel keeps no such mark for anonymous memory, so a sampler thread
reads `RssAnon` every few milliseconds. Where `/proc` lacks these, figures are None and
`MEMORY_METHOD` says why.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
SAMPLE_INTERVAL_S = 0.002


def _read_status(*keys: str) -> dict[str, int | None]:
    """Values in bytes of `VmHWM`, `RssAnon`, ... from /proc/self/status (None where absent)."""
    values: dict[str, int | None] = dict.fromkeys(keys)
    try:
        for line in STATUS.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in values:
                values[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def _reset_hwm() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False where the platform does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def memory_method() -> dict[str, str | None]:
    """How the figures are taken on this host, and which are unavailable (recorded in the manifest)."""
    status = _read_status("VmHWM", "RssAnon")
    return {
        "rss_peak": "VmHWM, reset per stage via /proc/self/clear_refs"
        if status["VmHWM"] is not None and _reset_hwm()
        else None,
        "anon_peak": f"RssAnon sampled every {SAMPLE_INTERVAL_S * 1000:g} ms"
        if status["RssAnon"] is not None
        else None,
    }


class _AnonSampler(threading.Thread):
    """Tracks the highest RssAnon seen while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="qloader-anon-sampler")
        self.peak: int | None = _read_status("RssAnon")["RssAnon"]
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        value = _read_status("RssAnon")["RssAnon"]
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value

    def stop(self) -> int | None:
        self._stop_event.set()
        self.join()
        self._sample()
        return self.peak


@dataclass
class StageStats:
    name: str
    wall_s: float = 0.0
    rss_start_bytes: int | None = None
    rss_peak_bytes: int | None = None
    anon_start_bytes: int | None = None
    anon_peak_bytes: int | None = None
    cuda: dict[str, dict[str, int]] | None = None
    status: str = "running"
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"}


def _cuda_ready():
    """torch.cuda, if torch is already imported and CUDA initialised; measuring never imports torch."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def _cuda_reset() -> None:
    if cuda := _cuda_ready():
        for index in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(index)


def _cuda_peaks() -> dict[str, dict[str, int]] | None:
    if not (cuda := _cuda_ready()):
        return None
    return {
        f"cuda:{i}": {
            "peak_allocated_bytes": cuda.max_memory_allocated(i),
            "peak_reserved_bytes": cuda.max_memory_reserved(i),
        }
        for i in range(cuda.device_count())
    }


@contextmanager
def measure_stage(name: str) -> Iterator[StageStats]:
    """Measure the enclosed block as one stage; the stats are filled in on exit, also on failure."""
    stats = StageStats(name=name)
    hwm_reset = _reset_hwm()
    start = _read_status("VmRSS", "RssAnon")
    stats.rss_start_bytes, stats.anon_start_bytes = start["VmRSS"], start["RssAnon"]
    _cuda_reset()
    sampler = _AnonSampler()
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield stats
        stats.status = "succeeded"
    except BaseException:
        stats.status = "failed"
        raise
    finally:
        stats.wall_s = round(time.perf_counter() - t0, 4)
        stats.anon_peak_bytes = sampler.stop()
        stats.rss_peak_bytes = _read_status("VmHWM")["VmHWM"] if hwm_reset else None
        stats.cuda = _cuda_peaks()
