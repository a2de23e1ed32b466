"""A fixed-size memory bank and the reference's choice of what a frame attends to, as array code.

``MemoryBank`` holds, per object, K slots of past frame outputs (spatial memory, object pointer,
frame index, conditioning flag, memory-selection score); one slot per frame (a clip of T frames
uses K = T and slot = frame index; a ring buffer works the same way as long as it holds the frames
the rules below reach). ``select_memory`` turns it into the ``SelectedMemory`` of one frame, as
``Sam3TrackerBase._prepare_memory_conditioned_features`` does for forward tracking (r = 1):

* conditioning frames: all, or if more than ``max_cond_frames_in_attn`` the closest one before the
  frame, the closest at/after it, then the closest others (ties: earlier frame first, the
  reference's insertion order when frames are added in time order); temporal slot 0;
* previous frames for spatial memory (``num_maskmem - 1``) and pointers (``max_obj_ptrs - 1``),
  from non-conditioning frames and unselected conditioning frames:
  - without memory selection: the frames at distance 1, 2, ... (missing ones skipped);
  - with memory selection (SAM2Long): the newest ``min(T, max_obj_ptrs) - 1`` non-conditioning frames
    in 1..f-1 whose score exceeds ``mf_threshold``, plus frame f-1 always; the i-th newest gets
    distance i. As in the reference the oldest entry of that list never gives a pointer;
* pointers of the selected conditioning frames at or before the frame (all of them when
  ``past_pointers_only`` is False, the reference's training mode), at their signed distance;
* pointer distances are divided by ``min(num_frames, max_obj_ptrs) - 1``.

``reverse=True`` is the reference's ``track_in_reverse`` (backward propagation): "previous" frames are
the ones after the frame (f+1, f+2, ... at distance 1, 2, ...), memory selection looks at frames
f+1..num_frames-1 (the forward rule skips frame 0, the reverse one skips nothing), conditioning-frame
pointers count at or after the frame, at distance cond - f. Conditioning frames are chosen the same way
in both directions.

A predictor keeps a few slots per object rather than one per frame: ``store`` writes a frame into the
slot its replacement policy frees, so that the bank keeps exactly the frames these rules can still reach.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.tracker import SelectedMemory
from sam3_jax.nn import ops
from sam3_jax.nn.repeat import varying_like

_FAR = 1 << 28  # larger than any frame distance
_BIG = 1 << 29  # slot priorities (int32): larger than any frame distance


class MemoryBank(struct.PyTreeNode):
    feats: jax.Array  # (B, K, h, w, mem_dim)
    ptrs: jax.Array  # (B, K, d_model)
    frame: jax.Array  # (B, K) int32, -1 = empty
    is_cond: jax.Array  # (B, K) bool
    score: jax.Array  # (B, K) float32, the memory-selection score (SAM2Long)

    @classmethod
    def empty(cls, cfg: TrackerConfig, batch: int, capacity: int, dtype=jnp.float32, like=None) -> MemoryBank:
        """``like``: an array the bank's contents will depend on. Inside ``shard_map`` the bank then
        varies over the same mesh axes, as a ``lax.scan`` carry must (a fresh constant would not)."""
        g = cfg.grid
        bank = cls(feats=jnp.zeros((batch, capacity, g, g, cfg.mem_dim), dtype),
                   ptrs=jnp.zeros((batch, capacity, cfg.d_model), jnp.float32),
                   frame=jnp.full((batch, capacity), -1, jnp.int32), is_cond=jnp.zeros((batch, capacity), bool),
                   score=jnp.zeros((batch, capacity), jnp.float32))
        return bank if like is None else varying_like(bank, like)

    def write(self, slot, frame_idx, maskmem_features, obj_ptr, is_cond, score) -> MemoryBank:
        """Store one frame's outputs (B, ...) in ``slot``; slot, frame_idx, is_cond and score are
        scalars (traced or not) or per object (B,) (objects of different clips at different frames)."""
        b = self.frame.shape[0]
        rows, cols = jnp.arange(b), jnp.broadcast_to(jnp.asarray(slot, jnp.int32), (b,))
        return self.replace(
            feats=self.feats.at[rows, cols].set(maskmem_features.astype(self.feats.dtype)),
            ptrs=self.ptrs.at[rows, cols].set(obj_ptr.astype(self.ptrs.dtype)),
            frame=self.frame.at[rows, cols].set(jnp.broadcast_to(jnp.asarray(frame_idx, jnp.int32), (b,))),
            is_cond=self.is_cond.at[rows, cols].set(jnp.broadcast_to(is_cond, (b,))),
            score=self.score.at[rows, cols].set(jnp.broadcast_to(score, (b,)).astype(jnp.float32)))

    def clear(self, rows) -> MemoryBank:
        """The bank with the slots of ``rows`` (B,) bool emptied (their contents are left, unreachable)."""
        return self.replace(frame=jnp.where(rows[:, None], -1, self.frame),
                            is_cond=jnp.where(rows[:, None], False, self.is_cond))


def bank_capacity(cfg: TrackerConfig) -> int:
    """Slots per object for one conditioning frame: it, the ``max(num_maskmem - 1, max_obj_ptrs - 1)``
    tracked frames the rules reach, and one more, the previous frame that memory selection always takes."""
    return 1 + max(cfg.num_maskmem - 1, cfg.max_obj_ptrs - 1) + 1


def _priority(frame, score, anchor, cfg: TrackerConfig):
    """Larger = keep: nearer to ``anchor``; with memory selection, frames it can never pick come last."""
    far = jnp.abs(frame - anchor)
    if cfg.use_memory_selection:
        return jnp.where(score <= cfg.mf_threshold, -_BIG - far, -far)
    return -far


def store(bank: MemoryBank, cfg: TrackerConfig, frame_idx, feats, ptr, score, anchor, force: bool = True, *,
          is_cond=False, write=True, num_cond: int = 1) -> MemoryBank:
    """Writes frame ``frame_idx``'s memories (B, ...) for the rows in ``write`` (B,) into the slot the policy
    frees. The first ``num_cond`` slots hold conditioning frames (``is_cond`` (B,)): an empty one, else the
    farthest from ``anchor``. A tracked frame takes another slot: an empty one, else one that memory
    selection can never pick again (score <= ``mf_threshold``), else the farthest from ``anchor``. With the
    current frame as anchor the bank keeps the frames nearest it, the ones ``select_memory`` reaches. Unless
    ``force``, a frame is written only where it is nearer ``anchor`` than what it replaces (a bank kept for
    a later pass from ``anchor``). score (B,): the frame's memory-selection score."""
    b, k = bank.frame.shape
    rows = jnp.arange(b)
    frame = jnp.full((b,), frame_idx, jnp.int32)
    is_cond, write = jnp.broadcast_to(is_cond, (b,)), jnp.broadcast_to(write, (b,))
    in_cond = jnp.arange(k)[None, :] < num_cond
    far = jnp.abs(bank.frame - anchor)
    cond_prio = jnp.where(in_cond, jnp.where(bank.frame < 0, -2 * _BIG, -far), 3 * _BIG)
    cond_slot = jnp.argmin(cond_prio, axis=1)
    trk_prio = jnp.where(in_cond, 2 * _BIG,
                         jnp.where(bank.frame < 0, -2 * _BIG, _priority(bank.frame, bank.score, anchor, cfg)))
    trk_slot = jnp.argmin(trk_prio, axis=1)
    slot = jnp.where(is_cond, cond_slot, trk_slot)
    if not force:
        new = jnp.where(is_cond, -jnp.abs(frame_idx - anchor), _priority(frame, score, anchor, cfg))
        write = write & (new > jnp.where(is_cond, cond_prio[rows, cond_slot], trk_prio[rows, trk_slot]))
    old = jax.tree.map(lambda x: x[rows, slot], (bank.frame, bank.feats, bank.ptrs, bank.is_cond, bank.score))
    new = jax.tree.map(lambda v, o: v.astype(o.dtype), (frame, feats, ptr, is_cond, score), old)
    return bank.write(slot, *ops.where_rows(write, new, old))


