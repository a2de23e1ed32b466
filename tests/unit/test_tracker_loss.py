"""Tracker losses (``sam3_jax.train.losses.tracker``): SAM 2's MultiStepMultiMasksAndIous, one step.

The reference class is commented out in sam3's ``loss_fns.py``; ``ref_update_losses`` below replays
its ``_update_losses`` (as in SAM 2's ``training/loss_fns.py``) on sam3's own ``sigmoid_focal_loss``,
``dice_loss`` and ``iou_loss``. Those comparisons need torch and skip without it; the hand-worked
case and the gradient checks do not.
"""
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.train.losses import TrackerLossConfig, step_losses, weighted_total

CFG = TrackerLossConfig()
B, K, H, W = 3, 4, 32, 32


@pytest.fixture(scope="module")
def tref():
    pytest.importorskip("torch")
    from sam3_jax.testing import reference

    try:
        ref = reference.load()
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(str(e))
    reference.install_loss_shims(ref.torch)
    from sam3.train.loss import loss_fns

    return types.SimpleNamespace(torch=ref.torch, loss_fns=loss_fns)


def ref_update_losses(tr, losses, src_masks, target_masks, ious, num_objects, object_score_logits, cfg):
    """``MultiStepMultiMasksAndIous._update_losses`` (pred_obj_scores=True) on sam3's loss functions."""
    torch, lf = tr.torch, tr.loss_fns
    target_masks = target_masks.expand_as(src_masks)
    multimask = lf.sigmoid_focal_loss(src_masks, target_masks, num_objects, alpha=cfg.focal_alpha,
                                      gamma=cfg.focal_gamma, loss_on_multimask=True, triton=False)
    multidice = lf.dice_loss(src_masks, target_masks, num_objects, loss_on_multimask=True)
    target_obj = torch.any((target_masks[:, 0] > 0).flatten(1), dim=-1)[..., None].float()
    loss_class = lf.sigmoid_focal_loss(object_score_logits, target_obj, num_objects, alpha=cfg.class_focal_alpha,
                                       gamma=cfg.class_focal_gamma, triton=False)
    multiiou = lf.iou_loss(src_masks, target_masks, ious, num_objects, loss_on_multimask=True,
                           use_l1_loss=cfg.iou_use_l1_loss)
    if multimask.size(1) > 1:
        combo = multimask * cfg.weight_mask + multidice * cfg.weight_dice
        best = torch.argmin(combo, dim=-1)
        rows = torch.arange(combo.size(0))
        loss_mask = multimask[rows, best].unsqueeze(1)
        loss_dice = multidice[rows, best].unsqueeze(1)
        loss_iou = multiiou.mean(dim=-1).unsqueeze(1) if cfg.supervise_all_iou else multiiou[rows, best].unsqueeze(1)
    else:
        loss_mask, loss_dice, loss_iou = multimask, multidice, multiiou
    losses["mask"] += (loss_mask * target_obj).sum().item()
    losses["dice"] += (loss_dice * target_obj).sum().item()
    losses["iou"] += (loss_iou * target_obj).sum().item()
    losses["class"] += loss_class.item()


def random_step(seed, b=B, k=K, h=H, w=W):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(size=(b, h, w)) < rng.uniform(0.1, 0.6, (b, 1, 1))
    gt[1] = False  # an empty GT
    # Logits correlated with the GT so that some binarised masks overlap it.
    logits = (rng.normal(0, 2, (b, k, h, w)) + 1.5 * (2 * gt[:, None] - 1)).astype(np.float32)
    ious = rng.uniform(0, 1, (b, k)).astype(np.float32)
    obj = rng.normal(0, 2, (b, 1)).astype(np.float32)
    return logits, ious, obj, gt


def ours(logits, ious, obj, gt, cand, cfg=CFG):
    return {k: np.asarray(v) for k, v in jax.jit(step_losses, static_argnums=5)(logits, ious, obj, gt, cand, cfg).items()}


