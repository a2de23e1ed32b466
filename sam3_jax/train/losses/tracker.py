"""Tracker losses: SAM 2's multi-step, multi-mask recipe for one prediction step.

The reference is ``MultiStepMultiMasksAndIous._update_losses`` in SAM 2's ``training/loss_fns.py``
(kept, commented out, in ``sam3/train/loss/loss_fns.py``), built on ``sigmoid_focal_loss``,
``dice_loss`` and ``iou_loss`` with ``loss_on_multimask=True``. For one step and each object:

* every candidate mask gets a focal loss (mean over its pixels), a dice loss (over the flattened
  mask) and an IoU-prediction loss: L1 (or squared) error between the predicted IoU and the IoU of
  the binarised mask (logit > 0) with the GT, the union clamped to at least 1;
* with more than one candidate, the focal and dice terms are those of the candidate with the lowest
  ``weight_mask * focal + weight_dice * dice``; the IoU term is the *mean* over the candidates
  (``supervise_all_iou``) or that of the selected one;
* the three mask terms are multiplied by ``target_obj`` (the GT mask is not empty);
* the class term is a focal loss (alpha -1, gamma 0: plain BCE) of the object-score logit against
  ``target_obj``.

The reference divides every per-object value by ``num_objects`` and sums over objects and steps;
``step_losses`` returns the values before that division, so ``terms[k].sum() / num_objects``
summed over steps gives the reference's ``losses["loss_k"]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sam3_jax.train.losses import sigmoid

TERMS = ("mask", "dice", "iou", "class")


@dataclass(frozen=True)
class TrackerLossConfig:
    """Weights and switches of ``MultiStepMultiMasksAndIous`` (SAM 2.1 / SAM 3 tracker training)."""
    weight_mask: float = 20.0  # focal
    weight_dice: float = 1.0
    weight_iou: float = 1.0
    weight_class: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    class_focal_alpha: float = -1.0  # object-score loss: focal with alpha -1, gamma 0 == plain BCE
    class_focal_gamma: float = 0.0
    supervise_all_iou: bool = True
    iou_use_l1_loss: bool = True

    def weight(self, term: str) -> float:
        return {"mask": self.weight_mask, "dice": self.weight_dice, "iou": self.weight_iou,
                "class": self.weight_class}[term]


def step_losses(mask_logits, iou_pred, object_score_logits, gt_masks, candidates,
                cfg: TrackerLossConfig = TrackerLossConfig()) -> dict[str, jax.Array]:
    """Losses of one prediction step (one frame, one click step) for B objects, per object.

    mask_logits (B, K, H, W): the decoder's K mask logits at GT resolution (token 0 the single-mask
      output, tokens 1..3 the multimask outputs); iou_pred (B, K); object_score_logits (B, 1) or (B,);
    gt_masks (B, H, W) bool; candidates (B, K) bool: the masks this step's prediction is made of
      (1..3 on multimask steps, 0 on single-mask steps).

    Returns {"mask", "dice", "iou", "class"}, each (B,) float32: unweighted and not yet divided by
    the number of objects; mask/dice/iou already multiplied by target_obj (GT non-empty). An object
    with no candidate at all gets 0 for mask/dice/iou (its class term is still computed).
    """
    b, k = mask_logits.shape[:2]
    logits = mask_logits.astype(jnp.float32).reshape(b, k, -1)
    gt = gt_masks.reshape(b, 1, -1)
    target = gt.astype(jnp.float32)
    candidates = candidates.astype(bool)

    focal_k = sigmoid.focal(logits, target, cfg.focal_alpha, cfg.focal_gamma).mean(-1)  # (B, K)
    dice_k = sigmoid.dice(logits, target)  # (B, K)
    pred_bin = logits > 0
    inter = (pred_bin & gt).sum(-1).astype(jnp.float32)
    union = (pred_bin | gt).sum(-1).astype(jnp.float32)
    actual_iou = inter / jnp.maximum(union, 1.0)
    err = iou_pred.astype(jnp.float32) - actual_iou
    iou_k = jnp.abs(err) if cfg.iou_use_l1_loss else err * err

    # The lowest weighted focal + dice among the candidates (a single candidate selects itself).
    combo = cfg.weight_mask * focal_k + cfg.weight_dice * dice_k
    combo = jnp.where(candidates, jax.lax.stop_gradient(combo), jnp.inf)
    best = jnp.argmin(combo, axis=-1)[:, None]
    pick = lambda x: jnp.take_along_axis(x, best, axis=-1)[:, 0]
    count = candidates.sum(-1)
    if cfg.supervise_all_iou:
        iou = jnp.where(candidates, iou_k, 0.0).sum(-1) / jnp.maximum(count, 1)
    else:
        iou = pick(iou_k)

    target_obj = gt.any(-1)[:, 0]
    keep = (target_obj & (count > 0)).astype(jnp.float32)
    obj_logit = object_score_logits.astype(jnp.float32).reshape(b, -1)
    cls = sigmoid.focal(obj_logit, target_obj[:, None].astype(jnp.float32), cfg.class_focal_alpha,
                        cfg.class_focal_gamma).mean(-1)
    return {"mask": pick(focal_k) * keep, "dice": pick(dice_k) * keep, "iou": iou * keep, "class": cls}


def weighted_total(terms: dict, cfg: TrackerLossConfig = TrackerLossConfig()) -> jax.Array:
    """sum_k weight_k * terms[k] over the terms present ("mask", "dice", "iou", "class"); the terms
    may have any (broadcastable) shapes, the result has theirs. Unknown keys are an error."""
    unknown = set(terms) - set(TERMS)
    if unknown:
        raise KeyError(f"unknown tracker loss terms {sorted(unknown)}; expected a subset of {TERMS}")
    return sum(cfg.weight(name) * jnp.asarray(terms[name], jnp.float32) for name in TERMS if name in terms)
