"""PointRend-style point sampling for the mask loss (``mask_sampling.py``).

Instead of upsampling every matched mask to the ground-truth resolution, the loss is taken at
``num_points`` points per mask: the most uncertain (|logit| smallest) of ``oversample_ratio`` times
as many random candidates, topped up with fresh random points. Coordinates are (x, y) in [0, 1].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sam3_jax.nn import ops


def point_sample(maps, coords):
    """Bilinear values of ``maps`` (M, H, W) at ``coords`` (M, P, 2) -> (M, P).

    ``F.grid_sample(align_corners=False, padding_mode="zeros")`` after mapping [0, 1] to [-1, 1].
    """
    return ops.grid_sample(maps[..., None], coords * 2.0 - 1.0)[..., 0]


def uncertain_point_coords(logits, candidates, num_uncertain: int, extra):
    """The ``num_uncertain`` of ``candidates`` (M, C, 2) where ``logits`` (M, H, W) are closest to 0,
    followed by the random points ``extra`` (M, R, 2)."""
    uncertainty = -jnp.abs(point_sample(logits, candidates))
    idx = jax.lax.top_k(uncertainty, num_uncertain)[1]
    picked = jnp.take_along_axis(candidates, idx[..., None], axis=1)
    return jnp.concatenate([picked, extra], axis=1)


def sample_points(rng, logits, num_points: int, oversample_ratio: float, importance_sample_ratio: float):
    """(M, num_points, 2) coordinates for ``logits`` (M, H, W); no gradient flows into them."""
    m = logits.shape[0]
    num_uncertain = int(importance_sample_ratio * num_points)
    k_candidates, k_extra = jax.random.split(rng)
    candidates = jax.random.uniform(k_candidates, (m, int(num_points * oversample_ratio), 2))
    extra = jax.random.uniform(k_extra, (m, num_points - num_uncertain, 2))
    return uncertain_point_coords(jax.lax.stop_gradient(logits).astype(jnp.float32), candidates, num_uncertain,
                                  extra)
