"""Matchers between predicted queries and padded ground-truth targets, on device
(docs/reference_model.md, 'Detector training').

* ``linear_sum_assignment``: an exact Hungarian solver (shortest augmenting paths with dual
  potentials, the Jonker-Volgenant / Kuhn-Munkres O(n^2 m) scheme) as ``lax`` loops over static
  shapes, so matching stays inside the jitted step instead of the reference's per-image scipy call
  on the host. Each target row adds one augmenting path; each step of a path is one vectorised
  pass over the prediction columns.
* ``hungarian_match``: ``BinaryHungarianMatcherV2`` (focal class cost, L1 and GIoU box costs).
* ``one_to_many_match``: ``BinaryOneToManyMatcher`` (DAC-DETR's top-k rule for the o2m queries).

Everything works on one query (Q predictions, N target slots with a validity mask); ``jax.vmap``
adds batch (and layer) axes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax.nn.boxes import box_cxcywh_to_xyxy, box_iou, generalized_box_iou


def _finite(cost):
    """Non-finite costs (from NaN predictions) become a cost above every finite one, so the solver
    still ends with a valid assignment."""
    ok = jnp.isfinite(cost)
    top = jnp.max(jnp.where(ok, jnp.abs(cost), 0.0))
    return jnp.where(ok, cost, 2.0 * top + 1.0)


def linear_sum_assignment(cost, row_valid=None):
    """Minimum-cost assignment of every valid row of ``cost`` (N, M), N <= M, to a distinct column.

    Returns ``col_of_row`` (N,) int32, -1 for invalid rows. Invalid rows take no part, so the result
    is optimal for the sub-matrix of valid rows (as scipy's on that sub-matrix; ties may resolve to
    a different optimum). Runs in float32 at least.
    """
    n, m = cost.shape
    if n > m:
        raise ValueError(f"need rows <= columns, got a {n}x{m} cost matrix")
    if row_valid is None:
        row_valid = jnp.ones((n,), bool)
    dtype = jnp.promote_types(cost.dtype, jnp.float32)
    # Index 0 of rows and columns is a sentinel: column 0 is where each new row's path starts and
    # ``owner[j] == 0`` means column j is free; real rows and columns are 1-based.
    a = jnp.pad(_finite(cost.astype(dtype)), ((1, 0), (1, 0)))
    rows = jnp.argsort(~row_valid, stable=True) + 1  # valid rows first
    inf = jnp.asarray(jnp.inf, dtype)

    def full(shape, value, dtype):
        """Loop carries made like ``a``: inside ``shard_map`` they vary over the same mesh axes as
        what the loop bodies compute from it (a fresh constant would not, and lax loops insist)."""
        return jnp.full_like(a, value, shape=shape, dtype=dtype)

    def add_row(k, state):
        u, v, owner = state
        owner = owner.at[0].set(rows[k])

        def grow(s):  # extend the shortest-path tree by the nearest unvisited column
            j0, used, minv, way, u, v, steps = s
            used = used.at[j0].set(True)
            i0 = owner[j0]
            reduced = a[i0] - u[i0] - v
            closer = ~used & (reduced < minv)
            minv = jnp.where(closer, reduced, minv)
            way = jnp.where(closer, j0, way)
            frontier = jnp.where(used, inf, minv)
            j1 = jnp.argmin(frontier)
            delta = frontier[j1]
            # Visited columns own distinct rows (column 0 holds the new row); others add nothing.
            u = u.at[owner].add(jnp.where(used, delta, 0.0))
            v = jnp.where(used, v - delta, v)
            minv = jnp.where(used, minv, minv - delta)
            return j1, used, minv, way, u, v, steps + 1

        start = (full((), 0, jnp.int32), full(m + 1, False, bool), full(m + 1, inf, dtype),
                 full(m + 1, 0, jnp.int32), u, v, full((), 0, jnp.int32))
        j0, _, _, way, u, v, _ = jax.lax.while_loop(
            lambda s: (owner[s[0]] != 0) & (s[-1] <= m), grow, start)

        def flip(s):  # hand every column on the path to the row before it
            j0, owner, steps = s
            j1 = way[j0]
            return j1, owner.at[j0].set(owner[j1]), steps + 1

        _, owner, _ = jax.lax.while_loop(lambda s: (s[0] != 0) & (s[2] <= m), flip,
                                         (j0, owner, full((), 0, jnp.int32)))
        return u, v, owner

    init = (full(n + 1, 0, dtype), full(m + 1, 0, dtype), full(m + 1, 0, jnp.int32))
    _, _, owner = jax.lax.fori_loop(0, row_valid.sum(), add_row, init)
    col_of_row = jnp.full(n + 1, -1, jnp.int32).at[owner[1:]].set(jnp.arange(m, dtype=jnp.int32))
    return jnp.where(row_valid, col_of_row[1:], -1)


@dataclasses.dataclass(frozen=True)
class HungarianMatcherConfig:
    """``BinaryHungarianMatcherV2`` as ``model_builder`` builds it (focal, not ``stable``)."""

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0


@dataclasses.dataclass(frozen=True)
class OneToManyMatcherConfig:
    """``BinaryOneToManyMatcher`` as the SAM 3 training configs set it."""

    alpha: float = 0.3
    threshold: float = 0.4
    topk: int = 4


def hungarian_cost(logits, boxes, tgt_boxes, config: HungarianMatcherConfig = HungarianMatcherConfig()):
    """The o2o matching cost (Q, N): ``cost_bbox * L1 + cost_class * focal + cost_giou * -GIoU``.

    logits (Q,) or (Q, 1); boxes (Q, 4) and tgt_boxes (N, 4) cxcywh. The class cost is per query
    (broadcast over targets): -alpha (1-p)^gamma log p + (1-alpha) p^gamma log(1-p).
    """
    logits = logits.reshape(boxes.shape[0]).astype(jnp.float32)
    boxes, tgt_boxes = boxes.astype(jnp.float32), tgt_boxes.astype(jnp.float32)
    prob = jax.nn.sigmoid(logits)
    cost_class = (-config.alpha * (1 - prob) ** config.gamma * jax.nn.log_sigmoid(logits)
                  + (1 - config.alpha) * prob ** config.gamma * jax.nn.log_sigmoid(-logits))
    cost_bbox = jnp.abs(boxes[:, None, :] - tgt_boxes[None, :, :]).sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes)[:, None, :], box_cxcywh_to_xyxy(tgt_boxes)[None, :, :])
    return config.cost_bbox * cost_bbox + config.cost_class * cost_class[:, None] - config.cost_giou * giou


def assign(cost, tgt_valid):
    """Hungarian assignment for a (Q, N) cost with Q >= N: ``tgt_of_pred`` (Q,) int32, -1 when unmatched."""
    q, n = cost.shape
    pred_of_tgt = linear_sum_assignment(cost.T, tgt_valid)
    return jnp.full(q + 1, -1, jnp.int32).at[jnp.where(pred_of_tgt < 0, q, pred_of_tgt)].set(
        jnp.arange(n, dtype=jnp.int32))[:q]


def hungarian_match(logits, boxes, tgt_boxes, tgt_valid, config: HungarianMatcherConfig = HungarianMatcherConfig()):
    """One-to-one matching of Q predictions to the valid targets of N slots (Q >= N).

    Returns ``tgt_of_pred`` (Q,) int32: the matched target slot of each prediction, or -1
    (``tgt_of_pred >= 0`` is the match mask). A query with no valid target matches nothing. No
    gradient flows through matching.
    """
    cost = hungarian_cost(*jax.lax.stop_gradient((logits, boxes, tgt_boxes)), config)
    return assign(cost, tgt_valid)


def torch_quantile(x, q: float, axis: int = 0):
    """``torch.quantile(x, q, dim=axis)`` (linear interpolation, float32 rank arithmetic and torch's
    two-sided lerp), so that the strict ``>`` comparison below selects the same entries."""
    n = x.shape[axis]
    s = jnp.sort(x, axis=axis)
    rank = np.float32(q) * np.float32(n - 1)
    lo, hi = int(np.floor(rank)), int(np.ceil(rank))
    w = np.float32(rank - np.float32(lo))
    a, b = jnp.take(s, lo, axis=axis), jnp.take(s, hi, axis=axis)
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (np.float32(1) - w)


def one_to_many_match(logits, boxes, tgt_boxes, tgt_valid, config: OneToManyMatcherConfig = OneToManyMatcherConfig()):
    """DAC-DETR's one-to-many rule: (Q, N) bool, True where query q matches target n.

    Quality C = alpha * sigmoid(logit) + (1 - alpha) * IoU. A pair matches when C is above the
    target's (1 - topk/Q) quantile over queries (so at most ``topk`` queries per target) and above
    ``threshold``. A query may match several targets.
    """
    logits, boxes, tgt_boxes = jax.lax.stop_gradient((logits, boxes, tgt_boxes))
    q = boxes.shape[0]
    prob = jax.nn.sigmoid(logits.reshape(q).astype(jnp.float32))
    iou = box_iou(box_cxcywh_to_xyxy(boxes.astype(jnp.float32))[:, None, :],
                  box_cxcywh_to_xyxy(tgt_boxes.astype(jnp.float32))[None, :, :])
    quality = config.alpha * prob[:, None] + (1 - config.alpha) * iou
    top = quality > torch_quantile(quality, 1 - config.topk / q, axis=0)[None, :]
    return top & (quality > config.threshold) & tgt_valid[None, :]
