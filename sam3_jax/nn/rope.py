"""2-D axial rotary position embedding, as the reference's ``compute_axial_cis`` + ``apply_rotary_enc``.

The reference stores complex ``freqs_cis``; we keep real angles and rotate adjacent channel pairs
(2m, 2m+1) in float32. The first half of the pairs rotate by the x coordinate, the second by y;
tokens are row-major (t = y * end_x + x); coordinates are scaled by ``scale`` (1/3 for the ViT's
global blocks: "interpolated RoPE").
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def axial_angles(dim: int, end_x: int, end_y: int, theta: float = 10000.0, scale: float = 1.0) -> np.ndarray:
    """Rotation angles (end_x * end_y, dim // 2), float32, computed like the reference in float32."""
    freqs = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 4, dtype=np.float32)[: dim // 4] / np.float32(dim))))
    freqs = freqs.astype(np.float32)
    t = np.arange(end_x * end_y, dtype=np.float32)
    tx = (t % end_x).astype(np.float32) * np.float32(scale)
    ty = np.floor(t / end_x).astype(np.float32) * np.float32(scale)
    return np.concatenate([np.outer(tx, freqs), np.outer(ty, freqs)], axis=-1).astype(np.float32)


def axial_cis(dim: int, end_x: int, end_y: int, theta: float = 10000.0, scale: float = 1.0) -> np.ndarray:
    """The reference's complex64 ``freqs_cis`` table (used to check checkpoint buffers)."""
    return np.exp(1j * axial_angles(dim, end_x, end_y, theta, scale).astype(np.float64)).astype(np.complex64)


def apply_rope(x, angles, repeat: int = 1):
    """Rotate x (..., N * repeat, D) by angles (N, D // 2); ``repeat`` tiles the table along N
    (the tracker's memory keys: one table per memory frame)."""
    if repeat > 1:
        angles = jnp.tile(angles, (repeat, 1))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
