"""Running a stack of identical layers either unrolled or as one ``nn.scan``.

Unrolled, the layers are children ``<prefix>_{i}`` of the calling module (the torch numbering).
Scanned, they are one child ``<stacked>`` whose body holds ``<prefix>_0``, every leaf stacked over
the layers on a leading axis (``sam3_jax.model.stacking`` converts between the two). XLA compiles a
scanned body once, so a deep stack costs one layer's compile time, not one per layer.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax


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


def varying_like(tree, like):
    """``tree`` marked as varying over every mesh axis that ``like`` varies over. Inside
    ``shard_map`` a scan's carry must keep its type, and a carry that starts from parameters
    (replicated) but is updated from sharded data would change it in the first step. Outside
    ``shard_map`` nothing varies and ``tree`` is returned as it is."""
    axes = _varying_axes(like)
    if axes is None:  # a JAX whose types this does not read: every manual axis of the mesh
        axes = frozenset(jax.sharding.get_abstract_mesh().manual_axes)

    def cast(x):
        missing = tuple(sorted(axes - (_varying_axes(x) or frozenset())))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def _varying_axes(x) -> frozenset | None:
    """The mesh axes ``x`` varies over inside ``shard_map`` (``ManualAxisType.varying`` in jax 0.10,
    ``vma`` before), or None where the type has neither."""
    aval = jax.typeof(x)
    if hasattr(aval, "manual_axis_type"):
        return frozenset(aval.manual_axis_type.varying)
    return frozenset(aval.vma) if hasattr(aval, "vma") else None
