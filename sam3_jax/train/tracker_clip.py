"""The tracker over whole clips in training (``SAM2Train.forward_tracking``; docs/reference_model.md,
'Tracker training'), static shapes.

A prompt plan per clip (`tracker_prompts.sample_plan`) picks the initial conditioning frames, whether
they get the GT mask or a click / noisy box, and the frames that receive corrective clicks. Every
object is then tracked through the clip by one ``lax.scan`` over processing slots, conditioning
frames first, then the others in time order (per object, so clips with different plans batch
together). Each slot reads its memory from a `MemoryBank` with one slot per frame and writes its
own; a corrected frame is stored as a conditioning frame (``add_all_frames_to_correct_as_cond``).

Corrective clicks (``num_correction_points``, one at a time, each sampled from the error of the
previous prediction, whose low-res logits are fed back as the mask prompt) run as an inner scan that
``lax.cond`` skips on slots where no object is corrected; memory attention is skipped the same way
on slots where every object is on an initial conditioning frame. Every prediction step's losses
(`losses.tracker.step_losses`) are added up inside the scan under ``jax.checkpoint``, so no
full-resolution logits outlive their step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.memory_bank import MemoryBank, select_memory
from sam3_jax.model.tracker.tracker import Tracker, use_multimask
from sam3_jax.nn import ops
from sam3_jax.nn.repeat import varying_like
from sam3_jax.train.losses.tracker import TrackerLossConfig, step_losses
from sam3_jax.train.tracker_prompts import PromptConfig, correction_point, initial_points

TERMS = ("mask", "dice", "iou", "class")


class ClipFeatures(struct.PyTreeNode):
    """The tracker's per-frame inputs for b clips of T frames."""

    pix: jax.Array  # (b, T, g, g, C) the 1x level, raw
    high_res: tuple  # ((b, T, 4g, 4g, C/8), (b, T, 2g, 2g, C/4)) after conv_s0 / conv_s1


def clip_features(tracker: Tracker, params, fpn) -> ClipFeatures:
    """fpn: the backbone's three tracker levels (4x, 2x, 1x), each (b, T, H, W, C)."""
    b, t = fpn[0].shape[:2]
    dtype = tracker.dtype or jnp.float32

    def flat(x):
        return x.reshape((b * t,) + x.shape[2:]).astype(dtype)

    high_res = tracker.apply({"params": params}, flat(fpn[0]), flat(fpn[1]), method=Tracker.project_high_res)
    return ClipFeatures(pix=fpn[2].astype(dtype),
                        high_res=tuple(h.reshape((b, t) + h.shape[1:]) for h in high_res))


def eval_plan(num_clips: int, num_frames: int, prompt_cfg: PromptConfig) -> dict:
    """The semi-supervised VOS protocol (a `tracker_prompts.sample_plan` per clip): the GT mask on
    frame 0, no other prompt."""
    first = jnp.arange(num_frames) == 0
    none = jnp.zeros((num_clips, num_frames), bool)
    return {"use_mask": jnp.ones((num_clips,), bool), "use_box": jnp.zeros((num_clips,), bool),
            "use_box_frames": none, "init_cond": jnp.broadcast_to(first, (num_clips, num_frames)), "correct": none,
            "from_gt": jnp.zeros((num_clips, num_frames, prompt_cfg.num_correction_points), bool)}


