"""The training-time clip tracker (`tracker_clip.track_clip`) against the parity-tested ``track_step``.

With prompts that involve no randomness (GT masks on the conditioning frames) the scan must give,
frame by frame, what a plain Python loop of ``Tracker.track_step`` over the same memory bank gives
when frames are processed in the reference's order (conditioning frames first, then time order).
With clicks and corrections the losses must be finite, differentiable and ignore padding objects.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.model.tracker import tracker as tracker_lib
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.memory_bank import MemoryBank, compact_memory, select_memory, spatial_slots
from sam3_jax.model.tracker.tracker import Tracker
from sam3_jax.train import tracker_clip
from sam3_jax.train.losses.tracker import TrackerLossConfig
from sam3_jax.train.tracker_prompts import PromptConfig

CFG = TrackerConfig.tiny()
T, OBJECTS = 5, 2


def _blobs(rng, t, n, size):
    """Discs that drift over the clip: (n, t, size, size) bool."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, t, size, size), bool)
    for i in range(n):
        cx, cy, r = rng.uniform(30, 80), rng.uniform(30, 80), rng.uniform(10, 20)
        vx, vy = rng.uniform(-4, 4, 2)
        for f in range(t):
            out[i, f] = (xx - cx - vx * f) ** 2 + (yy - cy - vy * f) ** 2 < r * r
    return out


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    tracker = Tracker(CFG)
    params = jax.jit(tracker_lib.init_params, static_argnums=0)(CFG, jax.random.key(0))
    g, c = CFG.grid, CFG.d_model
    fpn = [jnp.asarray(rng.normal(size=(1, T, s * g, s * g, c)), jnp.float32) for s in (4, 2, 1)]
    feats = tracker_clip.clip_features(tracker, params, fpn)
    gt = jnp.asarray(_blobs(rng, T, OBJECTS, CFG.image_size))
    return tracker, params, feats, gt


def _mask_plan(cond_frames):
    plan = tracker_clip.eval_plan(1, T, PromptConfig())
    plan["init_cond"] = jnp.isin(jnp.arange(T), jnp.asarray(cond_frames))[None]
    return plan


@jax.jit
def _frame(params, feats, gt, bank, f, cond):
    """One frame of the reference's propagation: select the memory, track_step, store."""
    tracker = Tracker(CFG)
    pix = jnp.broadcast_to(feats.pix[0, f], (OBJECTS,) + feats.pix.shape[2:])
    high_res = tuple(jnp.broadcast_to(h[0, f], (OBJECTS,) + h.shape[2:]) for h in feats.high_res)
    memory = select_memory(bank, f, T, CFG, past_pointers_only=True)
    conds = jnp.full((OBJECTS,), cond)
    out = tracker.apply({"params": params}, pix, high_res, memory, conds, jnp.zeros((OBJECTS, 1, 2)),
                        jnp.zeros((OBJECTS, 1), jnp.int32), jnp.zeros((OBJECTS, 1), bool),
                        gt[:, f].astype(jnp.float32), conds, method=Tracker.track_step)
    bank = bank.write(f, f, out["maskmem_features"], out["obj_ptr"], cond, out["memory_score"])
    return bank, out["pred_masks_high_res"] > 0


def _loop(params, feats, gt, cond_frames):
    """track_step frame by frame, conditioning frames first, as the reference's eval propagation."""
    bank = MemoryBank.empty(CFG, OBJECTS, T)
    masks = [None] * T
    for f in list(cond_frames) + [f for f in range(T) if f not in cond_frames]:
        bank, masks[f] = _frame(params, feats, gt, bank, f, f in cond_frames)
    return np.stack(masks, axis=1)


@pytest.mark.parametrize("cond_frames", [(0,), (0, 3)])
def test_scan_equals_track_step_loop(setup, cond_frames):
    tracker, params, feats, gt = setup

    @jax.jit
    def scan(params, feats, gt, plan):
        return tracker_clip.track_clip(
            tracker, params, feats, jnp.zeros((OBJECTS,), jnp.int32), gt, jnp.ones((OBJECTS,), bool),
            jnp.ones((1, T), bool), plan, jax.random.split(jax.random.key(1), OBJECTS), jax.random.key(2),
            PromptConfig(), TrackerLossConfig(), deterministic=True, record_masks=True)[1]

    masks = scan(params, feats, gt, _mask_plan(cond_frames))
    want = _loop(params, feats, gt, cond_frames)
    masks = np.asarray(masks)
    for f in cond_frames:  # a mask input is the output
        np.testing.assert_array_equal(masks[:, f], np.asarray(gt[:, f]))
    assert want[:, [f for f in range(T) if f not in cond_frames]].any()  # something was tracked
    mismatch = np.mean(masks != want)
    assert mismatch < 1e-4, mismatch


