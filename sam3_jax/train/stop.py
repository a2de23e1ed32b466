"""SIGTERM (a scheduler's preemption, ``kill``) stops a run as Ctrl-C does: `Stopped`, a
KeyboardInterrupt, unwinds the trainer, so the pending checkpoint is finished and the data workers
end with it. An exception raised by a signal handler is lost when it lands in a ``__del__`` or a
callback, so the signal is also remembered and `check` (called once a step) raises it again.
"""
from __future__ import annotations

import signal

_received: list[str] = []


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (its name is the message)."""


def _handler(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)
    raise Stopped(_received[-1])


def install() -> None:
    """Makes SIGTERM raise `Stopped` in the main thread (SIGINT already raises KeyboardInterrupt)."""
    signal.signal(signal.SIGTERM, _handler)


def check() -> None:
    """Raises `Stopped` if a signal came whose exception was swallowed on the way."""
    if _received:
        raise Stopped(_received[-1])
