"""The memory-selection score (SAM2Long): how much a tracked frame's memory is worth attending to,
``presence`` times the predicted mask IoU (of one object, or averaged over the objects tracked together).
A frame whose score is at most ``mf_threshold`` is never picked (``memory_bank.select_memory``) and is
the first a full bank gives up (``memory_bank.store``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def presence(score_logits):
    """Per object: 2 sigmoid(s) - 1 where the object-score logit s is positive (object present), else 0."""
    return jnp.where(score_logits > 0, 2.0 * jax.nn.sigmoid(score_logits) - 1.0, 0.0)

