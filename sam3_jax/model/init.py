"""From-scratch initialisation as the reference's modules give it (what Flax's defaults do not).

Meta's checkpoints are trained from a pretrained backbone, but every head of SAM 3 starts from the
initialisers of its PyTorch modules, and DETR-style decoders are sensitive to them: with Flax's
defaults the queries start nearly identical (an ``Embed`` of std 1/sqrt(d) instead of N(0, 1)) and
the box head predicts offsets from the first step, and a from-scratch detector collapses onto
input-independent predictions. `reference_init` rewrites a freshly initialised parameter tree
with, in order of precedence:

* the reference's explicit choices: ViT ``Linear`` weights and position tables N(0, 0.02) with zero
  biases (``vitdet._init_weights``); in the fusion transformer every matrix Xavier-uniform except
  the box head, queries and reference points (``TransformerWrapper._reset_parameters``); queries and
  reference points N(0, 1); the last layer of the box head zero; tracker tokens N(0, 0.02);
* PyTorch's defaults elsewhere: ``Linear``/``Conv`` weights and biases U(+-1/sqrt(fan_in)) (fan_in
  of a transposed conv is its output channels x kernel area, as torch computes it),
  ``MultiheadAttention`` in-projection Xavier-uniform with zero biases, ``Embedding`` N(0, 1), norms
  one and zero.

Parameters the reference leaves uninitialised (``torch.empty``: the text encoder's positional
table) get CLIP's N(0, 0.01). `tests/parity/test_init_parity.py` compares every tensor's
distribution with the reference's freshly built modules.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sam3_jax.convert import keymap

# (pattern on the "/"-joined path, rule); the first match wins. timm's trunc_normal_(std=0.02) cuts
# at +-2, i.e. 100 standard deviations: a plain normal. Blocks are ``blocks_i`` or, with
# ``scan_blocks``, one stacked ``blocks``.
_EXPLICIT: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"vision_backbone/trunk/blocks(_\d+)?/.*/kernel$", "normal_0.02"),
    (r"vision_backbone/trunk/blocks(_\d+)?/.*/bias$", "zeros"),
    (r"vision_backbone/trunk/(pos_embed|.*rel_pos_[hw])$", "normal_0.02"),
    (r"^transformer/.*box_embed/layers_\d+/(kernel|bias)$", "box_head"),
    (r"^transformer/.*(query_embed|reference_points)/embedding$", "normal_1"),
    (r"^transformer/.*(kernel|embedding|level_embed)$", "xavier"),
    (r"language_backbone/encoder/positional_embedding$", "normal_0.01"),
    (r"(maskmem_tpos_enc|no_mem_embed|no_mem_pos_enc|no_obj_ptr|no_obj_embed_spatial)$", "normal_0.02"),
))


def reference_init(params, rng: jax.Array):
    """A module tree's freshly initialised ``params`` re-initialised as the reference initialises the
    same modules; raw parameters without a torch counterpart rule (e.g. a layer scale's ``gamma``)
    keep their module's initialiser. Jittable."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for i, path in enumerate(sorted(flat)):
        leaf, rule = flat[path], rule_for(path, flat)
        out[path] = leaf if rule is None else _sample(rule, leaf.shape, leaf.dtype, jax.random.fold_in(rng, i))
    return traverse_util.unflatten_dict(out)


def rule_for(path: tuple[str, ...], flat: dict) -> tuple | None:
    """The reference's initialiser for the leaf at ``path`` of the flattened tree ``flat``:
    ("normal", std) | ("uniform", bound) | ("constant", c), or None for a raw parameter whose
    module initialises it as the reference does."""
    name = "/".join(path)
    parent, leaf = path[:-1], path[-1]
    for pattern, rule in _EXPLICIT:
        if not pattern.search(name):
            continue
        if rule.startswith("normal_"):
            return ("normal", float(rule.split("_")[1]))
        if rule == "zeros":
            return ("constant", 0.0)
        if rule == "xavier":
            return ("uniform", _xavier_bound(flat[path].shape))
        if rule == "box_head":  # the last layer predicts zero offsets; the others are torch Linear
            layers = {p[-2] for p in flat if p[:-2] == parent[:-1]}
            if path[-2] == max(layers, key=lambda s: int(s.rsplit("_", 1)[1])):
                return ("constant", 0.0)
            break
    siblings = {p[-1] for p in flat if p[:-1] == parent}
    if leaf == "scale":
        return ("constant", 1.0)
    if leaf == "embedding":
        return ("normal", 1.0)
    if leaf == "in_proj_kernel":
        return ("uniform", _xavier_bound(flat[path].shape))
    if leaf == "in_proj_bias":
        return ("constant", 0.0)
    if leaf == "bias":
        if "scale" in siblings or "kernel" not in siblings:  # a norm's shift
            return ("constant", 0.0)
        if parent[-1] == "out_proj" and parent[:-1] + ("in_proj_kernel",) in flat:  # MultiheadAttention
            return ("constant", 0.0)
        return ("uniform", 1.0 / np.sqrt(_fan_in(parent + ("kernel",), flat[parent + ("kernel",)].shape)))
    if leaf == "kernel":
        return ("uniform", 1.0 / np.sqrt(_fan_in(path, flat[path].shape)))
    return None


def _fan_in(path, shape) -> int:
    if len(shape) == 2:  # Linear (in, out)
        return shape[0]
    kh, kw, cin, cout = shape  # Conv (kh, kw, in, out); a transposed conv's torch weight is
    # (in, out, kh, kw), and torch takes its fan_in from dim 1: out x kh x kw.
    return kh * kw * (cout if keymap.CONV_TRANSPOSE_FLAX.search("/".join(path)) else cin)


def _xavier_bound(shape) -> float:
    """Xavier-uniform of the torch tensor: (out, in) matrices and (n, d) tables alike."""
    if len(shape) == 2:
        fan_a, fan_b = shape
    else:  # conv (kh, kw, in, out)
        area = shape[0] * shape[1]
        fan_a, fan_b = shape[2] * area, shape[3] * area
    return float(np.sqrt(6.0 / (fan_a + fan_b)))


def _sample(rule: tuple, shape, dtype, rng: jax.Array) -> jax.Array:
    kind, arg = rule
    if kind == "constant":
        return jnp.full(shape, arg, dtype)
    if kind == "normal":
        return (arg * jax.random.normal(rng, shape, jnp.float32)).astype(dtype)
    return jax.random.uniform(rng, shape, jnp.float32, -arg, arg).astype(dtype)