def test_compacted_memory_gives_the_same_step(setup):
    """Attending over just the valid spatial slots (what the predictors compile for) equals the full,
    masked bank: at frame 3 the valid slots (the conditioning frame 0, the previous frames 2 and 1) are
    not contiguous in the selection."""
    tracker, params, feats, gt = setup
    bank = MemoryBank.empty(CFG, OBJECTS, T)
    for f in range(3):
        bank, _ = _frame(params, feats, gt, bank, f, f == 0)
    memory = select_memory(bank, 3, T, CFG)
    valid = np.asarray(memory.valid)
    used = int(valid.sum(1).max())
    assert used == 3 and not valid[:, :used].all()  # the compaction has work to do
    slots = spatial_slots(used, valid.shape[1])
    compact = compact_memory(memory, slots)
    assert compact.feats.shape[1] == slots == 4 and np.asarray(compact.valid)[:, :used].all()

    @jax.jit
    def step(memory):
        pix = jnp.broadcast_to(feats.pix[0, 3], (OBJECTS,) + feats.pix.shape[2:])
        high_res = tuple(jnp.broadcast_to(h[0, 3], (OBJECTS,) + h.shape[2:]) for h in feats.high_res)
        return tracker.apply({"params": params}, pix, high_res, memory, jnp.zeros((OBJECTS,), bool),
                             jnp.zeros((OBJECTS, 1, 2)), jnp.zeros((OBJECTS, 1), jnp.int32),
                             jnp.zeros((OBJECTS, 1), bool), method=Tracker.track_step)

    full, small = step(memory), step(compact)
    for key in ("pred_masks", "object_score_logits", "iou_score", "obj_ptr", "maskmem_features"):
        np.testing.assert_allclose(np.asarray(small[key]), np.asarray(full[key]), atol=1e-4, rtol=1e-5,
                                   err_msg=key)


@pytest.mark.slow
def test_training_losses_with_clicks_and_corrections(setup):
    tracker, params, feats, gt = setup
    plan = {"use_mask": jnp.zeros((1,), bool), "use_box": jnp.zeros((1,), bool),
            "use_box_frames": jnp.zeros((1, T), bool).at[0, 0].set(True),
            "init_cond": jnp.zeros((1, T), bool).at[0, :2].set(True),
            "correct": jnp.zeros((1, T), bool).at[0, :3].set(True),
            "from_gt": jnp.zeros((1, T, PromptConfig().num_correction_points), bool)}
    tracked = jnp.array([True, False])

    def loss(params, tracked):
        terms, _ = tracker_clip.track_clip(
            tracker, params, feats, jnp.zeros((OBJECTS,), jnp.int32), gt, tracked, jnp.ones((1, T), bool), plan,
            jax.random.split(jax.random.key(1), OBJECTS), jax.random.key(2), PromptConfig(), TrackerLossConfig())
        return sum(terms.values()), terms

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (total, _), grads = grad_fn(params, tracked)
    assert np.isfinite(float(total)) and float(total) > 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads))
    assert np.abs(grads["sam_mask_decoder"]["iou_prediction_head"]["layers_0"]["kernel"]).max() > 0
    # A padding object adds nothing: its loss is what tracking it as well adds.
    (both, both_terms), _ = grad_fn(params, jnp.array([True, True]))
    (second, _), _ = grad_fn(params, jnp.array([False, True]))
    np.testing.assert_allclose(float(both), float(total) + float(second), rtol=1e-5)
    assert all(float(v) > 0 for v in both_terms.values())


@pytest.mark.slow
def test_frame_remat_gives_the_same_loss_and_gradients_with_less_memory(setup):
    """``TrackerConfig.remat`` recomputes each frame's step in the backward pass (dropout included):
    the same loss and gradients, and the compiled step no longer holds every frame's activations."""
    _, params, feats, gt = setup
    plan = _mask_plan((0,))

    def grad_fn(remat: bool):
        tracker = Tracker(CFG.replace(remat=remat))

        def loss(params):
            terms, _ = tracker_clip.track_clip(
                tracker, params, feats, jnp.zeros((OBJECTS,), jnp.int32), gt, jnp.ones((OBJECTS,), bool),
                jnp.ones((1, T), bool), plan, jax.random.split(jax.random.key(1), OBJECTS), jax.random.key(2),
                PromptConfig(), TrackerLossConfig())
            return sum(terms.values())

        return jax.jit(jax.value_and_grad(loss)).lower(params).compile()

    kept_fn, remat_fn = grad_fn(False), grad_fn(True)
    (kept, kept_grads), (remat, remat_grads) = kept_fn(params), remat_fn(params)
    np.testing.assert_allclose(float(remat), float(kept), rtol=1e-6)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(kept_grads))  # summation order moves some
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(kept_grads)):  # near-zero leaves a little
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * scale)
    with_remat, without = (fn.memory_analysis().temp_size_in_bytes for fn in (remat_fn, kept_fn))
    assert with_remat < 0.7 * without, (with_remat, without)
