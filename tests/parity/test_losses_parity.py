"""Matchers and detector losses against the reference's ``sam3/train`` code on CPU.

``loss_fns`` imports a Triton focal-loss kernel module (which needs the real triton) and
``torchmetrics`` (only for a logged F1); the fixture below installs CPU stand-ins for both first
(``reference.install_loss_shims``), so the reference's own reduction and normalisation code runs.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.train import matcher
from sam3_jax.train.losses import detector as losses
from sam3_jax.train.losses.point_sampling import uncertain_point_coords

pytestmark = pytest.mark.parity
RTOL = 2e-5


@pytest.fixture(scope="module")
def tref(ref):
    from sam3_jax.testing import reference

    torch = ref.torch
    reference.install_loss_shims(torch)

    from sam3.model import box_ops
    from sam3.model.model_misc import SAM3Output
    from sam3.train import matcher as tmatcher
    from sam3.train.loss import loss_fns, mask_sampling, sam3_loss

    return types.SimpleNamespace(torch=torch, box_ops=box_ops, matcher=tmatcher, loss_fns=loss_fns, sam3_loss=sam3_loss,
                                 mask_sampling=mask_sampling, SAM3Output=SAM3Output)


def random_boxes(rng, shape, lo=0.05, hi=0.45):
    centre = rng.uniform(0.25, 0.75, shape + (2,))
    return np.concatenate([centre, rng.uniform(lo, hi, shape + (2,))], -1).astype(np.float32)


def near(rng, boxes, count, noise=0.03):
    """Predictions scattered around targets so that the IoU-based o2m rule finds matches."""
    picks = boxes[rng.integers(0, len(boxes), count)]
    return np.clip(picks + rng.normal(0, noise, picks.shape), 0.02, 0.98).astype(np.float32)


def make_targets(rng, num_boxes, n_max, mask_hw=None):
    b = len(num_boxes)
    valid = np.arange(n_max)[None, :] < np.asarray(num_boxes)[:, None]
    boxes = np.where(valid[..., None], random_boxes(rng, (b, n_max)), 0.0).astype(np.float32)
    t = {"boxes": boxes, "valid": valid, "is_exhaustive": rng.uniform(size=b) < 0.5}
    if mask_hw is not None:
        t["masks"] = (rng.uniform(size=(b, n_max) + mask_hw) < 0.4) & valid[..., None, None]
    return t


def make_outputs(rng, targets, q, mask_hw=None):
    """One layer's outputs, half of the predictions near targets (or anywhere for empty queries)."""
    b = targets["boxes"].shape[0]
    boxes = random_boxes(rng, (b, q))
    for i in range(b):
        real = targets["boxes"][i][targets["valid"][i]]
        if len(real):
            boxes[i, : q // 2] = near(rng, real, q // 2)
    out = {"pred_logits": rng.normal(0, 2, (b, q, 1)).astype(np.float32), "pred_boxes": boxes}
    if mask_hw is not None:
        out["pred_masks"] = rng.normal(0, 2, (b, q) + mask_hw).astype(np.float32)
    return out


def torch_targets(tr, t):
    """Our padded targets (valid slots first) as the dict ``Sam3Image.back_convert`` makes."""
    torch = tr.torch
    valid = t["valid"]
    packed = torch.tensor(t["boxes"][valid])
    out = {"boxes": packed, "boxes_xyxy": tr.box_ops.box_cxcywh_to_xyxy(packed),
           "boxes_padded": torch.tensor(t["boxes"]), "num_boxes": torch.tensor(valid.sum(1)),
           "is_exhaustive": torch.tensor(t["is_exhaustive"]),
           "object_ids_padded": torch.tensor(np.where(valid, np.arange(valid.size).reshape(valid.shape), -1)),
           "masks": None, "is_valid_mask": torch.ones(int(valid.sum()), dtype=torch.bool)}
    if "masks" in t:
        out["masks"] = torch.tensor(t["masks"][valid])
    return out


def torch_outputs(tr, out, requires_grad=False):
    res = {}
    for k, v in out.items():
        if k == "aux_outputs":
            res[k] = [torch_outputs(tr, a, requires_grad) for a in v]
            continue
        res[k] = tr.torch.tensor(v, requires_grad=requires_grad)
        if k.startswith("pred_boxes"):  # derived from the cxcywh boxes, as in the model
            res[k.replace("pred_boxes", "pred_boxes_xyxy")] = tr.box_ops.box_cxcywh_to_xyxy(res[k])
    return res


def ref_hungarian(tr):
    return tr.matcher.BinaryHungarianMatcherV2(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal=True,
                                               alpha=0.25, gamma=2, stable=False)


def dense(indices, t, q):
    """(B, Q, N) bool from the reference's (batch, src, packed target or None) index triple."""
    batch, src, tgt = (None if x is None else x.numpy() for x in indices)
    valid = t["valid"]
    if tgt is None:  # one prediction per target, targets in packed order
        tgt = np.arange(valid.sum())
    m = np.zeros((valid.shape[0], q, valid.shape[1]), bool)
    m[batch, src, np.nonzero(valid)[1][tgt]] = True
    return m


def test_hungarian_matches_reference_matcher(tref):
    rng = np.random.default_rng(0)
    t = make_targets(rng, [0, 3, 8, 1, 5, 8], 8)
    outs = [make_outputs(rng, t, 12) for _ in range(10)]
    want = [dense(ref_hungarian(tref)(torch_outputs(tref, o), torch_targets(tref, t)), t, 12) for o in outs]
    solve = jax.jit(jax.vmap(matcher.hungarian_match))
    for o, w in zip(outs, want):
        tgt_of_pred = np.asarray(solve(o["pred_logits"], o["pred_boxes"], t["boxes"], t["valid"]))
        got = tgt_of_pred[..., None] == np.arange(8)
        np.testing.assert_array_equal(got, w)


def test_hungarian_cost_matches_reference_formula(tref):
    torch, box_ops = tref.torch, tref.box_ops
    rng = np.random.default_rng(1)
    logits, boxes, tgt = rng.normal(0, 3, (9,)).astype(np.float32), random_boxes(rng, (9,)), random_boxes(rng, (4,))
    x, pb, tb = torch.tensor(logits), torch.tensor(boxes), torch.tensor(tgt)
    p = x.sigmoid()
    cls = -0.25 * (1 - p) ** 2 * torch.nn.functional.logsigmoid(x) + 0.75 * p ** 2 * torch.nn.functional.logsigmoid(-x)
    want = (5 * torch.cdist(pb, tb, p=1) + 2 * cls[:, None]
            - 2 * box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(pb), box_ops.box_cxcywh_to_xyxy(tb))).numpy()
    np.testing.assert_allclose(matcher.hungarian_cost(logits, boxes, tgt), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q", [12, 200])
def test_one_to_many_matches_reference_matcher(tref, q):
    rng = np.random.default_rng(2)
    t = make_targets(rng, [0, 2, 5, 5], 5)
    t["boxes"][2, 1] = t["boxes"][2, 0] + 0.01  # overlapping targets: queries near both match both
    o = make_outputs(rng, t, q)
    o["pred_logits"] = np.abs(o["pred_logits"])  # confident predictions pass the 0.4 threshold
    ref_m = tref.matcher.BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4)
    want = dense(ref_m(torch_outputs(tref, o), torch_targets(tref, t)), t, q)
    got = jax.jit(jax.vmap(matcher.one_to_many_match))(o["pred_logits"], o["pred_boxes"], t["boxes"], t["valid"])
    assert want.sum() > 10 and (want.sum(-1) > 1).any()  # several matches, some query matching 2 targets
    np.testing.assert_array_equal(np.asarray(got), want)


