"""SIGTERM (a scheduler's preemption, ``kill``) stops a run as Ctrl-C does, at the end of the
current step: the handler only records the signal, and `check` (called once a step) raises
`Stopped`, a KeyboardInterrupt, which unwinds the trainer so the pending checkpoint is finished and
the data workers end with it. An exception raised from the handler itself would land wherever the
main thread happened to be (inside a checkpoint save, a ``__del__``, a callback) and be lost or
leave that work half done.
"""
from __future__ import annotations

import signal

_received: list[str] = []


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (its name is the message)."""


def _handler(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def install() -> None:
    """Makes SIGTERM stop the run at the next `check` (SIGINT raises KeyboardInterrupt at once)."""
    signal.signal(signal.SIGTERM, _handler)


def check() -> None:
    """Raises `Stopped` if a SIGTERM came."""
    if _received:
        raise Stopped(_received[-1])