def _gather(x, idx):
    """x (B, K, ...) at idx (B, Q) -> (B, Q, ...)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _by_rank(q, count: int):
    """Slots whose rank q (B, K) equals 1..count -> index (B, count) and found (B, count)."""
    match = q[:, None, :] == jnp.arange(1, count + 1)[None, :, None]
    return jnp.argmax(match, axis=-1), jnp.any(match, axis=-1)


def select_memory(bank: MemoryBank, frame_idx, num_frames, cfg: TrackerConfig, *,
                  past_pointers_only: bool = True, reverse: bool = False) -> SelectedMemory:
    """The memories frame ``frame_idx`` attends to (see the module docstring). frame_idx and num_frames
    may be traced scalars. Spatial slots: min(max_cond_frames_in_attn, K) + num_maskmem - 1; pointers:
    min(max_cond_frames_in_attn, K) + max_obj_ptrs - 1. ``reverse``: tracking backward in time."""
    b, k = bank.frame.shape
    f = jnp.asarray(frame_idx, jnp.int32)
    frame, filled = bank.frame, bank.frame >= 0
    sign = -1 if reverse else 1
    dist = (f - frame) * sign  # > 0: frames already tracked in this direction, 1 = the previous one
    cond, noncond = filled & bank.is_cond, filled & ~bank.is_cond

    # Conditioning frames: order by (closest before, closest at/after, distance, frame) and keep the first kc.
    kc = min(cfg.max_cond_frames_in_attn, k)
    before = jnp.max(jnp.where(cond & (frame < f), frame, -1), axis=1, keepdims=True)
    after = jnp.min(jnp.where(cond & (frame >= f), frame, _FAR), axis=1, keepdims=True)
    key = jnp.where(frame == before, -2, jnp.where(frame == after, -1, jnp.abs(frame - f)))
    order = jnp.lexsort((frame, jnp.where(cond, key, _FAR)), axis=-1)[:, :kc]
    cond_valid = _gather(cond, order)
    selected = jnp.zeros((b, k), bool).at[jnp.arange(b)[:, None], order].set(cond_valid)
    cond_frame = _gather(frame, order)

    # Previous frames: q = 1-based recency rank of each usable slot (0 = not usable).
    usable = noncond | (cond & ~selected)
    max_num = jnp.minimum(jnp.asarray(num_frames, jnp.int32), cfg.max_obj_ptrs)
    if cfg.use_memory_selection:
        in_range = (frame > f) & (frame < num_frames) if reverse else (frame >= 1) & (frame < f)
        good = noncond & in_range & (bank.score > cfg.mf_threshold)
        newer = jnp.sum(good[:, None, :] & (dist[:, None, :] < dist[:, :, None]), axis=-1)
        kept = good & (newer < max_num - 1)
        last = usable & (dist == 1)  # always in the list (if it exists at all)
        prev_kept = jnp.any(kept & (dist == 1), axis=1, keepdims=True)
        shift = (~prev_kept).astype(jnp.int32)
        q = jnp.where(kept, newer + 1 + shift, jnp.where(last & ~prev_kept, 1, 0))
        has_prev = f < num_frames - 1 if reverse else f >= 1
        list_len = jnp.sum(kept, axis=1, keepdims=True) + jnp.where(has_prev, shift, 0)
        ptr_limit = jnp.minimum(max_num, list_len)
    else:
        q = jnp.where(usable & (dist > 0), dist, 0)
        ptr_limit = max_num
    n_prev, n_ptr = cfg.num_maskmem - 1, cfg.max_obj_ptrs - 1
    prev_idx, prev_found = _by_rank(q, n_prev)
    ptr_idx, ptr_found = _by_rank(q, n_ptr)
    ptr_found = ptr_found & (jnp.arange(1, n_ptr + 1)[None, :] < ptr_limit)

    cond_dist = (f - cond_frame) * sign
    cond_ptr_valid = cond_valid & (cond_dist >= 0) if past_pointers_only else cond_valid
    norm = jnp.maximum(max_num - 1, 1).astype(jnp.float32)
    ptr_dist = jnp.concatenate([cond_dist, jnp.broadcast_to(jnp.arange(1, n_ptr + 1), (b, n_ptr))], axis=1)
    return SelectedMemory(
        feats=jnp.concatenate([_gather(bank.feats, order), _gather(bank.feats, prev_idx)], axis=1),
        tpos=jnp.concatenate([jnp.full((b, kc), cfg.num_maskmem - 1, jnp.int32),
                              jnp.broadcast_to(jnp.arange(n_prev, dtype=jnp.int32), (b, n_prev))], axis=1),
        valid=jnp.concatenate([cond_valid, prev_found], axis=1),
        ptrs=jnp.concatenate([_gather(bank.ptrs, order), _gather(bank.ptrs, ptr_idx)], axis=1),
        ptr_tpos=ptr_dist.astype(jnp.float32) / norm,
        ptr_valid=jnp.concatenate([cond_ptr_valid, ptr_found], axis=1))


def compact_memory(memory: SelectedMemory, slots: int) -> SelectedMemory:
    """The same memory with its valid spatial slots first (in their order) and only ``slots`` kept.

    Memory attention costs in proportion to its keys, and a masked slot costs as much as a used one,
    so a predictor that knows how many slots its objects use (``slots_in_use``, on the host) can
    attend over just those: the result is the same, as masked keys get zero weight. Training keeps
    the full static bank (a step cannot ask the host)."""
    order = jnp.argsort(~memory.valid, axis=1, stable=True)[:, :slots]
    return memory.replace(feats=_gather(memory.feats, order), tpos=_gather(memory.tpos, order),
                          valid=_gather(memory.valid, order))


def spatial_slots(used: int, capacity: int) -> int:
    """Slots to compile for when at most ``used`` spatial memories are valid: the next power of two, at
    most ``capacity`` (at least 1), so a video costs a handful of compilations, not one per count."""
    return min(capacity, ops.power_of_two_at_least(used))


@partial(jax.jit, static_argnames=("cfg", "reverse"))
def _selected_valid(bank, frame_idx, num_frames, cfg, reverse):
    """Only the selection's index arithmetic runs here (XLA drops the unused gathers of memories); the
    step redoes it under its own jit rather than take a materialised copy of the selected memories."""
    return select_memory(bank, frame_idx, num_frames, cfg, reverse=reverse).valid


def slots_in_use(bank: MemoryBank, frame_idx, num_frames, cfg: TrackerConfig, *, reverse: bool = False) -> int:
    """Host side (waits for the device): the ``spatial_slots`` that frame ``frame_idx``'s selection
    needs for every object, the static size to ``compact_memory`` to."""
    valid = np.asarray(_selected_valid(bank, frame_idx, num_frames, cfg, reverse))
    return spatial_slots(int(valid.sum(1).max()), valid.shape[1])
