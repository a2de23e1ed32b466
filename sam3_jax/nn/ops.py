"""Sampling ops the reference takes from torchvision and ``torch.nn.functional``, channels-last.

* ``roi_align``: torchvision's RoIAlign (CPU-kernel semantics). Bilinear sampling and the bin
  average are both separable in y and x, so a box's 7x7 output is ``Wy @ feat @ Wx^T`` with dense
  per-axis weight matrices: two batched matmuls instead of a gather per sample, static shapes
  whatever the box size, and a cheap backward pass (no scatter).
* ``grid_sample``: ``F.grid_sample`` (bilinear, zeros padding, ``align_corners=False``) at a few
  points, as four gathers.
* ``resize_bilinear``, ``resize_nearest``: ``F.interpolate`` in bilinear and nearest modes;
  ``resize_masks``: the bilinear one on a stack of single-channel maps.

Also the small array helpers every model part shares: ``where_rows`` (a per-row choice between two
pytrees), ``normalize_pixels`` (uint8 RGB to the model's [-1, 1] input range) and
``power_of_two_at_least`` (the static size that counts varying at run time, such as objects, images
or memories, are padded to, so that a handful of compiled shapes serve every count).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _bin_weights(start, extent, size: int, out_size: int, sampling_ratio: int, max_samples: int):
    """Per-axis RoIAlign weights (..., out_size, size): row p averages the bilinear weights of the
    samples of bin p. ``start``/``extent`` (...,) are the RoI's first coordinate and length.

    As torchvision: ``g = ceil(extent / out_size)`` samples per bin (or ``sampling_ratio``), at
    ``start + p*bin + (i + 0.5)*bin/g``; a sample outside [-1, size] weighs nothing but still
    counts in the average; inside, it is clamped to [0, size - 1] and spread over its two
    neighbours (the hat function). ``g`` is capped at ``max_samples`` (the static grid).
    """
    bin_size = extent / out_size
    if sampling_ratio > 0:
        grid = jnp.full_like(extent, sampling_ratio, dtype=jnp.int32)
    else:
        grid = jnp.ceil(extent / out_size).astype(jnp.int32)
    grid = jnp.minimum(grid, max_samples)
    p = jnp.arange(out_size, dtype=jnp.float32)[:, None]
    i = jnp.arange(max_samples)
    grid_f = grid.astype(jnp.float32)[..., None, None]
    coords = (start[..., None, None] + p * bin_size[..., None, None]
              + (i + 0.5) * bin_size[..., None, None] / jnp.maximum(grid_f, 1.0))  # (..., P, S)
    valid = (i < grid[..., None, None]) & (coords >= -1.0) & (coords <= size)
    clamped = jnp.clip(coords, 0.0, size - 1)
    hat = jax.nn.relu(1.0 - jnp.abs(clamped[..., None] - jnp.arange(size, dtype=jnp.float32)))
    weights = jnp.where(valid[..., None], hat, 0.0).sum(-2)  # (..., P, size)
    return weights / jnp.maximum(grid_f, 1.0)


def roi_align(feat, boxes_xyxy, output_size: int = 7, sampling_ratio: int = -1, aligned: bool = False,
              max_samples: int | None = None):
    """``torchvision.ops.roi_align`` with spatial_scale 1. feat (B, H, W, C); boxes_xyxy (B, N, 4) in
    feature pixels -> (B, N, output_size, output_size, C).

    The adaptive sample count (``sampling_ratio <= 0``) is exact for boxes up to
    ``max_samples * output_size`` pixels per side; the default ``ceil(2 * max(H, W) / output_size)``
    covers boxes twice the map's size. Larger boxes take ``max_samples`` evenly spread samples per
    bin. As torchvision, no gradient flows into the boxes.
    """
    _, h, w, _ = feat.shape
    if max_samples is None:
        max_samples = sampling_ratio if sampling_ratio > 0 else math.ceil(2 * max(h, w) / output_size)
    boxes = jax.lax.stop_gradient(boxes_xyxy).astype(jnp.float32) - (0.5 if aligned else 0.0)
    x1, y1, x2, y2 = (boxes[..., k] for k in range(4))
    width, height = x2 - x1, y2 - y1
    if not aligned:
        width, height = jnp.maximum(width, 1.0), jnp.maximum(height, 1.0)
    wy = _bin_weights(y1, height, h, output_size, sampling_ratio, max_samples).astype(feat.dtype)
    wx = _bin_weights(x1, width, w, output_size, sampling_ratio, max_samples).astype(feat.dtype)
    rows = jnp.einsum("bnpy,byxc->bnpxc", wy, feat)
    return jnp.einsum("bnpxc,bnqx->bnpqc", rows, wx)


def grid_sample(feat, grid):
    """``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``.

    feat (B, H, W, C); grid (B, ..., 2) with (x, y) in [-1, 1] -> (B, ..., C). Corners outside
    the map contribute zero.
    """
    b, h, w, c = feat.shape
    lead = grid.shape[1:-1]
    grid = grid.reshape(b, -1, 2).astype(jnp.float32)
    x = ((grid[..., 0] + 1.0) * w - 1.0) / 2.0
    y = ((grid[..., 1] + 1.0) * h - 1.0) / 2.0
    x0, y0 = jnp.floor(x), jnp.floor(y)
    lx, ly = x - x0, y - y0
    flat = feat.reshape(b, h * w, c)
    out = jnp.zeros((b, grid.shape[1], c), feat.dtype)
    for dy, wy in ((0, 1.0 - ly), (1, ly)):
        for dx, wx in ((0, 1.0 - lx), (1, lx)):
            yi, xi = (y0 + dy).astype(jnp.int32), (x0 + dx).astype(jnp.int32)
            inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
            idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
            vals = jnp.take_along_axis(flat, idx[..., None], axis=1)
            out = out + vals * jnp.where(inside, wy * wx, 0.0)[..., None].astype(feat.dtype)
    return out.reshape(b, *lead, c)


def resize_bilinear(x, size: tuple[int, int], antialias: bool = False):
    """``F.interpolate(mode="bilinear", align_corners=False, antialias=...)`` on (B, H, W, C).

    ``jax.image.resize`` (half-pixel centres, triangle kernel widened by the scale when
    antialiasing, weights renormalised at the borders) agrees with torch in both modes, up to
    and down (checked in tests/unit/test_ops.py).
    """
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, size[0], size[1], c), method="linear", antialias=antialias)


def resize_masks(x, size: tuple[int, int], antialias: bool = False):
    """(..., h, w) -> (..., *size) float32, each map resized with ``resize_bilinear``; only cast when
    the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.astype(jnp.float32)
    maps = x.reshape(-1, *x.shape[-2:], 1).astype(jnp.float32)
    return resize_bilinear(maps, tuple(size), antialias=antialias).reshape(*x.shape[:-2], *size)


