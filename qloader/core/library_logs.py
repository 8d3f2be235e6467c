"""Library chatter goes to the run's `qloader.log`, not the terminal.

bitsandbytes, torchao and the kernels hub log warnings on every run that tell a user nothing they
can act on (a CPU kernel that could not be fetched, CUDA extensions missing on a CPU host, a dtype
cast repeated for every int8 layer); optimum's GPTQ quantizer logs a line per layer it calibrates and
per module it packs, beside its own progress bar. During a run their `logging` records and Python `warnings`
raised from their code are written to the log file only. qloader's own messages and errors, and
every other library's, reach the terminal as before.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

LIBRARY_LOGGERS = (
    "bitsandbytes",
    "torchao",
    "kernels",
    "optimum.quanto",
    "optimum.gptq",  # a line per layer and per packed module, beside the per-block progress bar
    "torch.utils._pytree",  # torchao's import registers enums the way torch now deprecates, once per enum
)
"""Loggers whose records go to the log file only."""
LIBRARY_PACKAGES = ("bitsandbytes", "torchao", "kernels", "optimum/quanto")
"""Packages whose own `warnings.warn` calls go to the log file only (matched on the warning's file)."""
FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def _from_library(filename: str) -> bool:
    path = Path(filename).as_posix()
    return any(f"/site-packages/{package}/" in path for package in LIBRARY_PACKAGES)


@contextmanager
def library_records_to(log_path: Path) -> Iterator[None]:
    """While the block runs, the libraries' log records and warnings go to `log_path` (appended)."""
    with ExitStack() as stack:
        handler = _file_handler(log_path)
        if handler is None:  # no log file can be written: leave the terminal as it was
            yield
            return
        stack.callback(handler.close)
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            previous = logger.propagate
            logger.addHandler(handler)
            logger.propagate = False
            stack.callback(setattr, logger, "propagate", previous)
            stack.callback(logger.removeHandler, handler)
        stack.enter_context(warnings.catch_warnings())  # restores showwarning afterwards
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if not _from_library(filename):
                shown(message, category, filename, lineno, file, line)
                return
            text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
            fields = {"name": "py.warnings", "levelname": "WARNING", "levelno": logging.WARNING, "msg": text}
            handler.handle(logging.makeLogRecord(fields))

        warnings.showwarning = show
        yield


OWN_LOGGER = "qloader"


class ConsoleFormatter(logging.Formatter):
    """qloader's own records as `qloader: warning: ...`, beside its `qloader: error: ...` lines (info as
    `qloader: ...`); any other logger's in Hydra's format. conf/config.yaml gives it to Hydra's console handler."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if record.name != OWN_LOGGER and not record.name.startswith(f"{OWN_LOGGER}."):
            return super().format(record)
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{OWN_LOGGER}: {level}{record.getMessage()}"


@contextmanager
def own_records_to(log_path: Path) -> Iterator[None]:
    """Where nothing configured logging (`qloader.load` in a script, a sweep job's own process), qloader's records
    print on stderr as under the CLI and go to the run's log; where something did (Hydra, pytest, a user), its
    handlers take them as before."""
    logger = logging.getLogger(OWN_LOGGER)
    if logger.hasHandlers():
        yield
        return
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ConsoleFormatter())
    handlers = [console, *filter(None, [_file_handler(log_path)])]
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def _file_handler(log_path: Path) -> logging.Handler | None:
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path, mode="a", encoding="utf-8", delay=True)  # no record, no file
    except OSError:
        return None
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler
