"""SAM's attention (``sam/transformer.py``: ``Attention`` and ``RoPEAttention``), batch-first.

Unlike ``torch.nn.MultiheadAttention`` it has separate ``q_proj``/``k_proj``/``v_proj``/``out_proj``
Linears, may project to a smaller internal width (``downsample_rate``) and may take keys/values of
another width (the memory attention's 64-dim memories). With ``rope_theta`` set, queries and the
first ``Nk - num_k_exclude_rope`` keys are rotated by a 2-D axial RoPE over the square grid the
queries lie on; the key table is the query table repeated once per memory frame.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from sam3_jax.nn import rope
from sam3_jax.nn.attention import attend, merge_heads, split_heads

def _rotate(x, angles, repeat: int = 1):
    """x (B, N, H, D): rotate every head with angles (N / repeat, D // 2)."""
    return jnp.swapaxes(rope.apply_rope(jnp.swapaxes(x, 1, 2), angles, repeat), 1, 2)


class Attention(nn.Module):
    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1
    dropout: float = 0.0
    rope_theta: float | None = None  # None: plain attention (two-way transformer)
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, q, k, v, key_padding_mask=None, num_k_exclude_rope: int = 0, deterministic: bool = True):
        """q (B, Nq, C); k, v (B, Nk, Ckv); key_padding_mask (B, Nk) True = ignore -> (B, Nq, C)."""
        internal = self.embedding_dim // self.downsample_rate
        q = split_heads(nn.Dense(internal, name="q_proj", dtype=self.dtype)(q), self.num_heads)
        k = split_heads(nn.Dense(internal, name="k_proj", dtype=self.dtype)(k), self.num_heads)
        v = split_heads(nn.Dense(internal, name="v_proj", dtype=self.dtype)(v), self.num_heads)
        if self.rope_theta is not None:
            nq, nk_rope = q.shape[1], k.shape[1] - num_k_exclude_rope
            side = math.isqrt(nq)
            if side * side != nq or nk_rope % nq:
                raise ValueError(f"RoPE attention needs a square query grid and whole key frames, got "
                                 f"{nq} queries and {nk_rope} rotated keys")
            angles = rope.axial_angles(q.shape[-1], side, side, self.rope_theta)
            q = _rotate(q, angles)
            k = jnp.concatenate([_rotate(k[:, :nk_rope], angles, nk_rope // nq), k[:, nk_rope:]], axis=1)
        rng = None if deterministic or self.dropout == 0.0 else self.make_rng("dropout")
        out = attend(q, k, v, None, key_padding_mask, dropout_rate=self.dropout, dropout_rng=rng,
                     deterministic=deterministic)
        return nn.Dense(self.embedding_dim, name="out_proj", dtype=self.dtype)(merge_heads(out))