def resize_nearest(x, size: tuple[int, int]):
    """``F.interpolate(mode="nearest")`` on (B, H, W, C): source index floor(dst * in / out)."""

    def index(n_in, n_out):
        src = np.floor(np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)).astype(np.int32)
        return np.minimum(src, n_in - 1)

    h, w = x.shape[1:3]
    return x[:, index(h, size[0])][:, :, index(w, size[1])]


def where_rows(cond, new, old):
    """Per row: ``new`` where cond (B,), else ``old``, for every leaf (cond broadcast over the trailing
    axes of ``new``'s leaves; an ``old`` leaf may be a scalar)."""
    return jax.tree.map(lambda a, b: jnp.where(cond.reshape((-1,) + (1,) * (jnp.ndim(a) - 1)), a, b), new, old)


def normalize_pixels(image, dtype=np.float32):
    """uint8 RGB -> float32 in [-1, 1] (mean 0.5, std 0.5), the model's input range; numpy or jax arrays.
    ``dtype``: the precision the [0, 1] image is normalised in (the reference's video loader uses float16)."""
    x = (image if isinstance(image, jax.Array) else np.asarray(image)).astype(np.float32) / np.float32(255.0)
    half = np.dtype(dtype).type(0.5)
    return ((x.astype(dtype) - half) / half).astype(np.float32)


def power_of_two_at_least(n: int) -> int:
    """The least power of two >= ``n`` (1 for ``n`` <= 1)."""
    return 1 << max(n - 1, 0).bit_length()
