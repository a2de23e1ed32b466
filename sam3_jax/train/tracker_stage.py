"""The tracker as the train step's clip-level stage (docs/architecture.md, 'The train step', step 4),
and its held-out evaluation.

Inside the step's ``shard_map`` each device holds a block of clips and a block of their frames. The
gathered tracker features already cover whole clips; the ground-truth masks are redistributed with
one ``all_to_all`` over "frame" so that each of those devices holds *every frame* of a disjoint
share of the clips' objects (N / frame-devices each). Tracker work is thus divided, not repeated.

Tracked objects are those visible in the clip's first frame (SAM 2's sampler). The losses are
divided by the number of tracked objects over the whole mesh, so the step's ``psum`` of the shares
is the loss of the global batch however it is split; random choices are keyed by global clip and
object indices, so they do not depend on the split either.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sam3_jax.data import schema
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.tracker import Tracker
from sam3_jax.train import mesh as mesh_lib
from sam3_jax.train import tracker_clip
from sam3_jax.train.losses.tracker import TrackerLossConfig, weighted_total
from sam3_jax.train.tracker_prompts import PromptConfig, sample_plan

PREFIX = "trk_"  # tracker terms in the step's metrics
_PLAN, _CLICKS, _DROPOUT = 0, 1, 2  # independent streams of the step's key


def _local_objects(batch):
    """(gt (b, T, n, M, M), visible (b, T, n), frame_valid (b, T)): every frame of this device's
    share of the objects."""
    n, devices = batch["masks"].shape[2], jax.lax.axis_size("frame")
    if n % devices:
        raise ValueError(f"tracker training splits each clip's objects over the 'frame' devices: "
                         f"data.max_objects={n} must be a multiple of mesh.frame={devices}")

    def objects(x):
        return jax.lax.all_to_all(x, "frame", 2, 1, tiled=True)

    frame_valid = jax.lax.all_gather(batch["frame_valid"], "frame", axis=1, tiled=True)
    # Exchanged packed (1/8 of the bytes), unpacked after.
    gt = schema.unpack_masks(objects(batch["masks"]), jnp)
    return gt, objects(batch["object_valid"]), frame_valid


def _object_layout(b: int, n_local: int, n_total: int):
    """Global clip ids (b,), global object ids (b * n_local,) and each object's local clip."""
    clip_ids = jax.lax.axis_index("data") * b + jnp.arange(b)
    slots = jax.lax.axis_index("frame") * n_local + jnp.arange(n_local)
    obj_ids = (clip_ids[:, None] * n_total + slots[None, :]).reshape(-1)
    return clip_ids, obj_ids, jnp.repeat(jnp.arange(b), n_local)


def _flatten_objects(x):
    """(b, T, n, ...) -> (b * n, T, ...)."""
    x = jnp.swapaxes(x, 1, 2)
    return x.reshape((-1,) + x.shape[2:])


def make_tracker_stage(tracker_cfg: TrackerConfig, prompt_cfg: PromptConfig, loss_cfg: TrackerLossConfig, *,
                       dtype=None, deterministic: bool = False):
    """A ``step.ClipStage``: the tracker's losses on the shard's clips (params ``"tracker"``)."""
    tracker = Tracker(tracker_cfg, dtype=dtype)

    def stage(params, clip, batch, rng):
        gt, visible, frame_valid = _local_objects(batch)
        b, t, n_local = visible.shape
        clip_ids, obj_ids, obj_clip = _object_layout(b, n_local, batch["masks"].shape[2])
        plan = jax.vmap(sample_plan, (0, None, 0, None))(
            jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(rng, _PLAN), clip_ids), t, frame_valid,
            prompt_cfg)
        obj_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(rng, _CLICKS), obj_ids)
        shard = jax.lax.axis_index("data") * jax.lax.axis_size("frame") + jax.lax.axis_index("frame")
        tracked = visible[:, 0].reshape(-1)
        feats = tracker_clip.clip_features(tracker, params["tracker"], clip["tracker_fpn"])
        terms, _ = tracker_clip.track_clip(
            tracker, params["tracker"], feats, obj_clip, _flatten_objects(gt), tracked, frame_valid, plan, obj_keys,
            jax.random.fold_in(jax.random.fold_in(rng, _DROPOUT), shard), prompt_cfg, loss_cfg,
            deterministic=deterministic)
        num_objects = jnp.maximum(jax.lax.psum(jnp.sum(tracked), mesh_lib.AXES), 1).astype(jnp.float32)
        terms = {k: v / num_objects for k, v in terms.items()}
        loss = weighted_total(terms, loss_cfg)
        return loss, {PREFIX + k: v for k, v in terms.items()}

    return stage


def make_tracker_predict(tracker_cfg: TrackerConfig, *, dtype=None):
    """``predict(params, clip, batch) -> (pred, gt, tracked)``: the semi-supervised protocol (GT mask
    on frame 0, then propagation) on this device's share of the objects, every frame, in eval mode:
    pred and gt (b, n, T, M, M) bool, tracked (b, n)."""
    tracker = Tracker(tracker_cfg, dtype=dtype)

    def predict(params, clip, batch):
        gt, visible, frame_valid = _local_objects(batch)
        b, t, n_local = visible.shape
        _, _, obj_clip = _object_layout(b, n_local, batch["masks"].shape[2])
        tracked = visible[:, 0].reshape(-1)
        feats = tracker_clip.clip_features(tracker, params["tracker"], clip["tracker_fpn"])
        gt_flat = _flatten_objects(gt)
        _, masks = tracker_clip.track_clip(
            tracker, params["tracker"], feats, obj_clip, gt_flat, tracked, frame_valid,
            tracker_clip.eval_plan(b, t, PromptConfig()), jax.random.split(jax.random.key(0), b * n_local),
            jax.random.key(0), PromptConfig(), TrackerLossConfig(), deterministic=True, record_masks=True)

        def unflat(x):
            return x.reshape((b, n_local) + x.shape[1:])

        return unflat(masks), unflat(gt_flat), unflat(tracked)

    return predict
