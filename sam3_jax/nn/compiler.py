"""XLA compiler options for the jits that run the detector's image encoder at full width on CPUs.

On CPUs, XLA (jaxlib 0.10) hands dots to YNNPACK ("YNN fusions") by default. Which of that and
XLA's own dot is faster depends on the shape: XLA's own is faster for the full-width ViT's large
GEMMs and slower for small ones (benchmarks/README.md). So the jits dominated by a full-width image
encoder (``ViTConfig.embed_dim`` >= 1024) turn the YNN fusions off on CPUs, and everything else
keeps XLA's defaults; ``ViTConfig.cpu_ynn`` overrides that choice.

The option is experimental: where an XLA does not know it, nothing is set (checked once, by
compiling a no-op with it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sam3_jax.nn import platform

YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}
FULL_WIDTH = 1024  # ViT widths from which YNN_OFF pays (the official model's)


@functools.cache
def _known(option: str, value: str) -> bool:
    """Whether this XLA accepts the compile option (unknown ones fail the compile)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={option: value}).lower(jnp.zeros(())).compile()
    except Exception:  # noqa: BLE001 - XLA reports an unknown option as a runtime error
        return False
    return True


def encoder_options(cfg) -> dict:
    """``compiler_options`` for a jit whose cost is the image encoder of ``cfg`` (a ``ModelConfig``;
    see the module docstring)."""
    ynn = cfg.vit.cpu_ynn if cfg.vit.cpu_ynn is not None else cfg.vit.embed_dim < FULL_WIDTH
    if platform.current() != "cpu" or ynn:
        return {}
    return {k: v for k, v in YNN_OFF.items() if _known(k, v)}

