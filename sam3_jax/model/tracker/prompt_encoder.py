"""SAM's prompt encoder (``sam/prompt_encoder.py:PromptEncoder``, docs/reference_model.md, 'Tracker', step 3).

Sparse prompts are points in pixel coordinates of the input image with labels 0 (negative),
1 (positive), 2/3 (box top-left / bottom-right corners; the predictor turns a box into these two
points) and -1 ("not a point", a real token). A point is the random-Fourier encoding of its pixel
centre plus its label's embedding; -1 is ``not_a_point_embed`` alone. As in the tracker (which never
passes boxes separately), one "not a point" token is always appended.

Static shapes: points are padded to a fixed count; ``padding_mask`` (True = padding) marks slots that
are not prompts at all. Padded slots come out as zeros and their mask goes with the sparse tokens to
the mask decoder, whose attention ignores them, so the result equals the reference run on the real
points only. (A frame with no prompt at all is, in the reference, one real label -1 point: the
caller passes that as a valid slot.)

Dense prompt: a mask (B, 4h, 4w) through ``mask_downscaling`` where ``mask_valid``, else
``no_mask_embed`` everywhere.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.nn.layers import LayerNorm2d, gelu


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features: cat(sin, cos)(2 pi (2c - 1) @ G) for c in [0, 1]^2.

    ``positional_encoding_gaussian_matrix`` G (2, F) is a torch *buffer* (random at init, loaded from
    the checkpoint); here it is a parameter so it is converted and checkpointed. It is not meant to be
    trained: the optimizer must freeze it.
    """

    num_pos_feats: int

    @nn.compact
    def __call__(self, coords):
        """coords (..., 2) as (x, y) in [0, 1] -> (..., 2 * num_pos_feats), float32."""
        g = self.param("positional_encoding_gaussian_matrix", nn.initializers.normal(1.0), (2, self.num_pos_feats))
        c = 2.0 * coords.astype(jnp.float32) - 1.0
        # Two products summed elementwise: exact float32 whatever the backend's matmul precision.
        proj = 2.0 * math.pi * (c[..., :1] * g[0] + c[..., 1:] * g[1])
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class PromptEncoder(nn.Module):
    """Params ``pe_layer``, ``point_embeddings_{0..3}``, ``not_a_point_embed``, ``mask_downscaling_{0,1,3,4,6}``,
    ``no_mask_embed``. Initialise it with a mask input so that every parameter is created."""

    cfg: TrackerConfig
    dtype: jnp.dtype | None = None

    def setup(self):
        c, chans = self.cfg.d_model, self.cfg.mask_in_chans
        self.pe_layer = PositionEmbeddingRandom(c // 2)
        self.point_embeddings = [nn.Embed(1, c) for _ in range(4)]
        self.not_a_point_embed = nn.Embed(1, c)
        self.no_mask_embed = nn.Embed(1, c)
        # Sequential(Conv k2 s2, LN2d, GELU, Conv k2 s2, LN2d, GELU, Conv 1x1): torch indices kept.
        self.mask_downscaling = {
            0: nn.Conv(chans // 4, (2, 2), strides=2, padding="VALID", dtype=self.dtype),
            1: LayerNorm2d(dtype=self.dtype),
            3: nn.Conv(chans, (2, 2), strides=2, padding="VALID", dtype=self.dtype),
            4: LayerNorm2d(dtype=self.dtype),
            6: nn.Conv(c, (1, 1), dtype=self.dtype),
        }

    def get_dense_pe(self):
        """The encoding of every feature-grid cell centre, (h, w, d_model)."""
        n = self.cfg.grid
        centres = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
        xy = jnp.stack(jnp.meshgrid(centres, centres, indexing="xy"), axis=-1)  # (h, w, 2) as (x, y)
        return self.pe_layer(xy)

    def embed_points(self, coords, labels, padding_mask=None):
        """coords (B, N, 2) pixel (x, y); labels (B, N) int; padding_mask (B, N) True = padding.
        Returns (B, N + 1, C) with the appended "not a point" token, and its padding mask."""
        b = coords.shape[0]
        size = self.cfg.image_size
        pe = self.pe_layer((coords.astype(jnp.float32) + 0.5) / size)
        table = jnp.concatenate([e.embedding for e in self.point_embeddings], axis=0)  # (4, C)
        label_embed = table[jnp.clip(labels, 0, 3)]
        emb = jnp.where((labels >= 0)[..., None], pe + label_embed, self.not_a_point_embed.embedding[0])
        if padding_mask is None:
            padding_mask = jnp.zeros(labels.shape, bool)
        emb = jnp.where(padding_mask[..., None], 0.0, emb)
        pad_token = jnp.broadcast_to(self.not_a_point_embed.embedding, (b, 1, emb.shape[-1]))
        sparse = jnp.concatenate([emb, pad_token], axis=1)
        return sparse, jnp.concatenate([padding_mask, jnp.zeros((b, 1), bool)], axis=1)

    def embed_masks(self, masks):
        """masks (B, 4h, 4w) -> (B, h, w, C)."""
        expected = (self.cfg.low_res_mask_size,) * 2
        if masks.shape[1:] != expected:
            raise ValueError(f"mask prompts must be {expected}, got {masks.shape[1:]}")
        layers = self.mask_downscaling
        x = gelu(layers[1](layers[0](masks[..., None])))
        x = gelu(layers[4](layers[3](x)))
        return layers[6](x)

    def __call__(self, coords, labels, padding_mask=None, masks=None, mask_valid=None):
        """masks (B, 4h, 4w) optional, used where ``mask_valid`` (B,) (default: everywhere).
        Returns (sparse (B, N + 1, C), sparse_padding_mask (B, N + 1), dense (B, h, w, C))."""
        sparse, sparse_mask = self.embed_points(coords, labels, padding_mask)
        n = self.cfg.grid
        dense = jnp.broadcast_to(self.no_mask_embed.embedding[0], (coords.shape[0], n, n, self.cfg.d_model))
        if masks is not None:
            if mask_valid is None:
                mask_valid = jnp.ones(masks.shape[:1], bool)
            dense = jnp.where(mask_valid[:, None, None, None], self.embed_masks(masks), dense)
        return sparse, sparse_mask, dense
