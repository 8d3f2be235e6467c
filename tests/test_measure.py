"""Per-stage memory: each stage sees its own peak, not the process's peak so far."""

from __future__ import annotations

import time

import pytest

from qloader.measure.memory import _read_status, measure_stage, memory_method

MiB = 2**20


@pytest.mark.skipif(memory_method()["rss_peak"] is None, reason="no VmHWM reset on this platform")
def test_stage_peaks_are_per_stage() -> None:
    with measure_stage("big") as big:
        block = bytearray(200 * MiB)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        # some kernels (gVisor's) update the high-water mark lazily: wait for it to see the block, while it is held
        deadline = time.monotonic() + 10
        while (_read_status("VmHWM")["VmHWM"] or 0) < big.rss_start_bytes + 190 * MiB and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = (_read_status("VmHWM")["VmHWM"] or 0) >= big.rss_start_bytes + 190 * MiB
        del block
    if not seen:
        pytest.skip("this kernel's VmHWM did not follow a 200 MiB allocation held for 10 s")
    with measure_stage("small") as small:
        small_block = bytearray(8 * MiB)
        del small_block
    assert big.rss_peak_bytes - big.rss_start_bytes >= 190 * MiB
    assert big.anon_peak_bytes - big.anon_start_bytes >= 190 * MiB
    assert small.rss_peak_bytes - small.rss_start_bytes < 100 * MiB  # the earlier 200 MiB is not counted
    assert small.anon_peak_bytes - small.anon_start_bytes < 100 * MiB
    assert big.status == small.status == "succeeded" and big.wall_s > 0


def test_failed_stage_is_still_measured() -> None:
    with pytest.raises(RuntimeError), measure_stage("broken") as stats:
        raise RuntimeError("boom")
    assert stats.status == "failed" and stats.wall_s >= 0 and stats.rss_peak_bytes is not None


@pytest.mark.skipif(memory_method()["anon_peak"] is None, reason="no RssAnon on this platform")
def test_a_starved_sampler_marks_the_peak_inexact() -> None:
    """A sampler that cannot run (stopped here, descheduled on a busy machine) misses a short-lived peak:
    the stage says so, with the gap, instead of passing the figure off as the peak."""
    import os
    import signal

    from qloader.measure.memory import EXACT_GAP_S, PeakSampler

    sampler = PeakSampler.shared()
    with measure_stage("calm") as calm:
        pass
    with measure_stage("starved") as starved:
        os.kill(sampler._proc.pid, signal.SIGSTOP)
        try:
            block = bytearray(100 * MiB)
            block[::4096] = b"x" * len(block[::4096])  # touch every page
            del block  # gone before the sampler runs again
            time.sleep(3 * EXACT_GAP_S)
        finally:
            os.kill(sampler._proc.pid, signal.SIGCONT)
    assert starved.anon_peak_exact is False and starved.anon_max_gap_ms >= 3000 * EXACT_GAP_S
    assert starved.anon_peak_bytes - starved.anon_start_bytes < 50 * MiB  # the 100 MiB peak was missed
    assert calm.anon_max_gap_ms is not None and calm.anon_max_gap_ms >= 0
