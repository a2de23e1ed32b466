"""The ViTDet image trunk (the reference's ``vitdet.ViT`` as SAM 3 builds it; docs/reference_model.md, 'Image trunk').

Patch embedding, a tiled absolute position embedding, ``ln_pre``, then pre-norm blocks with 2-D
RoPE: most blocks attend inside non-overlapping windows, a few (``global_att_blocks``) over the
whole grid. Channels-last throughout: images (B, H, W, 3) -> features (B, H/14, W/14, C).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax.model import stacking
from sam3_jax.model.config import ViTConfig
from sam3_jax.nn import attention, layers, rope
from sam3_jax.nn.repeat import repeat


def window_partition(x, window: int):
    """(B, H, W, C) -> (B * nH * nW, window², C) windows in row-major window order.

    The grid is zero-padded up to a multiple of ``window`` (after the norm, as the reference does;
    the padded tokens take part in attention unmasked). Returns the windows and the padded size.
    """
    b, h, w, c = x.shape
    hp, wp = -(-h // window) * window, -(-w // window) * window
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c), (hp, wp)


def window_unpartition(windows, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]):
    """Inverse of ``window_partition``: (B * nH * nW, window², C) -> (B, H, W, C), padding removed."""
    (hp, wp), (h, w) = padded_hw, hw
    c = windows.shape[-1]
    x = windows.reshape(-1, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hp, wp, c)[:, :h, :w]


def rope_angles(config: ViTConfig, window: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """RoPE table of one block: (tokens, head_dim // 2) angles, a constant (not a parameter).

    Windowed blocks rotate by window-local coordinates 0..window-1. Global blocks squeeze the whole
    grid into the window's coordinate range ("interpolated RoPE": scale window / grid, 24/72 for
    the official model), since the reference builds with ``use_interp_rope=True`` and
    ``rope_pt_size`` = window size.
    """
    head_dim = config.embed_dim // config.num_heads
    if window > 0:
        return rope.axial_angles(head_dim, window, window, config.rope_theta, 1.0)
    h, w = grid_hw
    if h != w:
        raise ValueError(f"global-attention RoPE is defined for square token grids, got {h}x{w}")
    return rope.axial_angles(head_dim, w, h, config.rope_theta, config.window_size / h)


def drop_path_rates(config: ViTConfig) -> np.ndarray:
    """Stochastic depth grows linearly from 0 (first block) to ``drop_path_rate`` (last)."""
    return np.linspace(0.0, config.drop_path_rate, config.depth, dtype=np.float32)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection, a strided conv without bias (param ``proj/kernel``)."""

    embed_dim: int
    patch_size: int
    dtype: Any = None

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                       name="proj", dtype=self.dtype)(images)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and 2-D RoPE on q and k."""

    dim: int
    num_heads: int
    attention_impl: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x, angles):
        """x (B, L, C), angles (L, head_dim // 2) -> (B, L, C)."""
        b, n, c = x.shape
        qkv = nn.Dense(3 * c, name="qkv", dtype=self.dtype)(x).reshape(b, n, 3, self.num_heads, -1)
        # apply_rope wants tokens second to last: (B, heads, L, D).
        q, k = (rope.apply_rope(qkv[:, :, i].swapaxes(1, 2), angles).swapaxes(1, 2) for i in range(2))
        out = attention.attend(q, k, qkv[:, :, 2], implementation=self.attention_impl)
        return nn.Dense(c, name="proj", dtype=self.dtype)(out.reshape(b, n, c))


class Mlp(nn.Module):
    """timm's ``Mlp``: ``fc1`` -> exact GELU -> ``fc2``."""

    hidden_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        y = layers.gelu(nn.Dense(self.hidden_dim, name="fc1", dtype=self.dtype)(x))
        return nn.Dense(x.shape[-1], name="fc2", dtype=self.dtype)(y)


class Block(nn.Module):
    """Pre-norm transformer block; ``window`` > 0 attends within windows, 0 over the whole grid.

    ``drop_path_rate`` is this block's stochastic-depth rate, a call argument because it is a
    traced per-block value under ``nn.scan``; each residual branch draws its own per-sample mask
    from the "dropout" stream when not deterministic.
    """

    config: ViTConfig
    window: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x, drop_path_rate, deterministic: bool = True):
        cfg = self.config
        b, h, w, c = x.shape
        y = layers.LayerNorm(cfg.ln_eps, name="norm1", dtype=self.dtype)(x)
        if self.window > 0:
            y, padded_hw = window_partition(y, self.window)
        else:
            y = y.reshape(b, h * w, c)
        y = Attention(c, cfg.num_heads, cfg.attention_impl, name="attn", dtype=self.dtype)(
            y, rope_angles(cfg, self.window, (h, w)))
        if self.window > 0:
            y = window_unpartition(y, self.window, padded_hw, (h, w))
        else:
            y = y.reshape(b, h, w, c)
        x = x + self._drop_path(y, drop_path_rate, deterministic)
        y = Mlp(int(c * cfg.mlp_ratio), name="mlp", dtype=self.dtype)(
            layers.LayerNorm(cfg.ln_eps, name="norm2", dtype=self.dtype)(x))
        return x + self._drop_path(y, drop_path_rate, deterministic)

    def _drop_path(self, y, rate, deterministic: bool):
        """A model-wide zero rate is skipped statically; otherwise every block draws a mask."""
        if deterministic or self.config.drop_path_rate == 0.0:
            return y
        return layers.drop_path(y, rate, self.make_rng("dropout"), deterministic)


