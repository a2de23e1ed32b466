"""The tracker's memory encoder (``memory.py:SimpleMaskEncoder``, docs/reference_model.md, 'Tracker', step 4): fuses the
current frame's raw features with its predicted mask into a ``mem_dim``-channel spatial memory.

mask (B, S, S) -> resize to ``mask_interpol_size`` -> strided convs down to the feature grid ->
+ pix_feat_proj(features) -> CXBlocks -> out_proj, plus a ``mem_dim`` sine position map.
The caller scales the mask (sigmoid * 20 - 10, or a binarised click mask): the reference calls the
encoder with ``skip_mask_sigmoid=True``.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.nn import ops
from sam3_jax.nn.layers import Conv, LayerNorm2d, gelu
from sam3_jax.nn.position import sine_map


class MaskDownSampler(nn.Module):
    """``SimpleMaskDownSampler``: [Conv(stride) -> LayerNorm2d -> GELU] x n, then a 1x1 Conv.

    Channels grow by stride**2 per stage (1 -> 4 -> 16 -> 64 -> 256). The params keep the torch
    Sequential indices: convs ``encoder_{3i}``, norms ``encoder_{3i+1}``, last conv ``encoder_{3n}``.
    """

    embed_dim: int
    kernel_size: int
    stride: int
    padding: int
    total_stride: int
    interpol_size: int | None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, masks):
        """masks (B, H, W, 1) -> (B, interpol_size / total_stride, ..., embed_dim)."""
        size = self.interpol_size
        if size is not None and masks.shape[1:3] != (size, size):
            masks = ops.resize_bilinear(masks.astype(jnp.float32), (size, size), antialias=True)
        num_stages = round(math.log(self.total_stride) / math.log(self.stride))
        x, chans = masks, 1
        for i in range(num_stages):
            chans *= self.stride ** 2
            x = Conv(chans, (self.kernel_size,) * 2, strides=self.stride, padding=self.padding,
                     name=f"encoder_{3 * i}", dtype=self.dtype)(x)
            x = gelu(LayerNorm2d(name=f"encoder_{3 * i + 1}", dtype=self.dtype)(x))
        return Conv(self.embed_dim, (1, 1), name=f"encoder_{3 * num_stages}", dtype=self.dtype)(x)


class CXBlock(nn.Module):
    """ConvNeXt block: x + gamma * pwconv2(GELU(pwconv1(LN2d(dwconv(x))))), channels-last."""

    dim: int
    kernel_size: int = 7
    layer_scale_init: float = 1e-6
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        h = Conv(self.dim, (self.kernel_size,) * 2, padding=self.kernel_size // 2, feature_group_count=self.dim,
                 name="dwconv", dtype=self.dtype)(x)
        h = LayerNorm2d(name="norm", dtype=self.dtype)(h)
        h = nn.Dense(4 * self.dim, name="pwconv1", dtype=self.dtype)(h)
        h = nn.Dense(self.dim, name="pwconv2", dtype=self.dtype)(gelu(h))
        gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (self.dim,))
        return x + gamma.astype(h.dtype) * h


class Fuser(nn.Module):
    """``SimpleFuser`` (identity input projection): CXBlocks ``layers_{i}``."""

    dim: int
    num_layers: int
    kernel_size: int
    layer_scale_init: float
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = CXBlock(self.dim, self.kernel_size, self.layer_scale_init, dtype=self.dtype, name=f"layers_{i}")(x)
        return x


class MemoryEncoder(nn.Module):
    """``SimpleMaskEncoder``: params ``mask_downsampler``, ``pix_feat_proj``, ``fuser``, ``out_proj``."""

    cfg: TrackerConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, pix_feat, masks):
        """pix_feat (B, h, w, d_model): the frame's raw (not memory-conditioned) features;
        masks (B, S, S): scaled mask logits. Returns (features, pos), each (B, h, w, mem_dim)."""
        cfg = self.cfg
        down = MaskDownSampler(cfg.d_model, cfg.mask_ds_kernel, cfg.mask_ds_stride, cfg.mask_ds_padding,
                               cfg.mask_ds_total_stride, cfg.mask_interpol_size, dtype=self.dtype,
                               name="mask_downsampler")(masks[..., None])
        x = Conv(cfg.d_model, (1, 1), name="pix_feat_proj", dtype=self.dtype)(pix_feat) + down
        x = Fuser(cfg.d_model, cfg.fuser_layers, cfg.fuser_kernel, cfg.layer_scale_init, dtype=self.dtype,
                  name="fuser")(x)
        if cfg.mem_dim != cfg.d_model:
            x = Conv(cfg.mem_dim, (1, 1), name="out_proj", dtype=self.dtype)(x)
        b, h, w, _ = x.shape
        pos = jnp.broadcast_to(sine_map(h, w, cfg.mem_dim), (b, h, w, cfg.mem_dim)).astype(x.dtype)
        return x, pos
