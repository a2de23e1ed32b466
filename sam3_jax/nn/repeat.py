"""Running a stack of identical layers either unrolled or as one ``nn.scan``.

Unrolled, the layers are children ``<prefix>_{i}`` of the calling module (the torch numbering).
Scanned, they are one child ``<stacked>`` whose body holds ``<prefix>_0``, every leaf stacked over
the layers on a leading axis (``sam3_jax.model.stacking`` converts between the two). XLA compiles a
scanned body once, so a deep stack costs one layer's compile time, not one per layer.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn


class _Step(nn.Module):
    """One scan step: the layer ``<prefix>_0`` on the carried stream."""

    make_layer: Callable[..., nn.Module]
    prefix: str

    @nn.compact
    def __call__(self, x, *args):
        return self.make_layer(name=f"{self.prefix}_0")(x, *args), None


def repeat(make_layer: Callable[..., nn.Module], length: int, prefix: str, stacked: str | None, x, *args):
    """``x`` through ``length`` layers ``make_layer(name=...)(x, *args)``; ``args`` are the same for
    every layer. ``stacked`` None unrolls; a name scans. Call inside a ``@nn.compact`` method: the
    layers become children of that module."""
    if stacked is None:
        for i in range(length):
            x = make_layer(name=f"{prefix}_{i}")(x, *args)
        return x
    scan = nn.scan(_Step, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * len(args), length=length)
    x, _ = scan(make_layer, prefix, name=stacked)(x, *args)
    return x
