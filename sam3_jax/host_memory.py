"""Handing freed host memory back to the operating system.

glibc serves allocations under its (adaptive, at most 32 MiB) mmap threshold from its heap and keeps
what is freed there for reuse, so a process that replaces many such buffers by larger ones keeps
both in its resident set: stacking the official detector's restored layers (`stacking.relayout`)
left the freed unstacked layers resident beside the stacked ones until `trim`
(benchmarks/README.md)."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def trim() -> None:
    """Returns the free pages of every malloc arena to the OS (glibc ``malloc_trim(0)``); a no-op
    where the C library has no such call."""
    if (fn := _malloc_trim()) is not None:
        fn(0)
