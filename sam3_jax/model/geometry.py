"""The geometry prompt encoder (the reference's ``geometry_encoder``, ``SequenceGeometryEncoder``;
docs/reference_model.md, 'Geometry encoder').

Boxes and points become one token each: a direct projection of the coordinates, a projection of
image features pooled at the prompt (RoIAlign 7x7 + a 7x7 VALID conv for boxes, a bilinear sample
for points) and a projection of the prompt's sine encoding, plus a positive/negative label
embedding. Tokens are ordered as the reference's right-padded concatenation (valid points, valid
boxes, the cls token, then padding) and refined by pre-norm layers that attend to each other and
to the 72² image tokens. Only the official configuration is built (every branch on, boxes not
encoded as corner points, no mask prompts).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sam3_jax.model import stacking
from sam3_jax.model.config import GeometryConfig
from sam3_jax.model.encoder import TransformerEncoderLayer
from sam3_jax.nn import layers, ops, position
from sam3_jax.nn.repeat import repeat
from sam3_jax.nn.boxes import box_cxcywh_to_xyxy


def compact_order(mask):
    """Stable permutation (B, L) putting valid tokens (mask False) first, in their order.

    On right-padded pieces concatenated along L this is the reference's ``concat_padded_sequences``.
    """
    return jnp.argsort(mask, axis=-1, stable=True)


class SequenceGeometryEncoder(nn.Module):
    """Box and point prompts -> (geo_feats (B, Np + Nb + 1, d_model), geo_mask (B, Np + Nb + 1)).

    Inputs, batch-first, True = padding in the masks:
      boxes (B, Nb, 4) normalised cxcywh, box_mask (B, Nb), box_labels (B, Nb) int (1 pos, 0 neg);
      points (B, Np, 2) normalised xy, point_mask (B, Np), point_labels (B, Np);
      img_feat, img_pos (B, H, W, d_model): the coarsest backbone level and its sine encoding.
    Valid tokens come first (points, boxes, cls), as in the reference; padded slots hold finite
    values that no consumer should read. Nb or Np may be 0 (the cls token is always there).
    Param tree: ``label_embed``, ``cls_embed``, ``points_{direct,pool,pos_enc}_project``,
    ``boxes_{direct,pool,pos_enc}_project``, ``final_proj``, ``norm``, ``img_pre_norm``,
    ``encode_scan/encode_0`` (the layers, scanned; torch ``encode.{i}``), ``encode_norm``.
    """

    config: GeometryConfig
    d_model: int
    dtype: Any = None

    def _dense(self, name):
        return nn.Dense(self.d_model, name=name, dtype=self.dtype)

    @nn.compact
    def __call__(self, boxes, box_mask, box_labels, points, point_mask, point_labels, img_feat, img_pos,
                 deterministic: bool = True):
        cfg, d = self.config, self.d_model
        b, h, w, _ = img_feat.shape
        box_mask, point_mask = box_mask.astype(bool), point_mask.astype(bool)
        # Padded entries may hold anything (labels -1, NaN boxes): give them harmless values.
        boxes = jnp.where(box_mask[..., None], 0.0, boxes).astype(jnp.float32)
        points = jnp.where(point_mask[..., None], 0.0, points).astype(jnp.float32)
        box_labels = jnp.where(box_mask, 0, box_labels)
        point_labels = jnp.where(point_mask, 0, point_labels)
        label_embed = nn.Embed(2, d, name="label_embed", dtype=self.dtype)

        # Pooling reads layer-normed features; cross-attention below reads the raw ones.
        pooled_feat = layers.LayerNorm(name="img_pre_norm", dtype=self.dtype)(img_feat)

        sampled = ops.grid_sample(pooled_feat, points * 2.0 - 1.0)
        enc_x, enc_y = position.encode_xy(points[..., 0], points[..., 1], d)
        point_tokens = (self._dense("points_direct_project")(points)
                        + self._dense("points_pool_project")(sampled)
                        + self._dense("points_pos_enc_project")(jnp.concatenate([enc_x, enc_y], -1))
                        + label_embed(point_labels))

        scale = jnp.asarray([w, h, w, h], jnp.float32)
        rois = ops.roi_align(pooled_feat, box_cxcywh_to_xyxy(boxes) * scale, cfg.roi_size)
        n_boxes = boxes.shape[1]
        rois = rois.reshape(b * n_boxes, cfg.roi_size, cfg.roi_size, pooled_feat.shape[-1])
        pooled = nn.Conv(d, (cfg.roi_size, cfg.roi_size), padding="VALID", name="boxes_pool_project",
                         dtype=self.dtype)(rois).reshape(b, n_boxes, d)
        box_tokens = (self._dense("boxes_direct_project")(boxes)
                      + pooled
                      + self._dense("boxes_pos_enc_project")(position.encode_boxes(boxes, d))
                      + label_embed(box_labels))

        cls = nn.Embed(1, d, name="cls_embed", dtype=self.dtype)(jnp.zeros((b, 1), jnp.int32))
        tokens = jnp.concatenate([point_tokens, box_tokens, cls.astype(box_tokens.dtype)], axis=1)
        mask = jnp.concatenate([point_mask, box_mask, jnp.zeros((b, 1), bool)], axis=1)
        order = compact_order(mask)
        tokens = jnp.take_along_axis(tokens, order[..., None], axis=1)
        mask = jnp.take_along_axis(mask, order, axis=1)

        x = layers.LayerNorm(name="norm", dtype=self.dtype)(self._dense("final_proj")(tokens))
        memory = img_feat.reshape(b, h * w, -1)
        memory_pos = img_pos.reshape(b, h * w, -1)
        make = functools.partial(TransformerEncoderLayer, d, cfg.num_heads, cfg.dim_feedforward, cfg.dropout,
                                 dtype=self.dtype)
        # (tgt, memory, tgt_key_padding_mask, memory_key_padding_mask, pos, query_pos, deterministic)
        x = repeat([make], cfg.num_layers, stacking.GEOMETRY.prefix, stacking.GEOMETRY.stacked,
                   x, memory, mask, None, memory_pos, None, deterministic)
        return layers.LayerNorm(name="encode_norm", dtype=self.dtype)(x), mask
