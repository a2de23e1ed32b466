"""Detector losses: a hand-worked case, presence gating, padding, finite gradients.

The reference comparison (every term, the total and the gradients) is in
tests/parity/test_losses_parity.py; these tests need no torch.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.train.losses import DetectorLossConfig, detector_loss
from sam3_jax.train.losses.detector import mask_loss, semantic_loss


def np_bce(x, t):
    p = 1 / (1 + np.exp(-x))
    return -t * np.log(p) - (1 - t) * np.log(1 - p)


def np_focal(x, t, alpha=0.25, gamma=2):
    p = 1 / (1 + np.exp(-x))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * np_bce(x, t) * (1 - p_t) ** gamma


def test_hand_worked_single_query():
    """One target, two predictions, masks upsampled 2x2 -> 4x4, worked out with numpy."""
    out = {"pred_logits": np.array([[[1.0], [-0.5]]], np.float32),
           "pred_boxes": np.array([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.8, 0.1, 0.1]]], np.float32),
           "presence_logit_dec": np.array([[0.3]], np.float32),
           "pred_masks": np.array([[[[2.0, -1.0], [0.5, -3.0]], [[0.0, 0.0], [0.0, 0.0]]]], np.float32)}
    gt_mask = np.zeros((4, 4), bool)
    gt_mask[:2, :3] = True
    targets = {"boxes": np.array([[[0.52, 0.5, 0.2, 0.2]]], np.float32), "valid": np.array([[True]]),
               "masks": gt_mask[None, None]}
    cfg = DetectorLossConfig(pad_n_queries=None)
    loss = jax.jit(lambda o, t, nb: detector_loss(o, t, cfg, num_boxes=nb))
    total, terms = loss(out, targets, 1.0)

    p0, p1 = 1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(0.5))
    iou = 0.036 / 0.044  # 0.18 x 0.2 overlap of two 0.2 x 0.2 boxes; GIoU = IoU (enclosing = union)
    soft = p0 ** 0.25 * iou ** 0.75
    ce = (10 * np_bce(1.0, soft) + np_bce(-0.5, 0.0) * p1 ** 2) / 2
    presence = 0.5 * np_bce(0.3, 1.0)
    up = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])  # bilinear 2 -> 4, align_corners=False
    logits = up @ out["pred_masks"][0, 0] @ up.T
    focal = np_focal(logits, gt_mask.astype(float)).mean()
    prob = 1 / (1 + np.exp(-logits))
    dice = 1 - (2 * (prob * gt_mask).sum() + 1) / (prob.sum() + gt_mask.sum() + 1)
    want = {"loss_ce": ce, "presence_loss": presence, "loss_bbox": 0.02, "loss_giou": 1 - iou,
            "loss_mask": focal, "loss_dice": dice}
    assert set(terms) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(terms[k], v, rtol=1e-5, err_msg=k)
    weights = {"loss_ce": 20, "presence_loss": 20, "loss_bbox": 5, "loss_giou": 2, "loss_mask": 200, "loss_dice": 10}
    np.testing.assert_allclose(total, sum(weights[k] * v for k, v in want.items()), rtol=1e-5)

    # A global box count divides the box and mask terms only.
    _, halved = loss(out, targets, 2.0)
    for k, v in want.items():
        per_box = k in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice")
        np.testing.assert_allclose(halved[k], v / 2 if per_box else v, rtol=1e-5, err_msg=k)


def random_boxes(rng, shape):
    return np.concatenate([rng.uniform(0.25, 0.75, shape + (2,)), rng.uniform(0.05, 0.4, shape + (2,))],
                          -1).astype(np.float32)


def layer(rng, b, q, mask_hw=None, o2m=True):
    out = {"pred_logits": rng.normal(0, 2, (b, q, 1)).astype(np.float32), "pred_boxes": random_boxes(rng, (b, q)),
           "presence_logit_dec": rng.normal(0, 1, (b, 1)).astype(np.float32)}
    if mask_hw:
        out["pred_masks"] = rng.normal(0, 2, (b, q) + mask_hw).astype(np.float32)
    if o2m:
        out.update({k + "_o2m": v for k, v in layer(rng, b, q, mask_hw, o2m=False).items()
                    if k != "presence_logit_dec"})
    return out


def targets(rng, valid, gt_hw=(12, 12)):
    valid = np.asarray(valid)
    return {"boxes": np.where(valid[..., None], random_boxes(rng, valid.shape), 0.0).astype(np.float32),
            "valid": valid, "masks": (rng.uniform(size=valid.shape + gt_hw) < 0.3) & valid[..., None, None],
            "is_exhaustive": np.array([True, False, True][: len(valid)])}


def test_presence_gating_and_finite_gradients():
    """Query 1 has no target: its scores get no gradient, its presence logit is trained towards 0,
    and every gradient is finite, whatever the padding target slots hold."""
    rng = np.random.default_rng(0)
    b, q = 3, 10
    out = layer(rng, b, q, (6, 6))
    out["aux_outputs"] = [layer(rng, b, q) for _ in range(2)]
    t = targets(rng, [[True, False, True, True], [False] * 4, [True, True, False, False]])
    t["boxes"][0, 1] = np.nan  # garbage in a padding slot
    out["pred_boxes_o2m"][0, :3] = t["boxes"][0, [0, 2, 3]] + 0.01  # something for the o2m rule to match
    (total, terms), grads = jax.jit(jax.value_and_grad(detector_loss, has_aux=True))(out, t)
    assert np.isfinite(total) and all(np.isfinite(v) for v in terms.values())
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    for g in [grads] + grads["aux_outputs"]:
        for k in ("pred_logits", "pred_logits_o2m", "pred_boxes", "pred_boxes_o2m"):
            assert not g[k][1].any() and g[k][0].any(), k
        assert g["presence_logit_dec"][1, 0] > 0  # pushes the presence logit of the empty query down
    assert not grads["pred_masks"][1].any() and grads["pred_masks"][0].any()
    x = out["presence_logit_dec"][:, 0]
    np.testing.assert_allclose(terms["presence_loss"], np.mean(0.5 * np_bce(x, np.array([1.0, 0.0, 1.0]))),
                               rtol=1e-5)


def test_padding_queries_and_slot_order_do_not_matter():
    """A padding query (query_valid False) adds nothing and is not counted in any mean or in the
    sqrt(batch) scale; target slots can be in any order."""
    rng = np.random.default_rng(1)
    out = layer(rng, 3, 8, (6, 6))
    t = targets(rng, [[True, True, False], [False, True, False], [True, True, True]])
    loss = jax.jit(lambda o, t, qv: detector_loss(o, t, query_valid=qv))
    total, terms = loss(out, t, np.array([True, True, False]))
    first_two = jax.tree.map(lambda x: x[:2], (out, t))
    want_total, want_terms = jax.jit(detector_loss)(*first_two)
    np.testing.assert_allclose(total, want_total, rtol=1e-6)
    for k in want_terms:
        np.testing.assert_allclose(terms[k], want_terms[k], rtol=1e-6, err_msg=k)

    order = np.array([2, 0, 1])
    shuffled = {k: v[:, order] if k in ("boxes", "valid", "masks") else v for k, v in t.items()}
    total_shuffled, _ = loss(out, shuffled, np.array([True, True, False]))
    np.testing.assert_allclose(total_shuffled, total, rtol=1e-6)


def test_config_from_dict():
    cfg = DetectorLossConfig.from_dict({"loss_ce": 5.0, "matcher": {"cost_bbox": 1.0}, "o2m_matcher": {"topk": 6}})
    assert cfg.loss_ce == 5.0 and cfg.matcher.cost_bbox == 1.0 and cfg.matcher.cost_giou == 2.0
    assert cfg.o2m_matcher.topk == 6
    with pytest.raises(TypeError):
        DetectorLossConfig.from_dict({"loss_cee": 1.0})


def test_point_sampled_masks_need_an_rng():
    cfg = DetectorLossConfig(num_sample_points=8)
    with pytest.raises(ValueError, match="rng"):
        mask_loss(jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 2, 1), bool), jnp.zeros((1, 1, 8, 8), bool),
                  jnp.ones((1, 1), bool), 1.0, 1, cfg)


def test_chunked_mask_loss_is_identical():
    """``mask_chunk`` (target slots upsampled a few at a time) changes memory, not values."""
    rng = np.random.default_rng(2)
    pred = rng.normal(size=(2, 10, 12, 12)).astype(np.float32)
    match = np.zeros((2, 10, 3), bool)
    match[0, [1, 2, 7], [0, 0, 1]] = True
    match[1, 5, 2] = True
    tgt = rng.uniform(size=(2, 3, 30, 30)) < 0.4

    def total(p, cfg):
        return sum(mask_loss(p, match, tgt, np.ones((2, 3), bool), 3.0, 4, cfg).values())

    f = jax.jit(jax.value_and_grad(total), static_argnums=1)
    results = [f(pred, DetectorLossConfig(mask_chunk=chunk)) for chunk in (None, 2)]
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_semantic_terms_are_added_to_the_final_layer_only_when_weighted():
    """Weights 0 (the default) leave the terms out; non-zero weights add weight x term (times the
    sqrt(batch) scale) and change nothing else. A query with a valid target whose mask is unknown
    drops out of the semantic terms."""
    rng = np.random.default_rng(2)
    out = layer(rng, 3, 8, (6, 6))
    out["semantic_seg"] = rng.normal(0, 2, (3, 6, 6, 1)).astype(np.float32)
    out["aux_outputs"] = [layer(rng, 3, 8)]
    t = targets(rng, [[True, True, False], [False, True, False], [True, False, False]])
    base_total, base_terms = jax.jit(detector_loss)(out, t)
    assert not any("semantic" in k for k in base_terms)
    cfg = DetectorLossConfig(loss_semantic_seg=20.0, loss_semantic_dice=30.0)
    loss = jax.jit(lambda o, t: detector_loss(o, t, cfg))
    total, terms = loss(out, t)
    assert set(terms) - set(base_terms) == {"loss_semantic_seg", "loss_semantic_dice"}
    for k in base_terms:
        np.testing.assert_allclose(terms[k], base_terms[k], rtol=1e-6, err_msg=k)
    extra = 20 * terms["loss_semantic_seg"] + 30 * terms["loss_semantic_dice"]
    np.testing.assert_allclose(total, base_total + np.sqrt(3) * extra, rtol=1e-5)

    partial = dict(t, mask_valid=np.array([[True, True, False], [True, False, True], [True, False, True]]))
    _, dropped = loss(out, partial)  # the second query's only mask is unknown: as if it had no target
    emptied = dict(t, valid=t["valid"] & np.array([[True], [False], [True]]))
    _, want = loss(out, emptied)
    for k in ("loss_semantic_seg", "loss_semantic_dice"):
        np.testing.assert_allclose(dropped[k], want[k], rtol=1e-6, err_msg=k)


def test_semantic_loss_of_shards_adds_up_to_the_whole_batch():
    """With the count of non-empty queries summed over shards (``global_sum``), the shards' terms add
    up to the whole batch's, as the frame-sharded step needs."""
    rng = np.random.default_rng(3)
    seg = rng.normal(0, 2, (4, 5, 5, 1)).astype(np.float32)
    t = targets(rng, [[True, False], [False, False], [True, True], [False, True]])
    cfg = DetectorLossConfig(loss_semantic_seg=1.0, loss_semantic_dice=1.0)
    whole = semantic_loss(seg, t["masks"], t["valid"], cfg)
    present = int((t["masks"] & t["valid"][..., None, None]).any((1, 2, 3)).sum())
    parts = [semantic_loss(seg[s], t["masks"][s], t["valid"][s], cfg, global_sum=lambda _: jnp.asarray(present))
             for s in (slice(0, 2), slice(2, 4))]
    for k in whole:
        np.testing.assert_allclose(parts[0][k] + parts[1][k], whole[k], rtol=1e-6, err_msg=k)
