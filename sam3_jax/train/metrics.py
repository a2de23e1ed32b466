"""Detection metrics for held-out clips during training: counts on device, rates on the host.

A cheap view of how grounding improves while training, free of score thresholds so that it moves
from the first steps on (the full COCO AP and J&F evaluation is `sam3_jax.eval`). A prediction's
score is its class probability times the query's presence probability, as the image predictor
scores it.

* ``top1_precision``: queries with a positive whose highest-scoring prediction has box IoU >= 0.5
  with one of the query's ground-truth objects;
* ``best_box_iou``: per ground-truth object, the best box IoU of any prediction, averaged;
* ``presence_accuracy``: queries whose presence probability is on the right side of 0.5;
* ``mask_iou``: per ground-truth object, the mask IoU of the prediction whose box overlaps it
  best, averaged.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from sam3_jax.nn.boxes import box_cxcywh_to_xyxy, box_iou
from sam3_jax.nn.ops import resize_bilinear


def query_scores(outputs: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(scores (B, Q): class probability x presence probability, presence probability (B,))."""
    prob = jax.nn.sigmoid(outputs["pred_logits"][..., 0].astype(jnp.float32))
    presence = jax.nn.sigmoid(outputs["presence_logit_dec"][:, 0].astype(jnp.float32))
    return prob * presence[:, None], presence


def detection_counts(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array], query_valid,
                     iou_threshold: float = 0.5) -> dict[str, jax.Array]:
    """Sums over B queries (see ``detector_loss`` for the layouts); add them up across batches."""
    score, presence = query_scores(outputs)
    valid = targets["valid"] & query_valid[:, None]
    iou = box_iou(box_cxcywh_to_xyxy(outputs["pred_boxes"].astype(jnp.float32))[:, :, None],
                  box_cxcywh_to_xyxy(targets["boxes"].astype(jnp.float32))[:, None])  # (B, Q, N)
    iou = jnp.where(valid[:, None, :], iou, 0.0)
    positive = valid.any(-1)
    top = jnp.argmax(score, axis=1)
    top_iou = jnp.take_along_axis(iou, top[:, None, None], axis=1)[:, 0].max(-1)
    counts = {
        "gt": valid.sum(), "gt_best_iou_sum": jnp.where(valid, iou.max(1), 0.0).sum(),
        "positive_queries": positive.sum(), "top1_hits": ((top_iou >= iou_threshold) & positive).sum(),
        "queries": query_valid.sum(), "presence_right": (((presence >= 0.5) == positive) & query_valid).sum(),
    }
    masks = targets.get("masks")
    if masks is not None and "pred_masks" in outputs:
        best = jnp.argmax(iou, axis=1)  # (B, N)
        pred = jnp.take_along_axis(outputs["pred_masks"], best[:, :, None, None], axis=1)  # (B, N, h, w)
        b, n, h, w = pred.shape
        pred = resize_bilinear(pred.reshape(b * n, h, w, 1).astype(jnp.float32), masks.shape[2:]) > 0
        pred, gt = pred.reshape(masks.shape), masks.astype(bool)
        inter = (pred & gt).sum((2, 3))
        union = (pred | gt).sum((2, 3))
        counts["mask_iou_sum"] = jnp.where(valid, inter / jnp.maximum(union, 1), 0.0).sum()
    return counts


def rates(counts: Mapping[str, float]) -> dict[str, float]:
    """Host-side ratios of summed counts (NaN where a denominator is zero)."""
    def ratio(a, b):
        return float(counts[a]) / float(counts[b]) if float(counts[b]) else float("nan")

    out = {"top1_precision": ratio("top1_hits", "positive_queries"), "best_box_iou": ratio("gt_best_iou_sum", "gt"),
           "presence_accuracy": ratio("presence_right", "queries")}
    if "mask_iou_sum" in counts:
        out["mask_iou"] = ratio("mask_iou_sum", "gt")
    return out
