"""Detection metrics for held-out clips during training: counts on device, rates on the host.

A cheap view of how grounding improves while training, free of score thresholds so that it moves
from the first steps on (the full COCO AP and J&F evaluations are `sam3_jax.evaluation`'s). A prediction's
score is its class probability times the query's presence probability, as the image predictor
scores it.

* ``top1_precision``: queries with a positive whose highest-scoring prediction has box IoU >= 0.5
  with one of the query's ground-truth objects;
* ``best_box_iou``: per ground-truth object, the best box IoU of any prediction, averaged;
* ``presence_accuracy``: queries whose presence probability is on the right side of 0.5;
* ``mask_iou``: per ground-truth object, the mask IoU of the prediction whose box overlaps it
  best, averaged.

`top_detections` hands the host each query's best predictions (static shapes) for COCO box and
mask AP (`sam3_jax.evaluation.coco`), which needs every prediction, not counts.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax.data import schema
from sam3_jax.evaluation import coco
from sam3_jax.nn.boxes import box_cxcywh_to_xyxy, box_iou
from sam3_jax.nn.ops import resize_bilinear


def query_scores(outputs: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(scores (B, Q): class probability x presence probability, presence probability (B,))."""
    prob = jax.nn.sigmoid(outputs["pred_logits"][..., 0].astype(jnp.float32))
    presence = jax.nn.sigmoid(outputs["presence_logit_dec"][:, 0].astype(jnp.float32))
    return prob * presence[:, None], presence


RATES = ("top1_precision", "best_box_iou", "presence_accuracy", "mask_iou")  # what `rates` returns
COCO_AP = ("box_ap", "box_ap50", "mask_ap", "mask_ap50")  # what `coco_ap` returns


def _masks_at(pred_masks, size) -> jax.Array:
    """(B, K, h, w) mask logits -> (B, K, M, M) bool: bilinear upsampling to ``size``, then > 0."""
    b, k, h, w = pred_masks.shape
    up = resize_bilinear(pred_masks.reshape(b * k, h, w, 1).astype(jnp.float32), size) > 0
    return up.reshape((b, k) + tuple(size))


def top_detections(outputs: Mapping[str, jax.Array], k: int, mask_size: int) -> dict[str, jax.Array]:
    """Each of the B queries' ``k`` highest-scoring predictions: ``scores`` (B, k), ``boxes`` (B, k, 4)
    normalised xyxy and ``masks`` (B, k, M, M) bool at the ground truth's size."""
    score, _ = query_scores(outputs)
    scores, top = jax.lax.top_k(score, k)
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"].astype(jnp.float32))
    boxes = jnp.take_along_axis(boxes, top[..., None], axis=1)
    masks = jnp.take_along_axis(outputs["pred_masks"], top[:, :, None, None], axis=1)
    return {"scores": scores, "boxes": boxes, "masks": _masks_at(masks, (mask_size, mask_size))}


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
        pred, gt = _masks_at(pred, masks.shape[2:]), masks.astype(bool)
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


def _cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], axis=-1)


def coco_images(detections: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]) -> list[dict]:
    """The COCO images of a batch, on the host: one per exhaustively annotated (clip, frame, phrase)
    query, holding its ground truth (the frame's objects that answer the phrase) and its detections
    (`top_detections`, laid out (B, T, P, k, ...)); boxes xyxy in pixels of the M x M masks. A query
    whose annotation is not exhaustive is left out: its unlisted instances would count as false positives."""
    m = batch["masks"].shape[-2]
    asked = batch["frame_valid"][:, :, None] & batch["phrase_valid"][:, None, :] & batch["query_exhaustive"]
    images = []
    for b, t, p in zip(*np.nonzero(asked)):
        objects = np.flatnonzero(batch["query_positives"][b, t, p] & batch["object_valid"][b, t])
        images.append({"gt_boxes": _cxcywh_to_xyxy(batch["boxes"][b, t, objects]) * m,
                       "gt_masks": schema.unpack_masks(batch["masks"][b, t, objects]),
                       "scores": detections["scores"][b, t, p],
                       "boxes": detections["boxes"][b, t, p] * m, "masks": detections["masks"][b, t, p]})
    return images


def coco_ap(images: list[dict]) -> dict[str, float]:
    """Box and mask AP (IoU 0.50:0.95) and AP50 of `coco_images` by pycocotools, every query one image
    of a single category, so a prediction for a phrase with no instance is a false positive (NaN
    without any ground-truth instance)."""
    if not any(len(im["gt_boxes"]) for im in images):
        return dict.fromkeys(COCO_AP, float("nan"))
    gt_labels = [np.ones(len(im["gt_boxes"]), int) for im in images]
    gt = coco.gt_from_arrays(gt_labels, [im["gt_boxes"] for im in images], [im["gt_masks"] for im in images])
    dets = coco.detections_from_arrays([im["scores"] for im in images], [np.ones(len(im["scores"]), int) for im in images],
                                       [im["boxes"] for im in images], [im["masks"] for im in images])
    box, mask = coco.evaluate(gt, dets, "bbox"), coco.evaluate(gt, dets, "segm")
    return {"box_ap": box["AP"], "box_ap50": box["AP50"], "mask_ap": mask["AP"], "mask_ap50": mask["AP50"]}
