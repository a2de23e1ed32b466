"""The SAM 3 detector losses (docs/reference_model.md, 'Detector training'): ``Sam3LossWrapper`` over
``IABCEMdetr``, ``Boxes`` and ``Masks``, on padded targets with static shapes.

Matches are dense (B, Q, N) booleans (query q answers target slot n), which covers both the
one-to-one Hungarian matches and the one-to-many ones (a query may match several targets), so
every term is a masked sum instead of the reference's gather over variable-length index lists.

Inputs (B detection queries, Q predictions, N target slots):

* ``outputs``: the detector's training dict (``sam3_jax.model.heads.detector_outputs``):
  ``pred_logits`` (B, Q, 1), ``pred_boxes`` (B, Q, 4) cxcywh, ``pred_boxes_xyxy``,
  ``presence_logit_dec`` (B, 1), optional ``pred_masks`` (B, Q, h, w) logits, the ``*_o2m``
  entries of the DAC queries, and ``aux_outputs`` (one dict per earlier decoder layer).
* ``targets``: ``boxes`` (B, N, 4) normalised cxcywh, ``valid`` (B, N) bool, optional ``masks``
  (B, N, H, W) bool with optional ``mask_valid`` (B, N), optional ``is_exhaustive`` (B,) bool.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sam3_jax.nn.boxes import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from sam3_jax.nn.ops import resize_bilinear
from sam3_jax.train import matcher as matching
from sam3_jax.train.losses import sigmoid
from sam3_jax.train.losses.point_sampling import point_sample, sample_points

# Stands in for padded target boxes so that no NaN can reach a gradient through a masked-out pair.
_DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class DetectorLossConfig:
    """Weights and switches; defaults are the reference's SAM 3 fine-tuning configs."""

    # Weight of each term (the keys of the returned dict).
    loss_ce: float = 20.0
    presence_loss: float = 20.0
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    loss_mask: float = 200.0
    loss_dice: float = 10.0
    # SemanticSegCriterion on the image-level ``semantic_seg`` logits; the released configs leave it
    # commented out (there: 20 and 30), so 0 = off.
    loss_semantic_seg: float = 0.0
    loss_semantic_dice: float = 0.0
    # IABCEMdetr.
    pos_weight: float = 10.0
    alpha: float = 0.25  # soft target p^alpha * IoU^(1 - alpha)
    gamma: float = 2.0  # negatives weighted by p^gamma
    use_presence: bool = True
    presence_alpha: float = 0.5
    presence_gamma: float = 0.0
    weak_loss: bool = False  # drop the negatives of non-exhaustively annotated queries
    pad_n_queries: int | None = 200  # the CE mean counts at least this many queries per image
    # Masks.
    mask_alpha: float = 0.25
    mask_gamma: float = 2.0
    masks_on_aux: bool = False
    num_sample_points: int | None = None  # None: upsample to the target resolution
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    mask_chunk: int | None = None  # target slots upsampled at a time (bounds memory); None: all
    # SemanticSegCriterion as the commented-out config builds it (presence_head=True, downsample=False).
    semantic_focal: bool = True  # focal, else plain BCE
    semantic_alpha: float = 0.6
    semantic_gamma: float = 2.0
    # Sam3LossWrapper.
    o2m_weight: float = 2.0
    use_o2m_matcher_on_o2m_aux: bool = False
    scale_by_find_batch_size: bool = True
    matcher: matching.HungarianMatcherConfig = dataclasses.field(default_factory=matching.HungarianMatcherConfig)
    o2m_matcher: matching.OneToManyMatcherConfig = dataclasses.field(
        default_factory=matching.OneToManyMatcherConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DetectorLossConfig:
        """From a plain (e.g. ml_collections) dict; unknown keys raise ``TypeError``."""
        d = dict(d)
        if isinstance(d.get("matcher"), Mapping):
            d["matcher"] = matching.HungarianMatcherConfig(**d["matcher"])
        if isinstance(d.get("o2m_matcher"), Mapping):
            d["o2m_matcher"] = matching.OneToManyMatcherConfig(**d["o2m_matcher"])
        return cls(**d)

    def weight(self, term: str) -> float:
        return getattr(self, term)


def _safe_boxes(boxes, valid):
    return jnp.where(valid[..., None], boxes, jnp.asarray(_DUMMY_BOX, boxes.dtype))


def classification_loss(logits, boxes_xyxy, match, tgt_xyxy, keep, query_valid, exhaustive,
                        config: DetectorLossConfig, presence_logits=None, global_sum=_identity):
    """``IABCEMdetr``: IoU-aware BCE over all queries, and the presence loss.

    logits (B, Q, 1); boxes_xyxy (B, Q, 4); match (B, Q, N); tgt_xyxy (B, N, 4) (padding made
    safe); keep (B,) 1.0 where the query has a visible target; query_valid, exhaustive (B,) bool;
    presence_logits (B, 1) or None. Matched queries are pushed towards
    max(p^alpha IoU^(1-alpha), 0.01) with weight ``pos_weight``; the others towards 0 with weight
    p^gamma. Queries without a visible target get no such loss (presence gating) but train the
    presence logit towards 0. Means divide by counts summed with ``global_sum``.
    """
    x = logits[..., 0].astype(jnp.float32)
    prob = jax.nn.sigmoid(x)
    matched = match.any(-1)
    n = match.shape[-1]
    # A query matching several targets (o2m) is scored against the last one, as the reference's
    # index_put with repeated indices does on CPU.
    last = n - 1 - jnp.argmax(match[..., ::-1], axis=-1)
    with_box = jnp.take_along_axis(tgt_xyxy, last[..., None], axis=1)
    iou = box_iou(jax.lax.stop_gradient(boxes_xyxy).astype(jnp.float32), with_box)
    soft = jnp.maximum(prob ** config.alpha * jnp.where(matched, iou, 0.0) ** (1 - config.alpha), 0.01)
    target = jax.lax.stop_gradient(jnp.where(matched, soft, 0.0))
    is_pos = matched.astype(jnp.float32)
    loss = (sigmoid.bce(x, target) * is_pos * config.pos_weight
            + sigmoid.bce(x, 0.0) * (1.0 - is_pos) * sigmoid.power(prob, config.gamma))
    if config.use_presence:
        loss = loss * keep[:, None]
    counted = jnp.broadcast_to(query_valid[:, None], loss.shape)
    num_queries = jnp.maximum(global_sum(query_valid.sum()), 1).astype(jnp.float32)
    if config.weak_loss:
        counted = counted & (exhaustive[:, None] | matched)
        loss_ce = (loss * counted).sum() / (global_sum(counted.sum()) + 1e-6)
    else:
        per_image = max(loss.shape[1], config.pad_n_queries or 0)
        loss_ce = (loss * counted).sum() / (num_queries * per_image)
    out = {"loss_ce": loss_ce}
    if config.use_presence and presence_logits is not None:
        presence = sigmoid.focal(presence_logits.reshape(keep.shape), keep, config.presence_alpha,
                                 config.presence_gamma)
        out["presence_loss"] = (presence * query_valid).sum() / num_queries
    return out


def box_loss(boxes, boxes_xyxy, match, tgt_boxes, tgt_xyxy, num_boxes):
    """``Boxes``: L1 on cxcywh and 1 - GIoU on xyxy, summed over matched pairs / ``num_boxes``."""
    boxes, boxes_xyxy = boxes.astype(jnp.float32), boxes_xyxy.astype(jnp.float32)
    l1 = jnp.abs(boxes[:, :, None, :] - tgt_boxes[:, None, :, :]).sum(-1)
    giou = generalized_box_iou(boxes_xyxy[:, :, None, :], tgt_xyxy[:, None, :, :])
    return {"loss_bbox": jnp.where(match, l1, 0.0).sum() / num_boxes,
            "loss_giou": jnp.where(match, 1.0 - giou, 0.0).sum() / num_boxes}


def _mask_terms(pred, tgt, alpha: float, gamma: float):
    """Focal (mean) and dice over the last axis."""
    return sigmoid.focal(pred, tgt, alpha, gamma).mean(-1), sigmoid.dice(pred, tgt)


def _upsampled_mask_terms(pred, tgt_masks, alpha: float, gamma: float, chunk: int | None):
    """``_mask_terms`` of pred (B, N, K, h, w) bilinearly upsampled to tgt_masks (B, N, H, W).

    GT-resolution logits are the largest tensors of the whole loss; with ``chunk``, target slots
    go ``chunk`` at a time through a rematerialised loop, so only one chunk's worth of them is
    ever live (forward or backward).
    """
    hg, wg = tgt_masks.shape[2:]

    def terms(pred, tgt):
        lead, (h, w) = pred.shape[:-2], pred.shape[-2:]
        up = resize_bilinear(pred.reshape(-1, h, w, 1), (hg, wg)).reshape(*lead, hg * wg)
        return _mask_terms(up, tgt.reshape(*tgt.shape[:-2], 1, hg * wg).astype(jnp.float32), alpha, gamma)

    if chunk is None:
        return terms(pred, tgt_masks)
    per_slot = jax.checkpoint(lambda xs: terms(*xs))
    focal, dice = jax.lax.map(per_slot, (jnp.swapaxes(pred, 0, 1), jnp.swapaxes(tgt_masks, 0, 1)),
                              batch_size=chunk)
    return jnp.swapaxes(focal, 0, 1), jnp.swapaxes(dice, 0, 1)


def mask_loss(pred_masks, match, tgt_masks, mask_valid, num_boxes, max_per_target: int,
              config: DetectorLossConfig, rng=None):
    """``Masks``: focal (mean over pixels) + dice per matched pair, summed / ``num_boxes``.

    pred_masks (B, Q, h, w) logits; tgt_masks (B, N, H, W); each target takes at most
    ``max_per_target`` matched queries (1 for o2o, top-k for o2m). Predictions are bilinearly
    upsampled to H x W, or, with ``num_sample_points``, both sides are sampled at uncertain points.
    """
    b, _, h, w = pred_masks.shape
    n, hg, wg = tgt_masks.shape[1:]
    k = max_per_target
    hits, idx = jax.lax.top_k(jnp.swapaxes(match, 1, 2).astype(jnp.int32), k)  # (B, N, K), matched first
    pair_ok = (hits > 0) & mask_valid[..., None]
    pred = jnp.take_along_axis(pred_masks, idx.reshape(b, n * k, 1, 1), axis=1).astype(jnp.float32)
    if config.num_sample_points is None:
        focal, dice = _upsampled_mask_terms(pred.reshape(b, n, k, h, w), tgt_masks, config.mask_alpha,
                                            config.mask_gamma, config.mask_chunk)
    else:
        if rng is None:
            raise ValueError("point-sampled mask losses need an rng")
        p = config.num_sample_points
        pred = pred.reshape(b * n * k, h, w)
        coords = sample_points(rng, pred, p, config.oversample_ratio, config.importance_sample_ratio)
        tgt = point_sample(tgt_masks.reshape(b * n, hg, wg).astype(jnp.float32), coords.reshape(b * n, k * p, 2))
        focal, dice = _mask_terms(point_sample(pred, coords).reshape(b, n, k, p), tgt.reshape(b, n, k, p),
                                  config.mask_alpha, config.mask_gamma)
    return {"loss_mask": jnp.where(pair_ok, focal, 0.0).sum() / num_boxes,
            "loss_dice": jnp.where(pair_ok, dice, 0.0).sum() / num_boxes}


def semantic_loss(semantic_seg, tgt_masks, usable, config: DetectorLossConfig, global_sum=_identity):
    """``SemanticSegCriterion`` (presence_head=True, presence_loss=False, downsample=False).

    semantic_seg (B, h, w, 1) logits, bilinearly upsampled to tgt_masks (B, N, H, W), against the
    union of each query's masks; focal or BCE (mean over pixels) and dice, averaged over the queries
    whose union is not empty (the others add nothing). ``usable`` (B, N): the targets that make up
    the union; a query with a valid target whose mask is unknown should be left out by the caller.
    """
    b, hg, wg = tgt_masks.shape[0], *tgt_masks.shape[2:]
    union = (tgt_masks.astype(bool) & usable[..., None, None]).any(1).reshape(b, hg * wg).astype(jnp.float32)
    logits = resize_bilinear(semantic_seg.astype(jnp.float32), (hg, wg)).reshape(b, hg * wg)
    if config.semantic_focal:
        seg, dice = _mask_terms(logits, union, config.semantic_alpha, config.semantic_gamma)
    else:
        seg, dice = sigmoid.bce(logits, union).mean(-1), sigmoid.dice(logits, union)
    present = union.any(-1)
    count = global_sum(present.sum()).astype(jnp.float32) + 1e-6
    return {"loss_semantic_seg": jnp.where(present, seg, 0.0).sum() / count,
            "loss_semantic_dice": jnp.where(present, dice, 0.0).sum() / count}


def _o2m_view(out: Mapping[str, Any]) -> dict:
    return {key[:-len("_o2m")]: value for key, value in out.items() if key.endswith("_o2m")}


def _hungarian_matches(problems, tgt_boxes, valid, config):
    """Hungarian matches (B, Q, N) for each (logits, boxes) in ``problems``; problems of equal shape
    share one vmapped solve, so their augmenting-path loops run side by side."""
    n = tgt_boxes.shape[1]
    match = functools.partial(matching.hungarian_match, config=config)
    solve = jax.vmap(jax.vmap(match), in_axes=(0, 0, None, None))
    by_shape: dict[tuple, list[int]] = {}
    for i, (logits, _) in enumerate(problems):
        by_shape.setdefault(logits.shape, []).append(i)
    result = [None] * len(problems)
    for members in by_shape.values():
        logits = jnp.stack([problems[i][0] for i in members])
        boxes = jnp.stack([problems[i][1] for i in members])
        tgt_of_pred = solve(logits, boxes, tgt_boxes, valid)
        for j, i in enumerate(members):
            result[i] = tgt_of_pred[j][..., None] == jnp.arange(n)
    return result


def detector_loss(outputs: Mapping[str, Any], targets: Mapping[str, Any],
                  config: DetectorLossConfig = DetectorLossConfig(), *, num_boxes=None, query_valid=None,
                  rng=None, global_sum=_identity):
    """``Sam3LossWrapper`` on the final and every aux decoder layer, o2o and o2m queries.

    o2o queries are matched by the Hungarian matcher in every layer; o2m queries by the one-to-many
    matcher in the final layer and by the Hungarian matcher in aux layers (unless
    ``use_o2m_matcher_on_o2m_aux``), and their terms are scaled by ``o2m_weight``. Masks only on
    the final layer (unless ``masks_on_aux``) and only when ``pred_masks`` and ``targets["masks"]``
    exist. ``num_boxes``: what box and mask terms are divided by (clamped >= 1); the default is the
    count of valid targets (summed with ``global_sum``). ``query_valid``
    (B,) marks real queries (default all): padding queries add no loss and are not counted.
    ``rng`` is needed only for point-sampled mask losses. ``global_sum`` sums a count over every
    shard of a data-parallel batch (e.g. a ``psum``): each normaliser (valid targets, real queries)
    is then global, so the shards' results add up to the loss of the whole batch.

    Returns (total, terms): terms named as the reference logs them (``loss_ce``,
    ``loss_giou_aux_2``, ``loss_bbox_o2m``, ``loss_ce_aux_0_o2m``...), unweighted except that o2m
    terms include ``o2m_weight``; total = sum(weight * term), times sqrt(#queries) with
    ``scale_by_find_batch_size``.
    """
    tgt_boxes = targets["boxes"].astype(jnp.float32)
    b = tgt_boxes.shape[0]
    query_valid = jnp.ones((b,), bool) if query_valid is None else query_valid.astype(bool)
    valid = targets["valid"].astype(bool) & query_valid[:, None]
    exhaustive = targets.get("is_exhaustive")
    exhaustive = jnp.ones((b,), bool) if exhaustive is None else exhaustive.astype(bool)
    visible = valid & (tgt_boxes[..., 2] > 0) & (tgt_boxes[..., 3] > 0)
    keep = visible.any(-1).astype(jnp.float32)
    safe_boxes = _safe_boxes(tgt_boxes, valid)
    safe_xyxy = box_cxcywh_to_xyxy(safe_boxes)
    if num_boxes is None:
        num_boxes = global_sum(valid.sum())
    num_boxes = jnp.maximum(jnp.asarray(num_boxes, jnp.float32), 1.0)
    masks = targets.get("masks")
    mask_valid = valid if targets.get("mask_valid") is None else targets["mask_valid"].astype(bool) & valid

    # (suffix, outputs, is_aux, is_o2m) for every set of predictions that is supervised.
    layers = [("", outputs, False)] + [(f"_aux_{i}", aux, True)
                                       for i, aux in enumerate(outputs.get("aux_outputs", ()))]
    groups = []
    for suffix, out, is_aux in layers:
        groups.append((suffix, out, is_aux, False))
        if "pred_logits_o2m" in out:
            groups.append((suffix + "_o2m", _o2m_view(out), is_aux, True))

    def uses_hungarian(group):
        _, _, is_aux, is_o2m = group
        return not is_o2m or (is_aux and not config.use_o2m_matcher_on_o2m_aux)

    hungarian = [g for g in groups if uses_hungarian(g)]
    solved = _hungarian_matches([(g[1]["pred_logits"], g[1]["pred_boxes"]) for g in hungarian],
                                safe_boxes, valid, config.matcher)
    matches = dict(zip([g[0] for g in hungarian], solved))
    o2m_match = jax.vmap(functools.partial(matching.one_to_many_match, config=config.o2m_matcher))

    terms, total = {}, jnp.zeros((), jnp.float32)
    for group in groups:
        suffix, out, is_aux, is_o2m = group
        if uses_hungarian(group):
            match, per_target = matches[suffix], 1
        else:
            match = o2m_match(out["pred_logits"], out["pred_boxes"], safe_boxes, valid)
            per_target = config.o2m_matcher.topk
        boxes_xyxy = out.get("pred_boxes_xyxy")
        if boxes_xyxy is None:
            boxes_xyxy = box_cxcywh_to_xyxy(out["pred_boxes"])
        got = classification_loss(out["pred_logits"], boxes_xyxy, match, safe_xyxy, keep, query_valid,
                                  exhaustive, config, out.get("presence_logit_dec"), global_sum)
        got.update(box_loss(out["pred_boxes"], boxes_xyxy, match, safe_boxes, safe_xyxy, num_boxes))
        if "pred_masks" in out and masks is not None and (config.masks_on_aux or not is_aux):
            mask_rng = None if rng is None else jax.random.fold_in(rng, len(terms))
            got.update(mask_loss(out["pred_masks"], match, masks, mask_valid, num_boxes, per_target, config,
                                 mask_rng))
        scale = config.o2m_weight if is_o2m else 1.0
        for name, value in got.items():
            terms[name + suffix] = value * scale
            if config.weight(name) != 0:
                total = total + config.weight(name) * scale * value
    if (config.loss_semantic_seg or config.loss_semantic_dice) and "semantic_seg" in outputs and masks is not None:
        # Final layer only (the criterion has no aux outputs and the o2m queries no semantic map).
        # Queries whose targets' masks are not all known leave the union undefined: left out.
        complete = ~(valid & ~mask_valid).any(-1, keepdims=True)
        got = semantic_loss(outputs["semantic_seg"], masks, mask_valid & complete, config, global_sum)
        terms.update(got)
        total = total + sum(config.weight(name) * value for name, value in got.items())
    if config.scale_by_find_batch_size:
        total = total * jnp.sqrt(global_sum(query_valid.sum()).astype(jnp.float32))
    return total, terms
