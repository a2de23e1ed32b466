"""The tracker's memory attention (docs/reference_model.md, 'Tracker', step 2): the current frame's tokens attend to the
spatial memories of past frames and to object pointers.

Reference: ``decoder.py:TransformerEncoderCrossAttention`` with ``TransformerDecoderLayerv2`` layers
(pre-norm; self-attention, cross-attention, FFN) and 1-head ``RoPEAttention``. The torch tracker holds
it as ``transformer.encoder`` (a ``TransformerWrapper`` without decoder); ``MemoryTransformer`` keeps
that path so the parameters are ``transformer/encoder/layers_{i}/...``.

Static shapes: the memory is a fixed number of spatial frames (``num_spatial_frames`` x HW tokens,
RoPE-rotated with the query table repeated per frame) followed by object-pointer tokens (not rotated),
with a padding mask for empty slots. Keys that are masked out contribute nothing, so the result equals
the reference run on the valid slots only.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam3_jax.model import stacking
from sam3_jax.model.tracker.attention import Attention
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.nn.layers import LayerNorm
from sam3_jax.nn.repeat import repeat


class MemoryAttentionLayer(nn.Module):
    """``TransformerDecoderLayerv2`` as the tracker builds it: no position on queries, memory position
    on keys, RoPE in both attentions."""

    d_model: int
    num_heads: int
    dim_feedforward: int
    dropout: float
    rope_theta: float
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, memory, memory_pos, memory_mask, num_k_exclude_rope: int, deterministic: bool):
        def drop(y):
            return nn.Dropout(self.dropout)(y, deterministic=deterministic)

        def attention(name):
            return Attention(self.d_model, self.num_heads, dropout=self.dropout, rope_theta=self.rope_theta,
                             dtype=self.dtype, name=name)

        h = LayerNorm(name="norm1", dtype=self.dtype)(x)
        x = x + drop(attention("self_attn")(h, h, h, deterministic=deterministic))
        h = LayerNorm(name="norm2", dtype=self.dtype)(x)
        x = x + drop(attention("cross_attn_image")(h, memory + memory_pos, memory, memory_mask,
                                                   num_k_exclude_rope, deterministic=deterministic))
        h = LayerNorm(name="norm3", dtype=self.dtype)(x)
        h = nn.Dense(self.dim_feedforward, name="linear1", dtype=self.dtype)(h)
        h = nn.Dense(self.d_model, name="linear2", dtype=self.dtype)(drop(jax.nn.relu(h)))
        return x + drop(h)


class MemoryAttention(nn.Module):
    """``TransformerEncoderCrossAttention``: params ``layers_scan/layers_0`` (the layers, scanned;
    torch ``layers.{i}``), ``norm``."""

    cfg: TrackerConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, curr, curr_pos, memory, memory_pos, memory_mask=None, *, num_spatial_frames: int,
                 deterministic: bool = True):
        """Condition the current frame on the memory bank.

        curr, curr_pos: (B, HW, d_model) tokens of the current frame (row-major, square grid) and
          their sine position; memory, memory_pos: (B, num_spatial_frames * HW + Nptr, mem_dim), the
          spatial memories first, then the object-pointer tokens; memory_mask: (B, same) True where a
          slot is padding. Returns the memory-conditioned tokens (B, HW, d_model), final-normed.
        """
        cfg = self.cfg
        num_ptr_tokens = memory.shape[1] - num_spatial_frames * curr.shape[1]
        if num_ptr_tokens < 0:
            raise ValueError(f"memory has {memory.shape[1]} tokens, fewer than {num_spatial_frames} frames "
                             f"of {curr.shape[1]}")
        x = curr + 0.1 * curr_pos
        make = functools.partial(MemoryAttentionLayer, cfg.d_model, cfg.mem_attn_heads, cfg.mem_attn_ffn,
                                 cfg.mem_attn_dropout, cfg.rope_theta, dtype=self.dtype)
        x = repeat([make], cfg.mem_attn_layers, stacking.MEMORY_ATTENTION.prefix, stacking.MEMORY_ATTENTION.stacked,
                   x, memory, memory_pos, memory_mask, num_ptr_tokens, deterministic)
        return LayerNorm(name="norm", dtype=self.dtype)(x)


class MemoryTransformer(nn.Module):
    """The reference's ``TransformerWrapper(encoder=..., decoder=None)``: only a name level."""

    cfg: TrackerConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, *args, **kwargs):
        return MemoryAttention(self.cfg, dtype=self.dtype, name="encoder")(*args, **kwargs)
