"""Where the parameters and their optimiser state live on the mesh: replicated on every device, or,
with ``mesh.shard_params``, sharded over all of them (FSDP / ZeRO-3).

Replicated, AdamW costs every device 16 bytes a parameter (parameters, gradients, two moments):
13.6 GB for SAM 3. Sharded, each device keeps 1/n of the parameters and of their Adam moments; the
step gathers the parameters where the model runs (`gather`, at the ``shard_map`` of
`step.make_loss_fn`) and XLA's SPMD partitioner turns the transpose of that gather into a
reduction of the gradients that leaves each device its shard, so the optimiser updates shards only.

How each leaf is laid out is decided by one table, `RULES` (path regex -> rule, first match wins):

* ``fsdp``: the leaf's largest dimension that the device count divides is split over every mesh
  axis. A scanned stack's leading layer axis is never the one (each scan step slices it);
* ``replicate``: whole on every device.

Leaves under `MIN_SHARDED` elements, and those no dimension of which the device count divides,
stay replicated: their gathers would cost more than they save.
"""
from __future__ import annotations

import math
import re

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from sam3_jax.model import stacking
from sam3_jax.train import param_groups

FSDP, REPLICATE = "fsdp", "replicate"
RULES = (
    (r"/(bias|scale)$", REPLICATE),  # biases and norm scales: vectors of a layer's width
    (r"", FSDP),
)
MIN_SHARDED = 1 << 14  # elements
_STACKED = re.compile("|".join(rf"(^|/){s.stacked}/" for s in stacking.STACKS))


def leaf_spec(path: str, shape: tuple[int, ...], devices: int, axes: tuple[str, ...]) -> P:
    """The ``PartitionSpec`` of one parameter (see the module docstring)."""
    rule = next(rule for pattern, rule in RULES if re.search(pattern, path))
    if rule == REPLICATE or devices == 1 or math.prod(shape) < MIN_SHARDED:
        return P()
    first = 1 if _STACKED.search(path) else 0
    candidates = [d for d in range(first, len(shape)) if shape[d] % devices == 0]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda d: (shape[d], d))
    return P(*([None] * dim), axes)


def param_specs(abstract_params, mesh, shard: bool):
    """A ``PartitionSpec`` for every leaf of ``abstract_params``: all ``P()`` unless ``shard``."""
    axes = tuple(mesh.axis_names)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: leaf_spec(param_groups.path_str(p), tuple(x.shape), mesh.size, axes) if shard else P(),
        abstract_params)


def with_shardings(abstract, mesh, specs):
    """``jax.ShapeDtypeStruct``s of ``abstract`` placed on ``mesh`` as ``specs`` says."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                        abstract, specs)


def abstract_state(init_state, abstract_params, mesh, specs):
    """The train state ``init_state(params)`` would build from parameters laid out as ``specs``, as
    ``jax.ShapeDtypeStruct``s with concrete shardings: each optimiser moment follows its
    parameter (explicit sharding carries the layout through ``init``), scalars are replicated."""
    params = with_shardings(abstract_params, mesh, specs)
    shaped = jax.eval_shape(init_state, params)

    def place(x):
        spec = getattr(getattr(x, "sharding", None), "spec", P())
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(place, shaped)


def shardings(abstract):
    """The ``sharding`` of every leaf of an abstract tree (for ``out_shardings`` and ``device_put``)."""
    return jax.tree.map(lambda x: x.sharding, abstract)


def gather(params):
    """The parameters whole on every device (a no-op for replicated ones), inside a jit under the
    mesh; its transpose hands each device its shard of the gradients."""
    def whole(x):
        spec = getattr(jax.typeof(x).sharding, "spec", P())
        return x if all(s is None for s in spec) else jax.sharding.reshard(x, P())

    return jax.tree.map(whole, params)


def sharded_bytes(abstract_params, specs, mesh) -> tuple[int, int]:
    """(bytes of the parameters, bytes of one device's share of them) under ``specs``."""
    total = per_device = 0
    for x, spec in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
        size = math.prod(x.shape) * x.dtype.itemsize
        total += size
        per_device += size // (mesh.size if any(s is not None for s in spec) else 1)
    return total, per_device
