"""Fixed position encodings: DETR-style sine maps, their per-coordinate form, and SAM's 1-D sine PE.

All follow the reference's interleave: for frequencies dim_t[i] = T^(2*floor(i/2)/F), channel i is
sin(pos / dim_t[i]) for even i and cos for odd i. Outputs are float32 and channels-last.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def _dim_t(num_feats: int, temperature: float = 10000.0):
    i = np.arange(num_feats, dtype=np.float32)
    return (np.float32(temperature) ** (2 * np.floor(i / 2) / np.float32(num_feats))).astype(np.float32)


def _interleave(pos):
    """pos (..., F) angles -> (..., F) with sin at even and cos at odd channels."""
    return jnp.stack([jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])], axis=-1).reshape(pos.shape)


def sine_map(height: int, width: int, num_pos_feats: int = 256, temperature: float = 10000.0):
    """``PositionEmbeddingSine(num_pos_feats, normalize=True)`` of an H x W map -> (H, W, num_pos_feats).

    Channels are [pos_y (F), pos_x (F)] with F = num_pos_feats // 2; coordinates are 1..H divided by
    (H + 1e-6) times 2*pi.
    """
    f = num_pos_feats // 2
    scale = np.float32(2 * math.pi)
    y = np.arange(1, height + 1, dtype=np.float32) / (np.float32(height) + np.float32(1e-6)) * scale
    x = np.arange(1, width + 1, dtype=np.float32) / (np.float32(width) + np.float32(1e-6)) * scale
    dim_t = _dim_t(f, temperature)
    pos_y = _interleave(jnp.asarray(y[:, None] / dim_t))  # (H, F)
    pos_x = _interleave(jnp.asarray(x[:, None] / dim_t))  # (W, F)
    return jnp.concatenate(
        [jnp.broadcast_to(pos_y[:, None, :], (height, width, f)), jnp.broadcast_to(pos_x[None, :, :], (height, width, f))],
        axis=-1,
    )


def encode_xy(x, y, num_pos_feats: int = 256, temperature: float = 10000.0):
    """``PositionEmbeddingSine._encode_xy``: normalised coords (...,) -> (pos_x, pos_y), each (..., F)."""
    f = num_pos_feats // 2
    dim_t = jnp.asarray(_dim_t(f, temperature))
    scale = 2 * math.pi
    pos_x = _interleave((x * scale)[..., None] / dim_t)
    pos_y = _interleave((y * scale)[..., None] / dim_t)
    return pos_x, pos_y


def encode_boxes(boxes_cxcywh, num_pos_feats: int = 256):
    """(..., 4) cxcywh -> (..., 2F + 2) = [pos_y, pos_x, h, w] (the reference's order)."""
    cx, cy, w, h = (boxes_cxcywh[..., i] for i in range(4))
    pos_x, pos_y = encode_xy(cx, cy, num_pos_feats)
    return jnp.concatenate([pos_y, pos_x, h[..., None], w[..., None]], axis=-1)


def sine_embed_for_position(pos, num_feats: int = 256):
    """``gen_sineembed_for_position``: (..., 2|4) -> (..., num_feats/2 * (2|4)); order y, x[, w, h]."""
    f = num_feats // 2
    dim_t = jnp.asarray(_dim_t(f))
    scale = 2 * math.pi
    enc = [_interleave((pos[..., i] * scale)[..., None] / dim_t) for i in range(pos.shape[-1])]
    if pos.shape[-1] == 2:
        return jnp.concatenate([enc[1], enc[0]], axis=-1)
    if pos.shape[-1] == 4:
        return jnp.concatenate([enc[1], enc[0], enc[2], enc[3]], axis=-1)
    raise ValueError(f"sine_embed_for_position: last dim must be 2 or 4, got {pos.shape[-1]}")


def sine_1d(positions, dim: int, temperature: float = 10000.0):
    """SAM2's ``get_1d_sine_pe``: (...,) -> (..., dim) = cat(sin, cos), not interleaved."""
    half = dim // 2
    dim_t = jnp.asarray(np.float32(temperature) ** (2 * np.floor(np.arange(half, dtype=np.float32) / 2) / np.float32(half)))
    pos = positions[..., None] / dim_t
    return jnp.concatenate([jnp.sin(pos), jnp.cos(pos)], axis=-1)
