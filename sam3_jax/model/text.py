"""The text encoder (``backbone.language_backbone``): a causal CLIP text transformer and a resizer.

Parameter tree (mirrors the reference's ``VETextEncoder``, docs/reference_model.md, 'Text encoder')::

    encoder/token_embedding/embedding              (vocab, width)
    encoder/positional_embedding                   (context_length, width)
    encoder/transformer/resblocks_{i}/ln_1, attn, ln_2, mlp/{c_fc, c_proj}
                       (scanned: resblocks_scan/resblocks_0/..., stacked over the blocks)
    encoder/ln_final
    resizer                                        width -> d_model

The reference's ``encoder.text_projection`` feeds only a pooled output that is thrown away, so it is
not a parameter here (the converter keeps it aside as dead). Every token, padding included, goes
through the transformer with only the causal mask, as in the reference; padding is reported to the
consumers by the returned mask.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam3_jax.model import stacking
from sam3_jax.model.config import TextConfig
from sam3_jax.nn.attention import MultiheadAttention
from sam3_jax.nn.layers import LayerNorm, gelu
from sam3_jax.nn.repeat import repeat

PAD_ID = 0


class FeedForward(nn.Module):
    """``mlp``: ``c_fc`` -> exact GELU -> ``c_proj``."""

    hidden_dim: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        h = gelu(nn.Dense(self.hidden_dim, name="c_fc", dtype=self.dtype)(x))
        return nn.Dense(x.shape[-1], name="c_proj", dtype=self.dtype)(h)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    width: int
    heads: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, attn_bias, deterministic: bool = True):
        h = LayerNorm(name="ln_1", dtype=self.dtype)(x)
        x = x + MultiheadAttention(self.width, self.heads, name="attn", dtype=self.dtype)(
            h, h, h, attn_bias, deterministic=deterministic)
        h = LayerNorm(name="ln_2", dtype=self.dtype)(x)
        return x + FeedForward(int(self.width * self.mlp_ratio), name="mlp", dtype=self.dtype)(h)


class Transformer(nn.Module):
    """``transformer``: the blocks, scanned as ``resblocks_scan/resblocks_0`` (torch
    ``resblocks.{i}``), each optionally rematerialised."""

    config: TextConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, attn_bias, deterministic: bool = True):
        cfg = self.config
        block = ResidualAttentionBlock
        if cfg.remat:
            block = nn.remat(block, static_argnums=(3,), policy=getattr(jax.checkpoint_policies, cfg.remat_policy),
                             prevent_cse=False)
        make = functools.partial(block, cfg.width, cfg.heads, cfg.mlp_ratio, dtype=self.dtype)
        return repeat([make], cfg.layers, stacking.TEXT.prefix, stacking.TEXT.stacked, x, attn_bias, deterministic)


def causal_bias(length: int):
    """Additive mask: -inf above the diagonal, so token t attends to tokens 0..t only."""
    return jnp.where(jnp.tri(length, dtype=bool), 0.0, -jnp.inf).astype(jnp.float32)


class TextTransformer(nn.Module):
    """``encoder``: token + learned position embeddings, causal blocks, ``ln_final``; (B, L, width)."""

    config: TextConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, token_ids, deterministic: bool = True):
        cfg = self.config
        length = token_ids.shape[1]
        if length > cfg.context_length:
            raise ValueError(f"token_ids have length {length} > context_length {cfg.context_length}")
        embed = nn.Embed(cfg.vocab_size, cfg.width, name="token_embedding", dtype=self.dtype,
                         embedding_init=nn.initializers.normal(0.02))
        pos = self.param("positional_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.width))
        x = embed(token_ids) + pos[:length].astype(self.dtype or pos.dtype)
        x = Transformer(cfg, name="transformer", dtype=self.dtype)(x, causal_bias(length), deterministic)
        return LayerNorm(name="ln_final", dtype=self.dtype)(x)


class VETextEncoder(nn.Module):
    """Token ids (B, L) -> ``language_features`` (B, L, d_model) and ``language_mask`` (B, L), True at padding.

    Batch-first; the reference returns the features sequence-first. Ids come from
    ``sam3_jax.model.tokenizer.SimpleTokenizer``; the mask is ``ids == 0`` exactly as the reference
    computes it (so an id 0 inside a caption, the bare symbol "!", is masked too).
    """

    config: TextConfig
    d_model: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, token_ids, deterministic: bool = True):
        memory = TextTransformer(self.config, name="encoder", dtype=self.dtype)(token_ids, deterministic)
        features = nn.Dense(self.d_model, name="resizer", dtype=self.dtype)(memory)
        return features, token_ids == PAD_ID
