"""The fusion encoder: image tokens attend to themselves and to the prompt (docs/reference_model.md, 'Fusion encoder').

The reference's ``TransformerEncoderFusion`` as SAM 3 builds it: one feature level (no level
embedding), no pooled-text add (so no ``text_pooling_proj``), pre-norm layers and no final norm.
The prompt is only read, never updated. Batch-first: tokens (B, HW, C), prompt (B, Lp, C).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from sam3_jax.model import stacking
from sam3_jax.model.config import EncoderConfig
from sam3_jax.nn.attention import MultiheadAttention
from sam3_jax.nn.layers import LayerNorm
from sam3_jax.nn.repeat import repeat


class TransformerEncoderLayer(nn.Module):
    """The reference's pre-norm ``TransformerEncoderLayer``: self-attention, cross-attention to
    ``memory``, ReLU FFN; each a residual on the un-normed stream.

    The ``pos_enc_at_*`` flags say where positions are added, as in the reference's constructor;
    the defaults are the geometry encoder's (``pos`` on the cross-attention keys), the fusion
    encoder adds ``query_pos`` to the self-attention q/k instead.
    """

    d_model: int
    num_heads: int
    dim_feedforward: int
    dropout: float = 0.1
    pos_enc_at_attn: bool = False
    pos_enc_at_cross_attn_queries: bool = False
    pos_enc_at_cross_attn_keys: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, tgt, memory, tgt_key_padding_mask=None, memory_key_padding_mask=None, pos=None,
                 query_pos=None, deterministic: bool = True):
        """tgt (B, L, C), memory (B, M, C); padding masks (B, L) / (B, M) True = ignore;
        ``pos`` goes with memory, ``query_pos`` with tgt. -> (B, L, C)."""

        def drop(x):
            return nn.Dropout(self.dropout)(x, deterministic=deterministic)

        def attention(name):
            return MultiheadAttention(self.d_model, self.num_heads, self.dropout, dtype=self.dtype, name=name)

        t2 = LayerNorm(name="norm1", dtype=self.dtype)(tgt)
        q = t2 + query_pos if self.pos_enc_at_attn else t2
        tgt = tgt + drop(attention("self_attn")(q, q, t2, key_padding_mask=tgt_key_padding_mask,
                                                deterministic=deterministic))

        t2 = LayerNorm(name="norm2", dtype=self.dtype)(tgt)
        q = t2 + query_pos if self.pos_enc_at_cross_attn_queries else t2
        k = memory + pos if self.pos_enc_at_cross_attn_keys else memory
        tgt = tgt + drop(attention("cross_attn_image")(q, k, memory, key_padding_mask=memory_key_padding_mask,
                                                       deterministic=deterministic))

        t2 = LayerNorm(name="norm3", dtype=self.dtype)(tgt)
        t2 = drop(jax.nn.relu(nn.Dense(self.dim_feedforward, name="linear1", dtype=self.dtype)(t2)))
        return tgt + drop(nn.Dense(self.d_model, name="linear2", dtype=self.dtype)(t2))


class TransformerEncoderFusion(nn.Module):
    """The layers, scanned as ``layers_scan/layers_0`` (torch ``layers.{i}``); returns the encoded image tokens ("memory")."""

    config: EncoderConfig = EncoderConfig()
    d_model: int = 256
    dtype: Any = None

    @nn.compact
    def __call__(self, src, src_pos, prompt, prompt_mask, deterministic: bool = True):
        """src, src_pos (B, HW, C); prompt (B, Lp, C); prompt_mask (B, Lp) True = padding."""
        cfg = self.config
        layer_cls = TransformerEncoderLayer
        if cfg.remat:  # static: (self, ..., deterministic)
            layer_cls = nn.remat(TransformerEncoderLayer, static_argnums=(7,), prevent_cse=False)
        make = functools.partial(layer_cls, self.d_model, cfg.num_heads, cfg.dim_feedforward, cfg.dropout,
                                 pos_enc_at_attn=True, pos_enc_at_cross_attn_keys=False, dtype=self.dtype)
        return repeat([make], cfg.num_layers, stacking.FUSION_ENCODER.prefix, stacking.FUSION_ENCODER.stacked,
                      src, prompt, None, prompt_mask, None, src_pos, deterministic)
