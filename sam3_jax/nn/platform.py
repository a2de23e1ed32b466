"""The platform that the code being traced will run on.

Kernel and tiling choices differ by platform (cuDNN attention on GPUs, attention tiles and conv
lowering on CPUs). They ask `current()` rather than ``jax.default_backend()``, so that an
ahead-of-time compile for another platform (a TPU topology compiled from a CPU host) traces that
platform's choices: ``with platform.target("tpu"): jit(f).lower(...)``.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("sam3_jax_target_platform", default=None)


def current() -> str:
    """"cpu", "gpu" or "tpu": the compile target set by `target`, else jax's default backend."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target(name: str):
    """Traces inside this block choose kernels for platform ``name``. jit caches its traces by
    arguments, not by this setting: lower a fresh jit here, don't reuse one traced outside."""
    token = _TARGET.set(name)
    try:
        yield
    finally:
        _TARGET.reset(token)
