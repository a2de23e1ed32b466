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

from sam3_jax.model import stacking

# The transposed convolutions' kernels (`nn.layers.ConvTranspose2x2`), whose fan-in torch counts differently.
_CONV_TRANSPOSE = re.compile(r"(^|/)(dconv_2x2(_[01])?|output_upscaling_[03])/kernel$")

# (pattern on the "/"-joined path, rule); the first match wins. timm's trunc_normal_(std=0.02) cuts
# at +-2, i.e. 100 standard deviations: a plain normal. Blocks are ``blocks_i`` or, scanned,
# ``block_groups/blocks_i`` stacked over the groups (``stacking``).
_EXPLICIT: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"vision_backbone/trunk/blocks_\d+/.*/kernel$", "normal_0.02"),
    (r"vision_backbone/trunk/blocks_\d+/.*/bias$", "zeros"),
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
    keep their module's initialiser. ``params`` may be abstract (``jax.eval_shape``'s shapes and
    dtypes) where every leaf has a rule: then no module ``init`` (a traced forward pass) is needed.
    Jittable.

    All random leaves come out of two draws (standard normal, uniform on [-1, 1); ``_draw``), sliced
    and scaled: each threefry draw is a hash loop of its own for XLA to compile, so one draw per leaf
    made the official detector's init slow to compile (benchmarks/README.md). The draws are sliced
    layer by layer in the torch layout (``stacking``), then stacked as ``params`` holds the layers: each
    layer gets its own torch module's rule, and the values do not depend on the layout."""
    layout = params
    abstract = all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    flat = traverse_util.flatten_dict(stacking.unrolled_shapes(params) if abstract else stacking.unrolled(params))
    shapes = {path: leaf.shape for path, leaf in flat.items()}
    out, random = {}, {"normal": [], "uniform": []}
    for path in sorted(flat):
        leaf, rule = flat[path], rule_for(path, shapes)
        if rule is None and isinstance(leaf, jax.ShapeDtypeStruct):
            raise ValueError(f"{'/'.join(path)}: no reference rule, so its value needs the module's own init")
        if rule is None:
            out[path] = leaf
        elif rule[0] == "constant":
            out[path] = jnp.full(leaf.shape, rule[1], leaf.dtype)
        else:
            random[rule[0]].append((path, rule[1], leaf))
    for kind, key in zip(random, jax.random.split(rng)):
        leaves = random[kind]
        draw = _draw(kind, key, sum(int(np.prod(leaf.shape)) for _, _, leaf in leaves))
        offset = 0
        for path, scale, leaf in leaves:
            size = int(np.prod(leaf.shape))
            out[path] = (scale * draw[offset:offset + size].reshape(leaf.shape)).astype(leaf.dtype)
            offset += size
    return stacking.stacked_like(traverse_util.unflatten_dict(out), layout)


DRAW_BLOCK = 1 << 24  # values a random draw makes at once


def _draw(kind: str, key, total: int):
    """``total`` values of N(0, 1) ("normal") or U[-1, 1) ("uniform"). Past ``DRAW_BLOCK`` values they
    are drawn a block at a time (``lax.map``, a key a block): threefry's intermediates are several
    times its output, so the official detector's init in one draw needed several times the
    parameters' host memory. Up to one block (the tiny models) the values are those of a single draw."""
    def sample(k, n):
        return jax.random.normal(k, (n,)) if kind == "normal" else jax.random.uniform(k, (n,), minval=-1.0, maxval=1.0)

    if total <= DRAW_BLOCK:
        return sample(key, total)
    blocks = jax.lax.map(lambda k: sample(k, DRAW_BLOCK), jax.random.split(key, -(-total // DRAW_BLOCK)))
    return blocks.reshape(-1)[:total]


def rule_for(path: tuple[str, ...], shapes: dict) -> tuple | None:
    """The reference's initialiser for the leaf at ``path`` (the torch layout), given every leaf's shape
    (``shapes``: path -> shape):
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
            return ("uniform", _xavier_bound(shapes[path]))
        if rule == "box_head":  # the last layer predicts zero offsets; the others are torch Linear
            layers = {p[-2] for p in shapes if p[:-2] == parent[:-1]}
            if path[-2] == max(layers, key=lambda s: int(s.rsplit("_", 1)[1])):
                return ("constant", 0.0)
            break
    siblings = {p[-1] for p in shapes if p[:-1] == parent}
    if leaf == "scale":
        return ("constant", 1.0)
    if leaf == "embedding":
        return ("normal", 1.0)
    if leaf == "in_proj_kernel":
        return ("uniform", _xavier_bound(shapes[path]))
    if leaf == "in_proj_bias":
        return ("constant", 0.0)
    if leaf == "bias":
        if "scale" in siblings or "kernel" not in siblings:  # a norm's shift
            return ("constant", 0.0)
        if parent[-1] == "out_proj" and parent[:-1] + ("in_proj_kernel",) in shapes:  # MultiheadAttention
            return ("constant", 0.0)
        return ("uniform", 1.0 / np.sqrt(_fan_in(parent + ("kernel",), shapes[parent + ("kernel",)])))
    if leaf == "kernel":
        return ("uniform", 1.0 / np.sqrt(_fan_in(path, shapes[path])))
    return None


def _fan_in(path, shape) -> int:
    if len(shape) == 2:  # Linear (in, out)
        return shape[0]
    kh, kw, cin, cout = shape  # Conv (kh, kw, in, out); a transposed conv's torch weight is
    # (in, out, kh, kw), and torch takes its fan_in from dim 1: out x kh x kw.
    return kh * kw * (cout if _CONV_TRANSPOSE.search("/".join(path)) else cin)


def _xavier_bound(shape) -> float:
    """Xavier-uniform of the torch tensor: (out, in) matrices and (n, d) tables alike."""
    if len(shape) == 2:
        fan_a, fan_b = shape
    else:  # conv (kh, kw, in, out)
        area = shape[0] * shape[1]
        fan_a, fan_b = shape[2] * area, shape[3] * area
    return float(np.sqrt(6.0 / (fan_a + fan_b)))
