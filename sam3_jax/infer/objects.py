"""Per-object device code both video predictors share: the tracker run over a batch of objects (chunked,
so activations stop growing with the object count), their memories encoded from masks, and the mask
rules the reference applies between objects. Objects are rows of a leading axis; padding rows are
computed and ignored."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sam3_jax.model.tracker.tracker import Tracker

NO_OBJ_LOGIT = -10.0  # a suppressed mask pixel or object


def broadcast(tree, n: int):
    """One frame's features (leading axis 1) repeated for ``n`` objects."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:]), tree)


def in_object_chunks(fn, per_object, chunk: int):
    """``fn(per_object)`` for a pytree of arrays with a leading object axis, at most ``chunk`` objects a
    call (a ``lax.map`` over whole chunks, then the remainder), so that the tracker's activations stop
    growing with the number of objects (each object's memory is projected to keys and values in every
    memory-attention layer). ``fn`` must treat objects independently and keep the leading axis."""
    n = jax.tree.leaves(per_object)[0].shape[0]
    if n <= chunk:
        return fn(per_object)
    full = n - n % chunk
    stacked = jax.tree.map(lambda x: x[:full].reshape((full // chunk, chunk) + x.shape[1:]), per_object)
    out = jax.tree.map(lambda x: x.reshape((full,) + x.shape[2:]), jax.lax.map(fn, stacked))
    if full == n:
        return out
    rest = fn(jax.tree.map(lambda x: x[full:], per_object))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)


def track(apply, params, feats, memory, chunk: int, run_mem_encoder: bool):
    """``track_step`` without prompts for every object over its ``SelectedMemory``. apply(params, *args,
    method=...) runs the tracker; feats: the frame's (pixel features, high-res levels), leading axis 1."""
    def step(memory):
        b = memory.valid.shape[0]
        return apply(params, *broadcast(feats, b), memory, jnp.zeros((b,), bool), jnp.zeros((b, 1, 2)),
                     jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1), bool), run_mem_encoder=run_mem_encoder,
                     method=Tracker.track_step)

    return in_object_chunks(step, memory, chunk)


def prompt(apply, params, feats, chunk: int, points=None, masks=None, has_mask=None):
    """``track_step`` on a conditioning frame without memory encoding (``add_new_*``): points (coords
    (B, P, 2), labels, valid) or none, mask inputs (B, S, S) or none, used where ``has_mask`` (B,)
    (None with masks: every object's)."""
    def step(x):
        points, masks, has_mask = x
        b = jax.tree.leaves(x)[0].shape[0]
        if points is None:
            points = jnp.zeros((b, 1, 2)), jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1), bool)
        if masks is not None and has_mask is None:
            has_mask = jnp.ones((b,), bool)
        return apply(params, *broadcast(feats, b), None, jnp.ones((b,), bool), *points, masks, has_mask,
                     run_mem_encoder=False, method=Tracker.track_step)

    return in_object_chunks(step, (points, masks, has_mask), chunk)


def encode_memories(apply, params, pix, masks, binarize, score, chunk: int):
    """The spatial memories of n objects from their masks at the memory encoder's input size
    (``mask_for_memory``, then ``encode_memory``), ``chunk`` objects a call. pix (1, h, w, C): the
    frame's raw features; masks (n, S, S), binarize (n,), score (n,) logits."""
    def encode(x):
        m, binarize, score = x
        mem = apply(params, m, binarize, method=Tracker.mask_for_memory)
        return apply(params, broadcast(pix, m.shape[0]), mem, score[:, None], method=Tracker.encode_memory)

    return in_object_chunks(encode, (masks, binarize, score), chunk)


def non_overlap(masks, valid):
    """Pixel-wise: only the highest-scoring valid object keeps its logit, the others are clamped to <= -10
    (``_apply_non_overlapping_constraints``; first object on ties). masks (N, H, W), valid (N,)."""
    ranked = jnp.where(valid[:, None, None], masks, -jnp.inf)
    keep = jnp.argmax(ranked, axis=0)[None] == jnp.arange(masks.shape[0])[:, None, None]
    return jnp.where(keep, masks, jnp.minimum(masks, NO_OBJ_LOGIT))


def component_areas(mask):
    """(N, h, w) bool -> (N, h, w) int32: the area of each pixel's 8-connected component (0 off the mask).
    Labels spread as the minimum pixel index over 3x3 neighbourhoods until they settle."""
    n, h, w = mask.shape
    none = h * w
    labels = jnp.where(mask, jnp.arange(h * w, dtype=jnp.int32).reshape(1, h, w), none)

    def spread(state):
        lab, _ = state
        p = jnp.pad(lab, ((0, 0), (1, 1), (1, 1)), constant_values=none)
        m = lab
        for dy in range(3):
            for dx in range(3):
                m = jnp.minimum(m, p[:, dy:dy + h, dx:dx + w])
        m = jnp.where(mask, m, none)
        return m, jnp.any(m != lab)

    labels, _ = jax.lax.while_loop(lambda s: s[1], spread, spread((labels, True)))
    seg = (labels + jnp.arange(n, dtype=jnp.int32)[:, None, None] * (none + 1)).reshape(-1)
    counts = jax.ops.segment_sum(jnp.ones_like(seg), seg, num_segments=n * (none + 1))
    return jnp.where(mask, counts[seg].reshape(n, h, w), 0)


def fill_holes(logits, max_area: int):
    """``fill_holes_in_mask_scores``: background components up to ``max_area`` become 0.1, then foreground
    components up to min(max_area, half the mask's area) become -0.1. logits (N, h, w)."""
    if max_area <= 0:
        return logits
    bg = logits <= 0
    logits = jnp.where(bg & (component_areas(bg) <= max_area), 0.1, logits)
    fg = logits > 0
    limit = jnp.minimum(jnp.sum(fg, axis=(1, 2), keepdims=True) // 2, max_area)
    return jnp.where(fg & (component_areas(fg) <= limit), -0.1, logits)


def group_mean(values, group, valid):
    """Per object, the mean of ``values`` over the valid objects of its group."""
    same = (group[:, None] == group[None, :]) & valid[None, :]
    return jnp.sum(jnp.where(same, values[None, :], 0.0), axis=1) / jnp.maximum(jnp.sum(same, axis=1), 1)