def ref_per_object(tr, logits, ious, obj, gt, cand, cfg, num_objects):
    """The reference on each object alone (its candidate masks as the M channels), as (B,) arrays."""
    torch = tr.torch
    out = {k: [] for k in ("mask", "dice", "iou", "class")}
    for i in range(len(gt)):
        idx = np.flatnonzero(cand[i])
        losses = dict.fromkeys(out, 0.0)
        ref_update_losses(tr, losses, torch.tensor(logits[i:i + 1, idx]), torch.tensor(gt[i:i + 1, None]).float(),
                          torch.tensor(ious[i:i + 1, idx]), num_objects, torch.tensor(obj[i:i + 1]), cfg)
        for k, values in out.items():
            values.append(losses[k])
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parity
@pytest.mark.parametrize("cfg", [CFG, TrackerLossConfig(supervise_all_iou=False, iou_use_l1_loss=False,
                                                        weight_mask=5.0, weight_dice=2.0)], ids=["sam2", "variant"])
def test_mixed_candidates_match_reference(tref, cfg):
    logits, ious, obj, gt = random_step(0)
    cand = np.array([[False, True, True, True], [False, True, True, True], [True, False, False, False]])
    got = ours(logits, ious, obj, gt, cand, cfg)
    want = ref_per_object(tref, logits, ious, obj, gt, cand, cfg, num_objects=B)
    for k in want:
        np.testing.assert_allclose(got[k] / B, want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert want["mask"][1] == 0 and got["mask"][1] == 0  # the empty GT: only its class term
    assert got["class"][1] > 0


@pytest.mark.parity
def test_multistep_batched_matches_reference(tref):
    """Three steps (multimask, single-mask, multimask) over the whole batch as the reference runs them:
    sum over steps of terms.sum() / num_objects, and the weighted total (``reduce_loss``)."""
    torch = tref.torch
    steps = [random_step(s) for s in (1, 2, 3)]
    multi = np.array([False, True, True, True])
    single = np.array([True, False, False, False])
    cands = [multi, single, multi]
    ref = dict.fromkeys(("mask", "dice", "iou", "class"), 0.0)
    total = dict.fromkeys(ref, 0.0)
    gt = steps[0][3]
    for (logits, ious, obj, _), cand in zip(steps, cands):
        ref_update_losses(tref, ref, torch.tensor(logits[:, cand]), torch.tensor(gt[:, None]).float(),
                          torch.tensor(ious[:, cand]), B, torch.tensor(obj), CFG)
        got = ours(logits, ious, obj, gt, np.broadcast_to(cand, (B, K)))
        for k in total:
            total[k] += got[k].sum() / B
    for k in ref:
        np.testing.assert_allclose(total[k], ref[k], rtol=1e-5, err_msg=k)
    want_total = sum(ref[k] * CFG.weight(k) for k in ref)
    np.testing.assert_allclose(float(weighted_total(total, CFG)), want_total, rtol=1e-5)


def test_hand_worked_2x2():
    """Object 0: GT = top-left pixel; candidates 1..3 (token 0 is not a candidate).
    token 1: logits 0 (p = 1/2) -> focal = (1/4 * 1/4 + 3 * 3/4 * 1/4) ln2 / 4 = 5/32 ln2, dice 1/2, IoU 0;
    token 2: +-ln3 on/off the GT (p_t = 3/4) -> focal = (1/4 + 3 * 3/4) / 16 ln(4/3) / 4 = 5/128 ln(4/3),
             dice = 1 - (1.5 + 1) / (1.5 + 1 + 1) = 2/7, IoU 1;
    token 3: -ln3 everywhere -> focal = (1/4 * 9/16 ln4 + 3 * 3/4 * 1/16 ln(4/3)) / 4, dice 1/2, IoU 0.
    20 focal + dice: 2.67, 0.51, 1.68 -> token 2. IoU predictions (., 0.2, 0.7, 0.1): errors 0.2, 0.3, 0.1.
    Object 1: empty GT, object logit ln3 -> class = ln 4, nothing else."""
    l3 = math.log(3.0)
    t2 = np.array([[l3, -l3], [-l3, -l3]])
    logits = np.zeros((2, 4, 2, 2), np.float32)
    logits[0, 0] = 5.0
    logits[0, 2] = t2
    logits[0, 3] = -l3
    logits[1] = t2
    ious = np.array([[0.9, 0.2, 0.7, 0.1], [0.5, 0.5, 0.5, 0.5]], np.float32)
    obj = np.array([[0.0], [l3]], np.float32)
    gt = np.zeros((2, 2, 2), bool)
    gt[0, 0, 0] = True
    cand = np.array([[False, True, True, True]] * 2)

    got = ours(logits, ious, obj, gt, cand)
    np.testing.assert_allclose(got["mask"], [5 / 128 * math.log(4 / 3), 0.0], rtol=1e-6)
    np.testing.assert_allclose(got["dice"], [2 / 7, 0.0], rtol=1e-6)
    np.testing.assert_allclose(got["iou"], [(0.2 + 0.3 + 0.1) / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(got["class"], [math.log(2.0), math.log(4.0)], rtol=1e-6)
    sel = ours(logits, ious, obj, gt, cand, TrackerLossConfig(supervise_all_iou=False))
    np.testing.assert_allclose(sel["iou"], [0.3, 0.0], rtol=1e-6)
    # Only token 0 as the candidate: its own values (logit 5 everywhere: IoU 1/4, error 0.65).
    single = ours(logits, ious, obj, gt, np.array([[True, False, False, False]] * 2))
    np.testing.assert_allclose(single["iou"], [0.65, 0.0], rtol=1e-6)
    total = weighted_total(got, CFG)
    np.testing.assert_allclose(total, 20 * got["mask"] + got["dice"] + got["iou"] + got["class"], rtol=1e-6)
    assert total.shape == (2,)


def test_gradients():
    logits, ious, obj, gt = random_step(4)
    cand = np.array([[False, True, True, True], [False, True, True, True], [True, False, False, False]])

    def loss(lg, io, ob):
        return weighted_total(step_losses(lg, io, ob, gt, cand, CFG), CFG).sum()

    terms = step_losses(logits, ious, obj, gt, cand, CFG)
    g_lg, g_io, g_ob = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(logits, ious, obj)
    for g in (g_lg, g_io, g_ob):
        assert np.all(np.isfinite(g))
    assert np.all(np.abs(np.asarray(g_ob)) > 0)
    # The empty-GT object (1) only has the class term: no gradient into its masks or IoUs.
    assert not np.any(g_lg[1]) and not np.any(g_io[1])
    # Object 0: gradient reaches exactly the selected mask; IoU gradients reach all three candidates.
    nonzero = [bool(np.any(g_lg[0, t])) for t in range(K)]
    assert sum(nonzero) == 1 and not nonzero[0]
    assert np.all(g_io[0, 1:] != 0) and g_io[0, 0] == 0
    # Object 2: single candidate (token 0).
    assert np.any(g_lg[2, 0]) and not np.any(g_lg[2, 1:]) and g_io[2, 0] != 0 and not np.any(g_io[2, 1:])
    assert all(np.isfinite(np.asarray(v)).all() for v in terms.values())


def test_vmap_over_steps_and_no_candidates():
    logits, ious, obj, gt = random_step(5)
    cand = np.zeros((B, K), bool)
    cand[0, 1:] = True
    out = jax.vmap(lambda lg: step_losses(lg, ious, obj, gt, cand, CFG))(jnp.stack([logits, -logits]))
    assert out["mask"].shape == (2, B)
    # No candidate at all (objects 1 and 2): mask terms 0, class term still there.
    assert np.all(np.asarray(out["mask"][:, 1:]) == 0) and np.all(np.asarray(out["iou"][:, 1:]) == 0)
    assert np.all(np.asarray(out["class"]) > 0)
    with pytest.raises(KeyError):
        weighted_total({"mask": 1.0, "bogus": 2.0}, CFG)
