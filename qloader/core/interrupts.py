"""Ctrl-C and SIGTERM end a run or a sweep once, cleanly: the first signal interrupts, repeats wait.

A Ctrl-C reaches every process of the terminal's group (the sweep, its job processes), and a sweep
passes the signal on to its job for a signal sent to the sweep alone: a job process can see the same
interrupt twice. A repeat arriving while the first is being recorded must not cut that record short.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from qloader.core.cluster import slurm_job_id, stop_cause
from qloader.core.errors import RunKilled

HANDLED = (signal.SIGINT, signal.SIGTERM)
_received: str | None = None
"""The signal the current block was interrupted by (`signals_as_interrupt`), None before one arrives."""
_stop_reason: str | None = None
"""Why this process sent itself SIGTERM (`stop_this_process`), for the `killed` record."""


def signal_name(interrupt: BaseException) -> str:
    """`SIGINT` for Ctrl-C (a plain KeyboardInterrupt), else the signal a RunKilled carries."""
    return getattr(interrupt, "signal_name", "SIGINT")


def exit_code(interrupt: BaseException) -> int:
    """128 + the signal number, as a shell reports a process ended by that signal (130, 143)."""
    return 128 + signal.Signals[signal_name(interrupt)].value


def _interrupt_once():
    """A handler that raises for the first signal and ignores the rest."""
    interrupted = False

    def interrupt(signum: int, frame) -> None:
        nonlocal interrupted
        global _received
        if interrupted:
            return
        interrupted = True
        _received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if _stop_reason is None and (stop := stop_cause(name)) is not None:  # the cluster's time limit, scancel...
            raise RunKilled(name, stop[1], cause=stop[0])
        raise RunKilled(name, _stop_reason)

    return interrupt


def _handled() -> tuple[signal.Signals, ...]:
    """SIGINT and SIGTERM; in a SLURM job also SIGUSR2, the warning before its time limit (or at preemption),
    unless this process already handles it (submitit's own process checkpoints and requeues on it)."""
    if slurm_job_id() is not None and signal.getsignal(signal.SIGUSR2) in (signal.SIG_DFL, None):
        return (*HANDLED, signal.SIGUSR2)
    return HANDLED


def as_interrupt(error: BaseException) -> BaseException:
    """The error a run ended with, or, when a signal interrupted the run and a library's code turned the
    KeyboardInterrupt into an error of its own (a half-copied tensor read back, a worker thread's failure), the
    interrupt it was: the run was killed, not failed."""
    if _received is None or isinstance(error, KeyboardInterrupt):
        return error
    what = f"interrupted by {_received} ({type(error).__name__} surfaced: {' '.join(str(error).split())[:200]})"
    return KeyboardInterrupt(what) if _received == "SIGINT" else RunKilled(_received, what)


def stop_this_process(reason: str) -> None:
    """End this process's run as SIGTERM does (a `killed` record naming the stage), with `reason` as its message."""
    global _stop_reason
    _stop_reason = reason
    os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM RunKilled, once; later ones are ignored until the block ends.

    Outside the main thread (where Python cannot set handlers) the block runs with the handlers as they are.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _received
    _received = None
    handler = _interrupt_once()
    previous = {sig: signal.signal(sig, handler) for sig in _handled()}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def install_for_process() -> None:
    """The same handling for the rest of this process (a sweep's launcher, which has no enclosing block)."""
    if threading.current_thread() is threading.main_thread():
        handler = _interrupt_once()
        for sig in _handled():
            signal.signal(sig, handler)
