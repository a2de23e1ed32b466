"""Multi-head attention with the semantics of ``torch.nn.MultiheadAttention`` (batch-first).

Fused ``in_proj`` as in the reference (rows q, k, v; heads are contiguous slices), an additive
bias (boxRPB, causal masks) and a boolean key-padding mask (True = ignore, torch's convention).
Softmax runs in float32 whatever the compute dtype.

On a GPU, attention in bf16/fp16 without bias, padding mask or dropout (the ViT's window and global
blocks) goes to cuDNN's fused flash attention, which never materialises the (Lq, Lk) logits; set
``SAM3_JAX_CUDNN_ATTENTION=0`` to keep XLA's einsum-softmax-einsum everywhere (e.g. to compare).
On a CPU, attention without dropout over more than a few thousand (query, key) pairs (the ViT's
windowed and global blocks, the fusion encoder, the tracker's memory attention) runs as a loop over
tiles: one (batch, head) pair and a chunk of its queries at a time. Each row's softmax is its own,
so the result is the same function; what changes is that a tile's logits (at most ``TILE_LOGITS``)
stay in the caches between the two matmuls and the softmax, where the whole (B, H, Lq, Lk) array
would go out to memory and back several times: on a 2-core machine this halves the time of the
ViT's windowed attention and of its global attention (5184 tokens).
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp


MASKED = -1e30
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
TILE_FROM = 1 << 16  # on a CPU, attention with more (query, key) pairs than this goes by tiles
TILE_LOGITS = 1 << 23  # at most this many logits a tile (32 MiB in float32)


def _tiles(q, k, bias, dropout: bool) -> tuple[int, int] | None:
    """(chunk, count): queries a tile and tiles per (batch, head) where tiling applies (see the
    module docstring), else None."""
    lq, lk = q.shape[1], k.shape[1]
    if dropout or jax.default_backend() != "cpu" or lq * lk <= TILE_FROM:
        return None
    if bias is not None and jnp.ndim(bias) >= 2 and jnp.shape(bias)[-2] != 1:
        return None  # a per-query bias (boxRPB) would have to be tiled too; those are short
    count = -(-lq * lk // TILE_LOGITS)
    return -(-lq // count), count


def _use_cudnn(q, k, v, bias, key_padding_mask, dropout: bool, implementation: str | None) -> bool:
    """Where cuDNN's flash attention computes exactly what ``attend`` does (``implementation`` None:
    decide; "xla" or "cudnn": forced)."""
    if implementation is not None:
        return implementation == "cudnn"
    return (os.environ.get("SAM3_JAX_CUDNN_ATTENTION", "1") != "0" and jax.default_backend() == "gpu"
            and bias is None and key_padding_mask is None and not dropout and q.dtype in CUDNN_DTYPES
            and q.dtype == k.dtype == v.dtype and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0)


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
    tiles = _tiles(q, k, bias, dropout)
    if tiles is not None:
        return _tiled_attention(q, k, v, bias, key_padding_mask, scale, *tiles)
    return _softmax_attention(q, k, v, bias, key_padding_mask, scale, dropout_rate if dropout else 0.0,
                              dropout_rng)


def _tiled_attention(q, k, v, bias, key_padding_mask, scale, chunk: int, count: int):
    """``_softmax_attention`` one (batch, head, query chunk) tile at a time (``lax.map``); the last
    chunk is padded with zero queries, whose rows are dropped. Within a tile the weights are
    normalised after the second matmul, as flash attention does: one pass fewer over the logits,
    and the (chunk, Lk) weights stay in the layout the matmul reads."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    q = jnp.pad(q, ((0, 0), (0, chunk * count - lq), (0, 0), (0, 0)))
    q_tiles = q.transpose(0, 2, 1, 3).reshape(b * h * count, chunk, d)
    k_heads, v_heads = (x.transpose(0, 2, 1, 3).reshape(b * h, lk, x.shape[-1]) for x in (k, v))
    if bias is not None:
        bias = jnp.broadcast_to(bias, (b, h, 1, lk)).reshape(b * h, lk).astype(jnp.float32)

    def tile(args):
        i, q_tile = args
        head = i // count
        logits = (q_tile @ k_heads[head].T).astype(jnp.float32) * scale
        if bias is not None:
            logits = logits + bias[head]
        if key_padding_mask is not None:
            logits = jnp.where(key_padding_mask[head // h], MASKED, logits)
        e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        return ((e.astype(v.dtype) @ v_heads[head]) / e.sum(-1, keepdims=True)).astype(v.dtype)

    out = jax.lax.map(tile, (jnp.arange(b * h * count), q_tiles))  # (b * h * count, chunk, dv)
    out = out.reshape(b, h, count * chunk, -1)[:, :, :lq]
    return out.transpose(0, 2, 1, 3)


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