def test_torch_quantile(tref):
    x = np.random.default_rng(3).normal(size=(200, 3)).astype(np.float32)
    x[:150, 1] = 0.25  # ties
    for q in (1 - 4 / 200, 1 - 4 / 12, 0.5, 0.03):
        want = tref.torch.quantile(tref.torch.tensor(x), q, dim=0).numpy()
        np.testing.assert_array_equal(np.asarray(matcher.torch_quantile(jnp.asarray(x), q)), want)


def full_case(rng, mask_hw=None, gt_hw=None, layers=3, q=12):
    t = make_targets(rng, [0, 3, 6, 1], 6, gt_hw)
    b = len(t["valid"])

    def layer(with_masks):
        o = make_outputs(rng, t, q, mask_hw if with_masks else None)
        o2m = make_outputs(rng, t, q, mask_hw if with_masks else None)
        o.update({k + "_o2m": v for k, v in o2m.items()})
        o["presence_logit_dec"] = rng.normal(0, 2, (b, 1)).astype(np.float32)
        return o

    out = layer(True)
    out["aux_outputs"] = [layer(False) for _ in range(layers - 1)]
    return out, t


def ref_wrapper(tr, masks: bool, weak_loss=False, pad_n_queries=200):
    lf = tr.loss_fns
    fns = [lf.IABCEMdetr(pos_weight=10.0, weight_dict={"loss_ce": 20.0, "presence_loss": 20.0}, gamma=2,
                         alpha=0.25, weak_loss=weak_loss, use_presence=True, pad_n_queries=pad_n_queries),
           lf.Boxes(weight_dict={"loss_bbox": 5.0, "loss_giou": 2.0})]
    if masks:
        fns.append(lf.Masks(weight_dict={"loss_mask": 200.0, "loss_dice": 10.0}, focal_alpha=0.25,
                            focal_gamma=2.0, compute_aux=False))
    # "local" = "global" on one process (no torch.distributed group to all-reduce over).
    return tr.sam3_loss.Sam3LossWrapper(
        fns, normalization="local", matcher=ref_hungarian(tr),
        o2m_matcher=tr.matcher.BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4), o2m_weight=2.0,
        use_o2m_matcher_on_o2m_aux=False, scale_by_find_batch_size=True)


