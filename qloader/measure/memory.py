"""Per-stage measurement: wall time, peak RSS and peak anonymous RSS *during* the stage, CUDA peaks.

Peak RSS comes from the kernel's high-water mark (`VmHWM`), reset at each stage start through
`/proc/self/clear_refs`. The kernel keeps no such mark for anonymous memory, so a helper process
reads this process's `RssAnon` every few milliseconds. On a busy machine the helper can be descheduled
and miss a short peak: it records its longest gap between two samples, and a stage whose gap exceeded
`EXACT_GAP_S` is marked `anon_peak_exact: false` (the true peak is at least the recorded one).
Where `/proc` lacks these, figures are None and `memory_method()` says why.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
SAMPLE_INTERVAL_S = 0.002
EXACT_GAP_S = 0.02
"""A sampling gap over ten intervals: an allocation that lived shorter than that could be missed."""


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
        "anon_peak": f"RssAnon sampled every {SAMPLE_INTERVAL_S * 1000:g} ms by a helper process; a stage whose"
        f" longest sampling gap exceeded {EXACT_GAP_S * 1000:g} ms has anon_peak_exact false"
        if status["RssAnon"] is not None
        else None,
    }


# Runs in its own process, so it keeps sampling while this one holds the GIL in a long C call.
# Each line on stdin asks for the peak since the previous line and the longest gap between two
# samples in that window (microseconds), answered on stdout as "PEAK GAP".
_SAMPLER = r"""
import select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the measured process's to handle; EOF ends this one
path, interval, field = f"/proc/{sys.argv[1]}/status", float(sys.argv[2]), sys.argv[3] + ":"
def anon():
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
peak, gap, last = anon() or 0, 0.0, time.monotonic()
while True:
    ready = select.select([sys.stdin], [], [], interval)[0]
    value = anon()
    if value is None:
        break
    now = time.monotonic()
    peak, gap, last = max(peak, value), max(gap, now - last), now
    if ready:
        if not sys.stdin.readline():
            break
        print(peak, int(gap * 1e6), flush=True)
        peak, gap = value, 0.0
"""


class PeakSampler:
    """A helper process that tracks this process's peak `field` (RssAnon, VmRSS) between two `peak()` calls.

    Stages share one (`shared()`); an independent instance measures across stages without disturbing them.
    """

    _instance: PeakSampler | None = None

    def __init__(self, field: str = "RssAnon") -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-S", "-E", "-c", _SAMPLER, str(os.getpid()), str(SAMPLE_INTERVAL_S), field],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        atexit.register(self._proc.kill)

    @classmethod
    def shared(cls) -> PeakSampler | None:
        if _read_status("RssAnon")["RssAnon"] is None:
            return None
        if cls._instance is None or cls._instance._proc.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def peak(self) -> int | None:
        """The highest value since the last call (the first call starts the window)."""
        return self.window()[0]

    def window(self) -> tuple[int | None, float | None]:
        """The highest value since the last call, and the longest gap between two samples (seconds)."""
        try:
            self._proc.stdin.write("\n")
            self._proc.stdin.flush()
            peak, gap_us = self._proc.stdout.readline().split()
            return int(peak), int(gap_us) / 1e6
        except (OSError, ValueError):
            return None, None

    def close(self) -> None:
        """End the helper process (it exits when its stdin closes)."""
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()


@dataclass
class StageStats:
    name: str
    wall_s: float = 0.0
    rss_start_bytes: int | None = None
    rss_peak_bytes: int | None = None
    anon_start_bytes: int | None = None
    anon_peak_bytes: int | None = None
    anon_peak_exact: bool | None = None
    """False when the sampler was starved (gap over EXACT_GAP_S): the true peak may be higher."""
    anon_max_gap_ms: float | None = None
    """The longest gap between two RssAnon samples during the stage."""
    cuda: dict[str, dict[str, int]] | None = None
    status: str = "running"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


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
    sampler = PeakSampler.shared()
    if sampler is not None:
        sampler.peak()  # opens this stage's window
    t0 = time.perf_counter()
    try:
        yield stats
        stats.status = "succeeded"
    except BaseException as error:
        stats.status = "killed" if isinstance(error, KeyboardInterrupt) else "failed"
        raise
    finally:
        stats.wall_s = round(time.perf_counter() - t0, 4)
        if sampler is not None:
            stats.anon_peak_bytes, gap = sampler.window()
            if gap is not None:
                stats.anon_max_gap_ms = round(gap * 1000, 1)
                stats.anon_peak_exact = gap <= EXACT_GAP_S
        stats.rss_peak_bytes = _read_status("VmHWM")["VmHWM"] if hwm_reset else None
        stats.cuda = _cuda_peaks()


@contextmanager
def peak_window() -> Iterator[dict]:
    """The peak anonymous RSS of the enclosed block (a sampler of its own, so the enclosing stage's window stays
    whole) and, with CUDA, the peak allocated bytes since the enclosing stage began (summed over devices); the
    dict is filled in on exit. For a measurement inside a stage, such as generation in the probe."""
    figures: dict = {"peak_anon_bytes": None, "peak_anon_exact": None, "cuda_peak_allocated_bytes": None}
    sampler = PeakSampler() if _read_status("RssAnon")["RssAnon"] is not None else None
    if sampler is not None:
        sampler.peak()  # opens the window
    try:
        yield figures
    finally:
        if sampler is not None:
            figures["peak_anon_bytes"], gap = sampler.window()
            figures["peak_anon_exact"] = None if gap is None else gap <= EXACT_GAP_S
            sampler.close()
        if cuda := _cuda_peaks():
            figures["cuda_peak_allocated_bytes"] = sum(d["peak_allocated_bytes"] for d in cuda.values())
