"""Box conversions and (generalised) IoU, as ``sam3/model/box_ops.py``.

The IoU functions broadcast: ``box_iou(a, b)`` of two (..., 4) arrays compares box with box
(the reference's ``fast_diag_*``); pass ``a[..., :, None, :]`` and ``b[..., None, :, :]`` for the
pairwise (..., N, M) matrix (the reference's ``box_iou`` / ``generalized_box_iou``). Both reference
variants do the same arithmetic, so one function serves both.
"""
from __future__ import annotations

import jax.numpy as jnp


def box_cxcywh_to_xyxy(boxes):
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes):
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes_xyxy):
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def _overlap_area(lo, hi):
    wh = jnp.maximum(hi - lo, 0.0)
    return wh[..., 0] * wh[..., 1]


def box_iou_union(a, b):
    """IoU and union area of xyxy boxes ``a`` and ``b`` (broadcasting)."""
    inter = _overlap_area(jnp.maximum(a[..., :2], b[..., :2]), jnp.minimum(a[..., 2:], b[..., 2:]))
    union = box_area(a) + box_area(b) - inter
    return inter / union, union


def box_iou(a, b):
    return box_iou_union(a, b)[0]


def generalized_box_iou(a, b):
    """GIoU = IoU - (enclosing area - union) / enclosing area, xyxy boxes (broadcasting)."""
    iou, union = box_iou_union(a, b)
    enclosing = _overlap_area(jnp.minimum(a[..., :2], b[..., :2]), jnp.maximum(a[..., 2:], b[..., 2:]))
    return iou - (enclosing - union) / enclosing