def _f32(tree):
    """Floating leaves in float32, so both branches of a ``lax.cond`` agree whatever the compute dtype."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def track_clip(tracker: Tracker, params, feats: ClipFeatures, obj_clip, gt_masks, tracked, frame_valid, plan: dict,
               obj_keys, dropout_key, prompt_cfg: PromptConfig, loss_cfg: TrackerLossConfig, *,
               deterministic: bool = False, record_masks: bool = False):
    """Tracks B objects through their clips and sums their losses.

    obj_clip (B,) int: each object's clip (index into the b clips of ``feats``, ``frame_valid`` and
    ``plan``); gt_masks (B, T, M, M) bool; tracked (B,) bool: real objects (padding objects are
    computed and ignored); frame_valid (b, T); plan: `tracker_prompts.sample_plan` outputs stacked
    over clips (or `eval_plan`); obj_keys (B,) keys for the objects' clicks (derive them from global
    object indices and the result does not depend on how objects are split over devices);
    dropout_key: the memory attention's dropout (unused when ``deterministic``).

    Returns (terms, masks): terms {"mask", "dice", "iou", "class"} summed over objects, frames and
    click steps (not yet divided by the number of objects); masks (B, T, M, M) bool, the final
    prediction of every frame, when ``record_masks`` (else None).
    """
    cfg: TrackerConfig = tracker.cfg
    b_obj, t, m = gt_masks.shape[:3]
    # Inside shard_map the devices take different lax.cond branches (their objects differ). Made to
    # vary over the mesh here, parameters and features get their gradients' psum here, once, not
    # inside a branch that only some devices take (a collective they would wait on forever).
    params, feats = varying_like((params, feats), gt_masks)
    rows = jnp.arange(b_obj)
    per_obj = jax.tree.map(lambda x: x[obj_clip], plan)
    init_cond, correct = per_obj["init_cond"], per_obj["correct"]
    use_mask, use_box, from_gt = per_obj["use_mask"], per_obj["use_box_frames"], per_obj["from_gt"]
    valid_frame = frame_valid[obj_clip]  # (B, T)
    # Conditioning frames first, then the rest, each group in time order.
    order = jnp.argsort(jnp.where(init_cond, 0, t) + jnp.arange(t), axis=1)
    n_slots = 2 + prompt_cfg.num_correction_points  # a box's two corners, then the corrections
    # As SAM2Train: only frames prompted by clicks (not a mask) get corrections, so with the mask
    # always given no correction branch is built at all.
    clicks_possible = prompt_cfg.prob_to_use_pt_input > 0 and prompt_cfg.num_correction_points > 0
    variables = {"params": params}

    def apply(method, *args, **kwargs):
        return tracker.apply(variables, *args, method=method, **kwargs)

    def losses(heads, gt, active):
        def compute(all_masks, all_ious, score, candidates):
            terms = step_losses(ops.resize_masks(all_masks, (m, m)), all_ious, score, gt, candidates, loss_cfg)
            return {k: jnp.where(active, terms[k], 0.0) for k in TERMS}
        return jax.checkpoint(compute)(heads["all_masks"], heads["all_ious"], heads["score"], heads["candidates"])

    def add(a, b):
        return {k: a[k] + b[k] for k in TERMS}

    def process(bank, s):
        f = order[:, s]
        frame_ok = valid_frame[rows, f]
        active = frame_ok & tracked
        init, corr = init_cond[rows, f], correct[rows, f] & active
        mask_in = init & use_mask
        pix = feats.pix[obj_clip, f]
        high_res = tuple(h[obj_clip, f] for h in feats.high_res)
        gt = gt_masks[rows, f]
        keys = jax.vmap(jax.random.fold_in)(obj_keys, f)
        memory = select_memory(bank, f[:, None], t, cfg, past_pointers_only=deterministic)
        rngs = {} if deterministic else {"dropout": jax.random.fold_in(dropout_key, s)}
        cond_feats = jax.lax.cond(
            jnp.all(init), lambda: _f32(apply(Tracker.conditioned_features, pix, None, init, deterministic)),
            lambda: _f32(apply(Tracker.conditioned_features, pix, memory, init, deterministic, rngs=rngs)))

        # The first prompt: a click or a noisy box on initial conditioning frames given clicks.
        coords, labels, point_ok = jax.vmap(initial_points, (0, 0, 0, None, None))(
            jax.vmap(jax.random.fold_in, (0, None))(keys, 0), gt, use_box[rows, f], cfg.image_size, prompt_cfg)
        first = init & ~use_mask
        pad = n_slots - coords.shape[1]
        coords = jnp.pad(coords, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        point_ok = jnp.pad(point_ok & first[:, None], ((0, 0), (0, pad)))

        def multimask(point_ok):
            return use_multimask(cfg, init, jnp.sum(point_ok, axis=1))

        # Objects given their GT mask: the SAM heads of ``_use_mask_as_output`` (the pointer), in the same pass.
        mask_input = gt.astype(jnp.float32)
        heads = _f32(apply(Tracker.frame_heads, pix, cond_feats, high_res, coords, labels, point_ok,
                           multimask(point_ok), mask_input, mask_in, deterministic))
        terms = losses(heads, gt, active & ~mask_in)

        def corrections(carry):
            def click(carry, i):
                heads, coords, labels, point_ok, terms = carry
                pred = ops.resize_masks(heads["masks"], (m, m)) > 0
                key = jax.vmap(jax.random.fold_in, (0, None))(keys, i + 1)
                xy, label = jax.vmap(
                    lambda k, g, p, gt_only: correction_point(k, g, p, cfg.image_size, prompt_cfg,
                                                              sample_from_gt=gt_only))(key, gt, pred, from_gt[rows, f, i])
                slot = jnp.sum(point_ok, axis=1)
                coords = coords.at[rows, slot].set(jnp.where(corr[:, None], xy, coords[rows, slot]))
                labels = labels.at[rows, slot].set(jnp.where(corr, label, labels[rows, slot]))
                point_ok = point_ok.at[rows, slot].set(point_ok[rows, slot] | corr)
                new = _f32(apply(Tracker.sam_heads, cond_feats, high_res, coords, labels, point_ok, multimask(point_ok),
                                 heads["masks"], deterministic))
                return (ops.where_rows(corr, new, heads), coords, labels, point_ok, add(terms, losses(new, gt, corr))), None

            carry, _ = jax.lax.scan(click, carry, jnp.arange(prompt_cfg.num_correction_points))
            return carry

        if clicks_possible:
            # Rematerialised: a lax.cond keeps the residuals of both branches for the backward pass,
            # zero-filled where not taken ((T, clicks, B, ...) stacks on every slot of the scan);
            # recomputing the branch where it ran is cheaper than that on every step.
            heads, coords, labels, point_ok, terms = jax.lax.cond(
                jnp.any(corr), jax.checkpoint(corrections, policy=jax.checkpoint_policies.nothing_saveable),
                lambda c: c, varying_like((heads, coords, labels, point_ok, terms), gt))

        num_points = jnp.sum(point_ok, axis=1)
        heads = {k: heads[k] for k in ("masks", "iou", "obj_ptr", "score")}  # what frame_outputs reads
        out = apply(Tracker.frame_outputs, pix, heads, num_points, mask_input, mask_in, deterministic=deterministic)
        bank = bank.write(f, jnp.where(frame_ok, f, -1), out["maskmem_features"], out["obj_ptr"], init | corr,
                          out["memory_score"])
        masks = ops.resize_masks(out["pred_masks_high_res"], (m, m)) > 0 if record_masks else None
        return bank, (terms, masks)

    if cfg.remat and not deterministic:
        process = jax.checkpoint(process, policy=jax.checkpoint_policies.nothing_saveable)
    bank = MemoryBank.empty(cfg, b_obj, t, dtype=tracker.dtype or jnp.float32, like=gt_masks)
    _, (terms, masks) = jax.lax.scan(process, bank, jnp.arange(t))
    terms = {k: jnp.sum(v) for k, v in terms.items()}
    if record_masks:  # processing order -> frame order
        masks = jnp.zeros((b_obj, t, m, m), bool).at[rows[:, None], order].set(jnp.swapaxes(masks, 0, 1))
    return terms, masks
