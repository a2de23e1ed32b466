"""Multi-head attention with the semantics of ``torch.nn.MultiheadAttention`` (batch-first).

Fused ``in_proj`` as in the reference (rows q, k, v; heads are contiguous slices), an additive
bias (boxRPB, causal masks) and a boolean key-padding mask (True = ignore, torch's convention).
Softmax runs in float32 whatever the compute dtype.

On a GPU, attention in bf16/fp16 without bias, padding mask or dropout (the ViT's window and global
blocks) goes to cuDNN's fused flash attention, which never materialises the (Lq, Lk) logits; the
``implementation`` argument (``ViTConfig.attention_impl``) forces one or the other.
Long attention that cuDNN does not take (dropout, a bias or padding mask, float32) goes as a loop
over tiles (``lax.map``): a chunk of the queries at a time, each tile rematerialised in the backward
pass (``jax.checkpoint``), so neither pass ever holds all (Lq, Lk) logits, the dropout bits or the
weights, only one tile's, as flash attention does. Each row's softmax is its own, so the result is
the same function (dropout aside: a tile draws its own mask from the key folded with its index).
Without that, the fusion encoder's self-attention with dropout at 1008 px held several
(B, 8, 5184, 5184) float32 arrays at once in the train step's backward pass. On a CPU a tile is one
(batch, head) pair and at most ``TILE_LOGITS_CPU`` logits, which then stay in the caches between the
two matmuls and the softmax; elsewhere a tile covers every (batch, head) pair and at most
``TILE_LOGITS`` logits. benchmarks/README.md has the figures.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam3_jax.nn import platform


MASKED = -1e30
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
TILE_FROM = 1 << 16  # on a CPU, attention with more (query, key) pairs a head than this goes by tiles
TILE_LOGITS_CPU = 1 << 23  # at most this many logits a CPU tile (32 MiB in float32)
TILE_LOGITS = 1 << 27  # elsewhere: attention with more logits than this goes by tiles of at most as many


def _tiles(batch_heads: int, lq: int, lk: int, backend: str | None = None) -> tuple[int, int, int] | None:
    """(heads, chunk, count): (batch, head) pairs a tile, queries a tile and query chunks, where
    tiling applies (see the module docstring), else None."""
    if (backend or platform.current()) == "cpu":
        if lq * lk <= TILE_FROM:
            return None
        heads, limit = 1, TILE_LOGITS_CPU
    else:
        if batch_heads * lq * lk <= TILE_LOGITS:
            return None
        heads, limit = batch_heads, TILE_LOGITS
    chunk = max(1, -(-lq // -(-heads * lq * lk // limit)))
    return heads, chunk, -(-lq // chunk)


def _use_cudnn(q, k, v, bias, key_padding_mask, dropout: bool, implementation: str | None) -> bool:
    """Where cuDNN's flash attention computes exactly what ``attend`` does (``implementation`` None:
    decide; "xla" or "cudnn": forced)."""
    if implementation is not None:
        return implementation == "cudnn"
    return (platform.current() == "gpu" and bias is None and key_padding_mask is None and not dropout
            and q.dtype in CUDNN_DTYPES and q.dtype == k.dtype == v.dtype and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0)


def split_heads(x, num_heads: int):
    b, l, c = x.shape
    return x.reshape(b, l, num_heads, c // num_heads)


def merge_heads(x):
    b, l, h, d = x.shape
    return x.reshape(b, l, h * d)


def attend(q, k, v, bias=None, key_padding_mask=None, *, dropout_rate: float = 0.0,
           dropout_rng=None, deterministic: bool = True, implementation: str | None = None):
    """Scaled dot-product attention. q (B, Lq, H, D); k, v (B, Lk, H, D).

    ``bias`` broadcasts to (B, H, Lq, Lk) and is added to the logits; ``key_padding_mask`` (B, Lk)
    is True where a key must be ignored. Attention dropout applies only when not deterministic.
    ``implementation``: None picks (see the module docstring); "xla" or "cudnn" forces one.
    """
    scale = q.shape[-1] ** -0.5
    dropout = not deterministic and dropout_rate > 0.0
    if _use_cudnn(q, k, v, bias, key_padding_mask, dropout, implementation):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    tiles = _tiles(q.shape[0] * q.shape[2], q.shape[1], k.shape[1])
    if tiles is not None:
        return _tiled_attention(q, k, v, bias, key_padding_mask, scale, *tiles,
                                dropout_rate=dropout_rate if dropout else 0.0, dropout_rng=dropout_rng)
    return _softmax_attention(q, k, v, bias, key_padding_mask, scale, dropout_rate if dropout else 0.0,
                              dropout_rng)


def _tiled_attention(q, k, v, bias, key_padding_mask, scale, heads: int, chunk: int, count: int, *,
                     dropout_rate: float = 0.0, dropout_rng=None):
    """``_softmax_attention`` one tile at a time: ``heads`` (batch, head) pairs x ``chunk`` queries.
    The last chunk is padded with zero queries, whose rows are dropped. Within a tile the weights
    are normalised after the second matmul, as flash attention does: one pass fewer over the
    logits, and the weights stay in the layout the matmul reads. ``bias`` may be per query."""
    b, lq, h, d = q.shape
    lk, bh = k.shape[1], b * h
    pad, groups = chunk * count - lq, bh // heads

    def by_head(x):  # (b, l, h, ...) -> (b * h, l, ...)
        return x.transpose(0, 2, 1, 3).reshape(bh, x.shape[1], x.shape[-1])

    q_tiles = jnp.pad(by_head(q), ((0, 0), (0, pad), (0, 0))).reshape(groups, heads, count, chunk, d)
    q_tiles = q_tiles.transpose(0, 2, 1, 3, 4).reshape(groups * count, heads, chunk, d)
    k_heads, v_heads = by_head(k), by_head(v)
    if bias is not None:
        rows = lq if jnp.ndim(bias) >= 2 and jnp.shape(bias)[-2] != 1 else 1
        bias = jnp.broadcast_to(bias, (b, h, rows, lk)).reshape(bh, rows, lk).astype(jnp.float32)
        if rows > 1:
            bias = jnp.pad(bias, ((0, 0), (0, pad), (0, 0)))

    def tile(i, q_tile):
        first = (i // count) * heads  # the tile's first (batch, head) pair
        logits = jnp.einsum("gqd,gkd->gqk", q_tile, jax.lax.dynamic_slice_in_dim(k_heads, first, heads))
        logits = logits.astype(jnp.float32) * scale
        if bias is not None:
            tile_bias = jax.lax.dynamic_slice_in_dim(bias, first, heads)
            if tile_bias.shape[1] > 1:
                tile_bias = jax.lax.dynamic_slice_in_dim(tile_bias, (i % count) * chunk, chunk, axis=1)
            logits = logits + tile_bias
        if key_padding_mask is not None:
            ignore = jnp.take(key_padding_mask, (first + jnp.arange(heads)) // h, axis=0)
            logits = jnp.where(ignore[:, None, :], MASKED, logits)
        e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        total = e.sum(-1, keepdims=True)
        if dropout_rate > 0.0:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, i), 1.0 - dropout_rate, e.shape)
            e = jnp.where(keep, e / (1.0 - dropout_rate), 0.0)
        out = jnp.einsum("gqk,gkd->gqd", e.astype(v.dtype), jax.lax.dynamic_slice_in_dim(v_heads, first, heads))
        return (out / total).astype(v.dtype)

    tile = jax.checkpoint(tile)
    out = jax.lax.map(lambda args: tile(*args), (jnp.arange(groups * count), q_tiles))  # (tiles, heads, chunk, dv)
    out = out.reshape(groups, count, heads, chunk, -1).transpose(0, 2, 1, 3, 4).reshape(b, h, count * chunk, -1)
    return out[:, :, :lq].transpose(0, 2, 1, 3)


def _softmax_attention(q, k, v, bias, key_padding_mask, scale, dropout_rate: float = 0.0, dropout_rng=None):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if key_padding_mask is not None:
        # A large finite value, not -inf: a row whose keys are all padding then stays finite
        # (uniform weights) instead of NaN, which would poison gradients through jnp.where.
        logits = jnp.where(key_padding_mask[:, None, None, :], MASKED, logits)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention: params ``in_proj_kernel`` (C, 3C), ``in_proj_bias``, ``out_proj``."""

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, query, key, value, attn_bias=None, key_padding_mask=None, deterministic: bool = True):
        c = self.embed_dim
        kernel = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (c, 3 * c))
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * c,))
        dtype = self.dtype or query.dtype
        kernel, bias = kernel.astype(dtype), bias.astype(dtype)

        def project(x, i):
            return split_heads(x.astype(dtype) @ kernel[:, i * c:(i + 1) * c] + bias[i * c:(i + 1) * c],
                               self.num_heads)

        q, k, v = project(query, 0), project(key, 1), project(value, 2)
        rng = None if deterministic or self.dropout == 0.0 else self.make_rng("dropout")
        out = attend(q, k, v, attn_bias, key_padding_mask, dropout_rate=self.dropout,
                     dropout_rng=rng, deterministic=deterministic)
        return nn.Dense(c, name="out_proj", dtype=self.dtype)(merge_heads(out))