def run_reference(tr, wrapper, out, t):
    tout, tt = torch_outputs(tr, out), torch_targets(tr, t)
    m = ref_hungarian(tr)
    for o in [tout] + tout["aux_outputs"]:  # as Sam3Image._compute_matching
        o["indices"] = m(o, tt)
    return {k: float(v) for k, v in wrapper(tr.SAM3Output([[tout]]), [tt]).items()}


def compare(got_total, got_terms, want):
    """Every loss term and the total; the reference also logs metrics (F1, presence accuracy) and a
    constant-zero presence loss for the o2m queries (they have no presence logit), which we omit."""
    total = want.pop("core_loss")
    for k in [k for k in want if k.startswith(("ce_f1", "presence_dec_acc", "presence_loss")) and
              (k.endswith("_o2m") or not k.startswith("presence_loss"))]:
        if k.startswith("presence_loss"):
            assert want[k] == 0.0
        del want[k]
    assert set(got_terms) == set(want)
    worst = max(abs(float(got_terms[k]) - v) / max(abs(v), 1e-3) for k, v in want.items())
    assert worst < RTOL, worst
    assert abs(float(got_total) - total) / total < RTOL
    return worst


def test_full_loss_and_gradients_match_reference_wrapper(tref):
    """Final + 2 aux layers, o2o + o2m queries, masks, a query without targets (presence gating)."""
    out, t = full_case(np.random.default_rng(4), mask_hw=(8, 8), gt_hw=(20, 20))
    leaves = torch_outputs(tref, out, requires_grad=True)
    flat = [leaves] + leaves["aux_outputs"]
    tt = torch_targets(tref, t)
    for o in flat:
        o["indices"] = ref_hungarian(tref)(o, tt)
    res = ref_wrapper(tref, masks=True)(tref.SAM3Output([[leaves]]), [tt])
    res["core_loss"].backward()
    want = {k: float(v) for k, v in res.items()}

    total_and_grad = jax.jit(jax.value_and_grad(losses.detector_loss, has_aux=True))
    (got_total, got_terms), grads = total_and_grad(out, t)
    compare(got_total, got_terms, want)
    for got, o in zip([grads] + grads["aux_outputs"], flat):
        for k, g in got.items():
            if k != "aux_outputs":
                ref_g = o[k].grad.numpy()
                assert np.abs(ref_g).max() > 0, k
                np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-5 * np.abs(ref_g).max(), err_msg=k)


def test_weak_loss_matches_reference_wrapper(tref):
    """``weak_loss``: negatives of non-exhaustive queries are dropped from the CE mean."""
    out, t = full_case(np.random.default_rng(5), layers=2)
    want = run_reference(tref, ref_wrapper(tref, masks=False, weak_loss=True), out, t)
    cfg = losses.DetectorLossConfig(weak_loss=True)
    compare(*jax.jit(losses.detector_loss, static_argnums=2)(out, t, cfg), want)


