"""A failed Orbax save or restore is reported once, by the exception it raises, and in a few words.

Orbax's writer threads log a traceback each when a save fails, asyncio reports their failed futures
at exit, and TensorStore's callbacks report "Event loop is closed" once per write in flight: the
filters here keep all of those out of the user's terminal while a save runs (and after one failed).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys


class _WriterFailureLogs(logging.Filter):
    """Drops the log records, a traceback each, of Orbax's writer threads failing and of asyncio
    finding their failed futures at exit: the save raises the same error in the calling thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and (
            record.pathname.endswith(os.path.join("futures", "future.py"))
            or "exception was never retrieved" in record.getMessage()))


def _drop_closed_loop_errors(hook):
    """``sys.unraisablehook`` without the "Event loop is closed" RuntimeErrors that TensorStore's write
    callbacks report, one per write in flight, once a failed save has closed Orbax's event loop, nor
    the error of Orbax's event loop collected at interpreter exit after an interrupted run."""
    def unraisablehook(unraisable):
        value = unraisable.exc_value
        closed = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
        if not closed and getattr(unraisable.object, "__qualname__", "") != "BaseEventLoop.__del__":
            hook(unraisable)
    return unraisablehook


def drop_failed_read_errors(hook):
    """``sys.unraisablehook`` without the errors of Orbax's read coroutines that a failed restore
    leaves behind, collected whenever the garbage collector gets to them: the restore raised the
    same error, and the trainer reports the checkpoint as unreadable once."""
    def unraisablehook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is None or f"{os.sep}orbax{os.sep}" not in code.co_filename:
            hook(unraisable)
    return unraisablehook


@contextlib.contextmanager
def writer_failures_reported_once():
    """While Orbax saves, and after a failed save (its writers and callbacks keep failing until the
    process exits), a failure of its writers is reported once: by the exception the save raises."""
    loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
    quiet, hook = _WriterFailureLogs(), sys.unraisablehook
    for logger in loggers:
        logger.addFilter(quiet)
    sys.unraisablehook = _drop_closed_loop_errors(hook)
    yield  # on an exception the filters stay
    sys.unraisablehook = hook
    for logger in loggers:
        logger.removeFilter(quiet)


def disk_full(e: BaseException | None) -> bool:
    """Whether ENOSPC is the cause of ``e``, however deep in its chain (or only in its text)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def cause(error: BaseException) -> str:
    """The short reason inside an Orbax/TensorStore error: the OS's words for an errno it carries
    ("no space left on device"), else its message without TensorStore's spec dump."""
    text = str(error)
    code = getattr(error, "errno", None) or next(iter(re.findall(r"os_error_code='?(\d+)", text)), None)
    if code:
        return os.strerror(int(code)).lower()
    text = text.split(" [tensorstore_spec")[0].strip() or type(error).__name__
    return text if len(text) <= 300 else "..." + text[-300:]


@contextlib.contextmanager
def failed_saves_reported_once():
    """While training: a failed background save is reported by the `SaveError` the trainer raises,
    not also by the traceback Orbax logs from each thread that waits on it, nor by the "Event loop
    is closed" errors of its writers (`writer_failures_reported_once`)."""
    def quiet(record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)

    absl = logging.getLogger("absl")
    absl.addFilter(quiet)
    with writer_failures_reported_once():
        yield  # on an exception the filters stay: the writers may fail on until the process exits
    absl.removeFilter(quiet)
