"""Prompts for tracker training, sampled on device: SAM 2's ``SAM2Train`` recipe.

References (SAM 2, ``training/model/sam2.py``): ``SAM2Train.prepare_prompt_inputs`` (mask or click
input, initial conditioning frames, frames to correct) and ``SAM2Train._iter_correct_pt_sampling``
(corrective clicks); ``sam2/modeling/sam2_utils.py`` (also ``sam3/model/sam3_tracker_utils.py``):
``sample_box_points``, ``mask_to_box``, ``sample_random_points_from_errors``, ``get_next_point``.

Everything is pure JAX with static shapes, driven by ``jax.random`` keys; the per-object functions
are meant to be vmapped by the caller. Each function draws all its randomness as one uniform vector
(integers by flooring): one threefry call compiles several times faster on CPU than one per draw.

Coordinates. The reference samples in GT pixels and returns integer pixel indices (x = column,
y = row, no half-pixel offset; box corners are the extreme GT columns/rows, clamped to
[0, W - 1] x [0, H - 1] after the noise); the prompt encoder then adds 0.5 to reach the pixel centre
(``PromptEncoder._embed_points``; ours in ``model/tracker/prompt_encoder.py``). In SAM 2 the GT is at
the model's input resolution. Here the GT may be smaller than the ``image_size`` input, so a GT
coordinate u (either axis) maps to ``(u + 0.5) * s - 0.5`` with ``s = image_size / W`` (``/ H`` for
y): the pixel centre maps to the pixel centre after the encoder's +0.5. With ``s = 1`` this is the
identity, i.e. exactly the reference's coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

TOP_LEFT_LABEL, BOTTOM_RIGHT_LABEL, PAD_LABEL = 2, 3, -1


@dataclass(frozen=True)
class PromptConfig:
    """``SAM2Train`` settings of ``sam2.1_hiera_b+_MOSE_finetune.yaml`` (training values)."""
    prob_to_use_pt_input: float = 0.5  # else GT mask input on the initial conditioning frames
    prob_to_use_box_input: float = 0.5  # given clicks: a noisy GT box instead of one click (per frame)
    num_init_cond_frames: int = 2
    rand_init_cond_frames: bool = True  # 1..num_init_cond_frames, frame 0 always
    num_frames_to_correct: int = 2
    rand_frames_to_correct: bool = True
    num_correction_points: int = 7
    prob_to_sample_from_gt: float = 0.1
    # ``sample_box_points(noise=0.1, noise_bound=20)``: NOT a standard deviation. Each box coordinate
    # moves by U(-1, 1) * min(box_noise_std * box side (w for x, h for y), box_noise_max_px), where
    # the side is max - min pixel index (no +1). The bound is in model-input pixels (GT pixels when
    # the GT is at the input resolution, as in SAM 2).
    box_noise_std: float = 0.1
    box_noise_max_px: float = 20.0

    def __post_init__(self):
        if self.num_init_cond_frames < 1:
            raise ValueError("num_init_cond_frames must be >= 1")
        if self.prob_to_use_pt_input > 0 and self.num_frames_to_correct < self.num_init_cond_frames:
            raise ValueError("num_frames_to_correct must be >= num_init_cond_frames (as SAM2Train asserts)")


def _ranks(priority):
    """rank[i] = position of element i when sorted by decreasing priority (0 = highest)."""
    order = jnp.argsort(-priority)
    return jnp.zeros_like(order).at[order].set(jnp.arange(priority.shape[0], dtype=order.dtype))


def sample_plan(rng, num_frames: int, frame_valid=None, cfg: PromptConfig = PromptConfig()) -> dict:
    """The prompt plan of one clip, shared by all its objects (``SAM2Train.prepare_prompt_inputs``).

    rng: a key; num_frames: T (static); frame_valid: (T,) bool or None (all valid); frame 0 is
    always taken as valid.

    Returns
      "use_mask" () bool: GT masks are the input on the initial conditioning frames (no clicks);
      "use_box" () bool: frame 0 gets a noisy box rather than a click (False with mask input);
      "use_box_frames" (T,) bool: the box decision of every initial conditioning frame (the
        reference draws it per frame; entry 0 == use_box; False elsewhere and with mask input);
      "init_cond" (T,) bool: frame 0 plus 0..num_init_cond_frames - 1 random other valid frames
        (the count uniform in 1..num_init_cond_frames when rand_init_cond_frames);
      "correct" (T,) bool: all False with mask input; else the initial conditioning frames plus random
        other valid frames, num_frames_to_correct in total or, when rand_frames_to_correct, a count
        uniform in [#init_cond, num_frames_to_correct];
      "from_gt" (T, num_correction_points) bool: per correction click, whether it is sampled from the
        GT instead of the error (one draw per click for all objects, as the reference; pass it to
        ``correction_point(..., sample_from_gt=...)``).
    A clip with a single valid frame is an image: clicks forced, one init cond frame, one frame to
    correct (the reference's ``num_frames == 1`` case). Counts are capped by the valid frames there are.
    """
    t = num_frames
    idx = jnp.arange(t)
    valid = jnp.ones((t,), bool) if frame_valid is None else jnp.asarray(frame_valid, bool).reshape(t)
    others = valid & (idx > 0)  # frames that may be drawn besides frame 0
    single = others.sum() == 0
    u = jax.random.uniform(rng, (3 + 2 * t + t * cfg.num_correction_points,))
    u_pt, u_init, u_corr = u[0], u[1], u[2]
    u_perm, u_box, u_gt = u[3:3 + t], u[3 + t:3 + 2 * t], u[3 + 2 * t:].reshape(t, cfg.num_correction_points)

    def randint(v, lo, hi):  # uniform integer in [lo, hi]
        return jnp.minimum(lo + jnp.floor(v * (hi - lo + 1)).astype(jnp.int32), hi)

    use_pt = (u_pt < cfg.prob_to_use_pt_input) | single
    if cfg.rand_init_cond_frames and cfg.num_init_cond_frames > 1:
        n_init = randint(u_init, 1, cfg.num_init_cond_frames)
    else:
        n_init = jnp.asarray(cfg.num_init_cond_frames, jnp.int32)
    n_init = jnp.where(single, 1, n_init)
    n_init = jnp.minimum(n_init, 1 + others.sum())
    n_corr = jnp.asarray(cfg.num_frames_to_correct, jnp.int32)
    if cfg.rand_frames_to_correct:
        drawn = randint(u_corr, n_init, jnp.maximum(n_corr, n_init))
        n_corr = jnp.where(n_corr > n_init, drawn, n_corr)
    n_corr = jnp.maximum(jnp.where(single, 1, n_corr), n_init)

    # One random order of the other valid frames: the first n_init - 1 join frame 0 as initial
    # conditioning frames, the first n_corr - 1 are corrected (init frames + a uniform subset of
    # the rest, as the reference's two choices without replacement).
    rank = _ranks(jnp.where(others, u_perm, -1.0))
    init_cond = (idx == 0) | (others & (rank < n_init - 1))
    correct = use_pt & ((idx == 0) | (others & (rank < n_corr - 1)))
    use_box_frames = use_pt & init_cond & (u_box < cfg.prob_to_use_box_input)
    from_gt = u_gt < cfg.prob_to_sample_from_gt
    return {"use_mask": ~use_pt, "use_box": use_box_frames[0], "use_box_frames": use_box_frames,
            "init_cond": init_cond, "correct": correct, "from_gt": from_gt}


def _to_input_coords(xy, hw, image_size: int):
    """GT pixel indices (x, y) -> model-input pixel coordinates (see the module docstring)."""
    scale = jnp.array([image_size / hw[1], image_size / hw[0]], jnp.float32)
    return (xy.astype(jnp.float32) + 0.5) * scale - 0.5


def _uniforms(rng, h, w, extra):
    """Noise for ``_error_point`` ((H, W, 2), > 0 everywhere so that the argmax never leaves a
    non-empty region) and ``extra`` more uniforms in [0, 1), from one draw."""
    u = jax.random.uniform(rng, (h * w * 2 + extra,))
    return jnp.maximum(u[:h * w * 2], jnp.finfo(jnp.float32).tiny).reshape(h, w, 2), u[h * w * 2:]


def _error_point(noise, gt, pred):
    """``sample_random_points_from_errors`` for one mask and one point: uniform over the false
    positives (label 0) and false negatives (label 1) together; when the prediction is exactly right,
    a negative click uniform over the background; when that is empty too (GT and prediction both the
    full frame), pixel (0, 0) with label 0 (the reference's argmax over all-zero noise).
    noise: (H, W, 2) positive uniforms. Returns GT-pixel (x, y) int32 and the label."""
    w = gt.shape[1]
    all_correct = jnp.all(gt == pred)
    negative = (~gt & pred) | (all_correct & ~gt)
    positive = gt & ~pred
    flat = jnp.argmax((noise * jnp.stack([negative, positive], -1)).reshape(-1))
    label, pixel = (flat % 2).astype(jnp.int32), flat // 2
    return jnp.stack([pixel % w, pixel // w]).astype(jnp.int32), label


def _noisy_box(u, gt, cfg: PromptConfig, image_size: int):
    """``sample_box_points`` for one mask, u (4,) uniforms: (2, 2) GT-pixel corners (x0, y0), (x1, y1).
    An empty mask gives the box (0, 0, 0, 0), which no noise moves."""
    h, w = gt.shape
    cols, rows = jnp.arange(w), jnp.arange(h)
    any_col, any_row = gt.any(0), gt.any(1)
    box = jnp.stack([jnp.where(any_col, cols, w).min(), jnp.where(any_row, rows, h).min(),
                     jnp.where(any_col, cols, -1).max(), jnp.where(any_row, rows, -1).max()])
    box = jnp.where(gt.any(), box, 0).astype(jnp.float32)
    if cfg.box_noise_std > 0:
        bound = cfg.box_noise_max_px * jnp.array([w, h], jnp.float32) / image_size  # in GT pixels
        max_d = jnp.minimum(jnp.stack([box[2] - box[0], box[3] - box[1]]) * cfg.box_noise_std, bound)
        box = box + (2.0 * u - 1.0) * jnp.tile(max_d, 2)
        hi = jnp.array([w - 1, h - 1, w - 1, h - 1], jnp.float32)
        box = jnp.clip(box, 0.0, hi)
    return box.reshape(2, 2)


def initial_points(rng, gt_mask, use_box, image_size: int, cfg: PromptConfig = PromptConfig()):
    """The first prompt of one object on one initial conditioning frame (``prepare_prompt_inputs``).

    gt_mask (H, W) bool at GT resolution; use_box () bool (from ``sample_plan``).
    With use_box: the noisy GT box as two corner points labelled 2 and 3 (``sample_box_points``).
    Otherwise one click uniform over the GT mask, label 1 (``get_next_point(gt, None, "uniform")``),
    second slot padding (label -1, invalid). An empty GT gives, as the reference: for a box, both
    corners at pixel (0, 0); for a click, a *negative* click (label 0) uniform over the whole frame.

    Returns coords (2, 2) float32 (x, y) in image_size-input pixels, labels (2,) int32, valid (2,) bool.
    """
    gt = jnp.asarray(gt_mask, bool)
    hw = gt.shape
    noise, u_box = _uniforms(rng, *hw, 4)
    box = _to_input_coords(_noisy_box(u_box, gt, cfg, image_size), hw, image_size)
    xy, label = _error_point(noise, gt, jnp.zeros_like(gt))
    click = jnp.stack([_to_input_coords(xy, hw, image_size), jnp.zeros((2,), jnp.float32)])
    use_box = jnp.asarray(use_box, bool)
    coords = jnp.where(use_box, box, click)
    labels = jnp.where(use_box, jnp.array([TOP_LEFT_LABEL, BOTTOM_RIGHT_LABEL], jnp.int32),
                       jnp.stack([label, jnp.int32(PAD_LABEL)]))
    valid = jnp.stack([jnp.bool_(True), use_box])
    return coords, labels, valid


def correction_point(rng, gt_mask, pred_mask, image_size: int, cfg: PromptConfig = PromptConfig(), *,
                     sample_from_gt=None):
    """One corrective click (``SAM2Train._iter_correct_pt_sampling``, method "uniform").

    With probability prob_to_sample_from_gt the prediction is treated as empty (a positive click
    uniform over the GT); otherwise the click is uniform over the error region: a false-negative
    pixel gives label 1, a false-positive pixel label 0. A prediction equal to the GT gives a negative
    click uniform over the background (pixel (0, 0) if there is none), as
    ``sample_random_points_from_errors``. sample_from_gt: () bool overriding the draw (the reference
    draws it once per click for all objects of the clip: see ``sample_plan``'s "from_gt").

    gt_mask, pred_mask (H, W) bool at GT resolution. Returns coords (2,) float32 (x, y) in
    image_size-input pixels and the label () int32.
    """
    gt = jnp.asarray(gt_mask, bool)
    pred = jnp.asarray(pred_mask, bool)
    noise, u = _uniforms(rng, *gt.shape, 1)
    if sample_from_gt is None:
        sample_from_gt = u[0] < cfg.prob_to_sample_from_gt
    pred = pred & ~jnp.asarray(sample_from_gt, bool)
    xy, label = _error_point(noise, gt, pred)
    return _to_input_coords(xy, gt.shape, image_size), label