def _block_class(config: ViTConfig):
    if not config.remat:
        return Block
    return nn.remat(Block, static_argnums=(3,), policy=getattr(jax.checkpoint_policies, config.remat_policy),
                    prevent_cse=False)  # inside a scan: nothing to protect from CSE


class ViT(nn.Module):
    """The SAM 3 image trunk (torch ``backbone.vision_backbone.trunk``).

    Params: ``patch_embed/proj/kernel``, ``pos_embed`` (1, 1 + pretrain_grid², C) (slot 0 is the
    unused cls position), ``ln_pre``, and per block ``{norm1, attn/qkv, attn/proj, norm2, mlp/fc1,
    mlp/fc2}`` as ``block_groups/blocks_{j}``, scanned over the repeating groups of n blocks
    (n - 1 windowed, then a global one) with every leaf stacked over the groups: torch block
    i = g * n + j sits at index g (``stacking`` converts). With ``config.remat`` each block is
    rematerialised in the backward pass (the reference checkpoints every block in training) under
    the ``jax.checkpoint_policies`` named by ``config.remat_policy``.
    """

    config: ViTConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, images, deterministic: bool = True):
        """images (B, H, W, 3), already normalised -> features (B, H // patch, W // patch, C)."""
        cfg = self.config
        x = PatchEmbed(cfg.embed_dim, cfg.patch_size, name="patch_embed", dtype=self.dtype)(
            images.astype(self.dtype or images.dtype))
        x = x + self._tiled_pos_embed(x.shape[1], x.shape[2]).astype(x.dtype)
        x = layers.LayerNorm(cfg.ln_eps, name="ln_pre", dtype=self.dtype)(x)
        rates = drop_path_rates(cfg)
        n = stacking.vit_group_size(cfg)
        block = _block_class(cfg)

        period = [functools.partial(block, cfg, cfg.window_size if j < n - 1 else 0, dtype=self.dtype)
                  for j in range(n)]
        return repeat(period, cfg.depth // n, stacking.VIT.prefix, stacking.VIT.stacked, x, deterministic,
                      per_layer=(jnp.asarray(rates),))

    def _tiled_pos_embed(self, h: int, w: int):
        """The pretraining grid's embedding repeated over the token grid: token (i, j) gets
        pos[i % g, j % g] (tiled, not interpolated; the cls slot is dropped)."""
        cfg = self.config
        g = cfg.pretrain_grid
        pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, 1 + g * g, cfg.embed_dim))
        pos = pos[0, 1:].reshape(g, g, cfg.embed_dim)
        return jnp.tile(pos, (-(-h // g), -(-w // g), 1))[:h, :w]
