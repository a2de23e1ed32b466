"""The models' layer stacks and their two parameter layouts.

The models scan every stack (``nn.repeat``): its layers sit under one child ``<stacked>`` as
``<prefix>_{j}``, j < n, every leaf with a leading axis over groups of n consecutive layers: layer
i = g * n + j is index g of ``<stacked>/<prefix>_{j}``. n is 1 where all layers are alike (text
encoder, fusion encoder, decoder, geometry encoder, the tracker's memory attention); for the ViT
it is the period of its windowed/global pattern.

Unrolled, a stack's layers are children ``<prefix>_{i}`` of one module: the torch numbering. That
layout exists only at the conversion boundary (the key map reads and writes it) and in
checkpoints converted before the models were scan-only. ``relayout`` moves a parameter tree
``{"detector": ..., "tracker": ...}`` (or any tree of that shape: gradients, abstract shapes;
either model may be absent) between the layouts; ``unrolled_shapes`` gives the torch-layout
abstract tree of a model's.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from sam3_jax import host_memory
from sam3_jax.model.config import ViTConfig


@dataclasses.dataclass(frozen=True)
class Stack:
    path: tuple[str, ...]  # the module holding the layers, from the root ("detector" or "tracker")
    prefix: str  # unrolled children: f"{prefix}_{i}"
    stacked: str  # the scanned child


VIT = Stack(("detector", "backbone", "vision_backbone", "trunk"), "blocks", "block_groups")
TEXT = Stack(("detector", "backbone", "language_backbone", "encoder", "transformer"), "resblocks", "resblocks_scan")
FUSION_ENCODER = Stack(("detector", "transformer", "encoder"), "layers", "layers_scan")
DECODER = Stack(("detector", "transformer", "decoder"), "layers", "layers_scan")
GEOMETRY = Stack(("detector", "geometry_encoder"), "encode", "encode_scan")
MEMORY_ATTENTION = Stack(("tracker", "transformer", "encoder"), "layers", "layers_scan")
STACKS = (VIT, TEXT, FUSION_ENCODER, DECODER, GEOMETRY, MEMORY_ATTENTION)


def vit_group_size(config: ViTConfig) -> int:
    """Length of the repeating [windowed * (n - 1), global] block pattern that the ViT scans over:
    8 for the official model (global blocks 7, 15, 23, 31)."""
    n = config.global_att_blocks[0] + 1
    if tuple(config.global_att_blocks) != tuple(range(n - 1, config.depth, n)) or config.depth % n:
        raise ValueError(f"the scanned ViT needs global blocks every n-th block up to the last, "
                         f"got {config.global_att_blocks} for depth {config.depth}")
    return n


def scanned_stacks(tree, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[Stack, int]]:
    """Every stack that ``tree`` (a model's parameter tree, or any subtree of one) holds scanned:
    the path of the module holding it -> (the stack, its group size)."""
    found = {}
    if not isinstance(tree, Mapping):
        return found
    for s in STACKS:
        if isinstance(tree.get(s.stacked), Mapping) and f"{s.prefix}_0" in tree[s.stacked]:
            found[path] = (s, len(tree[s.stacked]))
            break
    for key, child in tree.items():
        found.update(scanned_stacks(child, path + (key,)))
    return found


def unrolled(tree) -> dict:
    """``tree`` (any subtree of a model's) with every stack unrolled: the torch layout."""
    for path, (s, _) in scanned_stacks(tree).items():
        tree = _put(tree, path, unstack(_get(tree, path), s))
    return tree


def stacked_like(tree, like, *, owned: bool = False) -> dict:
    """``tree``, unrolled, with the stacks that ``like`` (the same subtree) holds scanned stacked
    (``owned``: as in `relayout`)."""
    for path, (s, n) in scanned_stacks(like).items():
        tree = _put(tree, path, stack(_get(tree, path), s, n, owned=owned))
    return tree


def unrolled_shapes(abstract) -> dict:
    """``abstract`` (``jax.ShapeDtypeStruct`` or array leaves) as shapes in the torch layout."""
    return jax.eval_shape(unrolled, abstract)


def layout(params: dict) -> dict[Stack, int]:
    """The stacks that ``params`` holds scanned, with their group sizes."""
    sizes = {}
    for s in STACKS:
        module = _get(params, s.path)
        if isinstance(module, Mapping) and s.stacked in module:
            sizes[s] = len(module[s.stacked])
    return sizes


def relayout(params: dict, sizes: dict[Stack, int], *, owned: bool = False) -> dict:
    """``params`` with the stacks in ``sizes`` scanned (in groups of that size) and every other
    stack unrolled. Leaves are moved, sliced or stacked, never changed. ``owned``: the caller hands
    ``params`` over (e.g. a fresh restore): its moved layers are dropped from it as they are moved
    and their memory handed back, a group of layers at a time, so that the two layouts are never
    both alive in host memory (benchmarks/README.md)."""
    have = layout(params)
    for s in STACKS:
        module = _get(params, s.path)
        if have.get(s) == sizes.get(s) or not isinstance(module, Mapping):  # as asked, or a model not held
            continue
        if s in have:
            module = unstack(module, s, owned=owned)
        if s in sizes:
            module = stack(module, s, sizes[s], owned=owned)
        params = _put(params, s.path, module)
    return params


def stack(module: dict, s: Stack, n: int, *, owned: bool = False) -> dict:
    """The module dict holding ``s`` with its layers unrolled -> scanned in groups of ``n``
    (``owned``: as in `relayout`, the layers are removed from ``module`` as they are stacked)."""
    is_layer = re.compile(rf"{s.prefix}_\d+").fullmatch  # not e.g. the geometry encoder's encode_norm
    depth = sum(bool(is_layer(k)) for k in module)
    if depth % n:
        raise ValueError(f"{'/'.join(s.path)}: {depth} layers do not split into groups of {n}")
    out = {k: v for k, v in module.items() if not is_layer(k)}
    layers = [_take(module, f"{s.prefix}_{i}", owned) for i in range(depth)]
    out[s.stacked] = {}
    for j in range(n):
        group = layers[j::n]
        out[s.stacked][f"{s.prefix}_{j}"] = _settled(traverse_util.unflatten_dict(
            {key: jnp.stack([layer.pop(key) for layer in group]) for key in list(group[0])}), owned)
    return out


def unstack(module: dict, s: Stack, *, owned: bool = False) -> dict:
    """Inverse of ``stack``."""
    out = {k: v for k, v in module.items() if k != s.stacked}
    groups = module[s.stacked]  # owned: emptied group by group below
    n = len(groups)
    for j in range(n):
        stacked = _take(groups, f"{s.prefix}_{j}", owned)
        slices = {key: list(stacked.pop(key)) for key in list(stacked)}  # each stacked leaf dropped once split
        count = len(next(iter(slices.values())))
        out.update(_settled({f"{s.prefix}_{g * n + j}": traverse_util.unflatten_dict({k: v[g] for k, v in slices.items()})
                             for g in range(count)}, owned))
    return out


def _take(module: dict, key: str, owned: bool) -> dict:
    """``module[key]`` flattened to path -> leaf (a dict of our own), removed from ``module`` when
    the caller ``owned`` it: then the returned dict holds the only references to its leaves."""
    return traverse_util.flatten_dict(module.pop(key) if owned else module[key])


def _settled(tree, owned: bool):
    """``tree``; when the caller ``owned`` the layers it replaces, once its arrays are computed (their
    inputs freed) the freed host memory is handed back (`host_memory.trim`), so that the peak stays
    near the parameters' size."""
    if owned:
        jax.block_until_ready(tree)
        host_memory.trim()
    return tree


def _get(tree, path):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _put(tree, path, value):
    """A copy of the nested dict ``tree`` with ``value`` at ``path``."""
    return value if not path else {**tree, path[0]: _put(tree[path[0]], path[1:], value)}
