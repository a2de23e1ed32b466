"""Losses on sigmoid logits, element by element (``loss_fns.sigmoid_focal_loss``, ``dice_loss``).

They return unreduced values so each caller picks its own reduction and normalisation; everything
is computed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def power(x, exponent: float):
    """``x ** exponent``; integral exponents use ``integer_pow``, whose gradient is finite at 0."""
    return x ** int(exponent) if float(exponent).is_integer() else x ** exponent


def bce(logits, targets):
    """``F.binary_cross_entropy_with_logits(reduction="none")``: (1 - t) x - log sigmoid(x)."""
    logits = logits.astype(jnp.float32)
    return (1.0 - targets) * logits - jax.nn.log_sigmoid(logits)


def focal(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """RetinaNet's focal loss: alpha_t (1 - p_t)^gamma BCE; ``alpha < 0`` disables the weighting."""
    prob = jax.nn.sigmoid(logits.astype(jnp.float32))
    p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
    loss = bce(logits, targets) * power(1.0 - p_t, gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
    return loss


def dice(logits, targets, axis=-1):
    """1 - (2 sum(p t) + 1) / (sum p + sum t + 1) over ``axis``, with p = sigmoid(logits)."""
    prob = jax.nn.sigmoid(logits.astype(jnp.float32))
    num = 2.0 * (prob * targets).sum(axis)
    den = prob.sum(axis) + targets.sum(axis)
    return 1.0 - (num + 1.0) / (den + 1.0)
