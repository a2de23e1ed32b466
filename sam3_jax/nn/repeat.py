"""Running a stack of layers as one ``nn.scan``.

The scan steps over a repeating unit of n layers: n = 1 where all layers are alike, the period of
the pattern otherwise (the ViT's windowed and global blocks). The layers sit under one child
``<stacked>`` of the calling module as ``<prefix>_{j}``, j < n, every leaf with a leading axis over
the steps: layer i = g * n + j is index g of ``<stacked>/<prefix>_{j}``. XLA compiles the body once,
so a deep stack costs one step's compile time, not one per layer. The torch checkpoint numbers the
layers ``<prefix>_{i}``; `sam3_jax.model.stacking` converts between the two layouts.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax


class _Step(nn.Module):
    """One scan step: one period of the stack, layers ``<prefix>_0 .. <prefix>_{n-1}``, each given
    its own slice of the per-layer inputs."""

    period: Sequence[Callable[..., nn.Module]]
    prefix: str

    @nn.compact
    def __call__(self, x, per_step, *args):
        for j, make_layer in enumerate(self.period):
            x = make_layer(name=f"{self.prefix}_{j}")(x, *(p[j] for p in per_step), *args)
        return x, None


def repeat(period: Sequence[Callable[..., nn.Module]], length: int, prefix: str, stacked: str, x, *args,
           per_layer: tuple = ()):
    """``x`` through ``length`` repetitions of ``period``, as one scan.

    ``period[j](name=...)`` builds layer j of the repeating unit (one entry where all layers are
    alike); each is called as ``layer(x, *per_layer_slices, *args)``: every ``per_layer`` array has a
    leading axis of ``length * len(period)``, one entry per layer (e.g. drop-path rates), and
    ``args`` are the same for every layer. Call inside a ``@nn.compact`` method: the stack becomes
    its child ``stacked``."""
    per_step = tuple(p.reshape(length, len(period), *p.shape[1:]) for p in per_layer)
    scan = nn.scan(_Step, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(0,) + (nn.broadcast,) * len(args), length=length, unroll=unroll(length))
    x, _ = scan(tuple(period), prefix, name=stacked)(x, per_step, *args)
    return x


_UNROLLED = [False]


@contextlib.contextmanager
def unrolled():
    """Within it, every stack's scan is traced fully unrolled: the same parameters, but no loop in
    the program, for XLA's cost analysis (which counts a loop's body once). Only what is traced
    within it: ``jax.jit`` reuses a function's earlier trace."""
    _UNROLLED.append(True)
    try:
        yield
    finally:
        _UNROLLED.pop()


def unroll(length: int) -> int:
    """The ``unroll`` of a stack's scan of ``length`` steps: 1, or all of them within `unrolled`."""
    return length if _UNROLLED[-1] else 1


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