def test_uncertain_points_match_reference(tref, monkeypatch):
    torch = tref.torch
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 1, 9, 7)).astype(np.float32)
    cand, extra = rng.uniform(size=(3, 12, 2)).astype(np.float32), rng.uniform(size=(3, 1, 2)).astype(np.float32)
    queue = [torch.tensor(cand), torch.tensor(extra)]
    monkeypatch.setattr(torch, "rand", lambda *a, **k: queue.pop(0))
    want = tref.mask_sampling.get_uncertain_point_coords_with_randomness(
        torch.tensor(logits), tref.mask_sampling.calculate_uncertainty, 4, 3, 0.75)
    got = uncertain_point_coords(jnp.asarray(logits[:, 0]), jnp.asarray(cand), 3, jnp.asarray(extra))
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_point_sampled_mask_loss_matches_reference(tref, monkeypatch):
    """Our sampled coordinates fed to the reference's ``Masks._sampled_loss``: same point values,
    focal and dice."""
    from sam3_jax.train.losses.point_sampling import sample_points

    torch = tref.torch
    rng = np.random.default_rng(6)
    t = make_targets(rng, [2, 3], 3, (24, 24))
    o = make_outputs(rng, t, 6, (10, 10))
    match = np.zeros((2, 6, 3), bool)
    match[0, [4, 1], [0, 1]] = True
    match[1, [0, 5, 2], [0, 1, 2]] = True
    cfg = losses.DetectorLossConfig(num_sample_points=16, oversample_ratio=3.0, importance_sample_ratio=0.75)
    key = jax.random.key(0)
    mask_loss = jax.jit(losses.mask_loss, static_argnums=(5, 6))
    got = mask_loss(o["pred_masks"], match, t["masks"], t["valid"], 5.0, 1, cfg, key)
    # Same call as inside mask_loss: matched masks per target slot, padding slots included.
    src = np.stack([o["pred_masks"][b, match[b].argmax(0)] for b in range(2)])
    coords = np.asarray(sample_points(key, jnp.asarray(src.reshape(6, 10, 10)), 16, 3.0, 0.75))
    keep = t["valid"].reshape(-1)
    monkeypatch.setattr(tref.loss_fns, "get_uncertain_point_coords_with_randomness",
                        lambda *a, **k: torch.tensor(coords[keep]))
    m = tref.loss_fns.Masks(weight_dict={"loss_mask": 1.0, "loss_dice": 1.0}, num_sample_points=16,
                            oversample_ratio=3.0, importance_sample_ratio=0.75)
    want = m._sampled_loss(torch.tensor(src.reshape(6, 10, 10)[keep]),
                           torch.tensor(t["masks"].reshape(6, 24, 24)[keep]).float(), 5.0)
    for k in ("loss_mask", "loss_dice"):
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=RTOL)


@pytest.mark.parametrize("focal", [True, False])
def test_semantic_loss_matches_reference_criterion(tref, focal):
    """``SemanticSegCriterion`` as its commented-out config builds it (presence_head=True,
    presence_loss=False, downsample=False): values and the gradient of the logits; the third query
    has no target, so it adds nothing and is not counted."""
    torch = tref.torch
    rng = np.random.default_rng(7)
    t = make_targets(rng, [2, 1, 0], 3, (20, 20))
    logits = rng.normal(0, 2, (3, 8, 8, 1)).astype(np.float32)
    criterion = tref.loss_fns.SemanticSegCriterion(
        {"loss_semantic_seg": 20.0, "loss_semantic_dice": 30.0, "loss_semantic_presence": 1.0}, focal=focal,
        focal_alpha=0.6, focal_gamma=2.0, downsample=False, presence_head=True, presence_loss=False)
    seg = torch.tensor(logits.transpose(0, 3, 1, 2), requires_grad=True)
    targets = {"masks": torch.tensor(t["masks"][t["valid"]]), "num_boxes": torch.tensor(t["valid"].sum(1))}
    want = criterion.get_loss({"semantic_seg": seg, "presence_logit": None}, targets)
    (20 * want["loss_semantic_seg"] + 30 * want["loss_semantic_dice"]).backward()

    cfg = losses.DetectorLossConfig(semantic_focal=focal)

    def weighted(x):
        got = losses.semantic_loss(x, jnp.asarray(t["masks"]), jnp.asarray(t["valid"]), cfg)
        return 20 * got["loss_semantic_seg"] + 30 * got["loss_semantic_dice"], got

    (_, got), grad = jax.jit(jax.value_and_grad(weighted, has_aux=True))(logits)
    for k in ("loss_semantic_seg", "loss_semantic_dice"):
        print(f"{k} (focal={focal}): {float(got[k]):.6f} vs {float(want[k]):.6f}, "
              f"rel err {abs(float(got[k]) / float(want[k]) - 1):.1e}")
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=RTOL, err_msg=k)
    ref_grad = seg.grad.numpy().transpose(0, 2, 3, 1)
    print(f"gradient: max abs err {np.abs(np.asarray(grad) - ref_grad).max() / np.abs(ref_grad).max():.1e} "
          "of the largest")
    assert np.abs(ref_grad[2]).max() == 0 and np.abs(ref_grad[:2]).max() > 0
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6 * np.abs(ref_grad).max())
