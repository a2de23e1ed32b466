"""Heads on the decoder's queries: dot-product scoring, the segmentation head, and the output dict.

See docs/reference_model.md, 'Scoring and segmentation head'. Channels-last: FPN maps are (B, H, W, C); mask
logits come out (B, Q, H, W) at the finest FPN level and the semantic map (B, H, W, 1).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax.model.decoder import DecoderOutput, inverse_sigmoid
from sam3_jax.nn.attention import MultiheadAttention
from sam3_jax.nn import ops
from sam3_jax.nn.boxes import box_cxcywh_to_xyxy
from sam3_jax.nn.layers import MLP, LayerNorm


def masked_mean(x, pad_mask):
    """Mean of (B, L, C) over the tokens where ``pad_mask`` (B, L) is False; all-padding rows give 0."""
    valid = (~pad_mask).astype(x.dtype)[..., None]
    return (x * valid).sum(axis=1) / jnp.maximum(valid.sum(axis=1), 1.0)


class DotProductScoring(nn.Module):
    """``dot_prod_scoring``: logit = <hs_proj(hs), prompt_proj(mean(prompt_mlp(prompt)))> / sqrt(d_proj).

    The prompt MLP is residual with an output LayerNorm; the mean runs over the valid prompt tokens
    (text, geometry and cls alike). Logits are clamped to +-``clamp``.
    """

    d_model: int = 256
    d_proj: int = 256
    mlp_dim: int = 2048
    dropout: float = 0.1
    clamp: float = 12.0
    dtype: Any = None

    @nn.compact
    def __call__(self, hs, prompt, prompt_mask, deterministic: bool = True):
        """hs (..., B, Q, C), prompt (B, Lp, C), prompt_mask (B, Lp) True = padding -> (..., B, Q, 1)."""
        prompt = MLP(self.mlp_dim, self.d_model, 2, dropout=self.dropout, residual=True, out_norm=True,
                     dtype=self.dtype, name="prompt_mlp")(prompt, deterministic=deterministic)
        pooled = nn.Dense(self.d_proj, name="prompt_proj", dtype=self.dtype)(masked_mean(prompt, prompt_mask))
        proj_hs = nn.Dense(self.d_proj, name="hs_proj", dtype=self.dtype)(hs)
        scores = jnp.einsum("...bqd,bd->...bq", proj_hs, pooled)[..., None].astype(jnp.float32)
        return jnp.clip(scores * np.float32(1.0 / np.sqrt(self.d_proj)), -self.clamp, self.clamp)


class PixelDecoder(nn.Module):
    """FPN-style top-down path: from the coarsest map, repeatedly upsample (nearest) onto the next
    finer map, add, then Conv3x3 -> GroupNorm(8) -> ReLU (``conv_layers_{i}``, ``norms_{i}``).

    Only ``len(feats) - 1`` stages exist; the reference builds one more that it never runs.
    """

    hidden_dim: int = 256
    dtype: Any = None

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array]):
        """feats: NHWC maps, finest first -> (B, H0, W0, hidden) at the finest level."""
        prev = feats[-1]
        for i, feat in enumerate(feats[-2::-1]):
            prev = feat + ops.resize_nearest(prev, feat.shape[1:3])
            prev = nn.Conv(self.hidden_dim, (3, 3), padding=((1, 1), (1, 1)), name=f"conv_layers_{i}",
                           dtype=self.dtype)(prev)
            prev = nn.GroupNorm(num_groups=8, epsilon=1e-5, use_fast_variance=False, name=f"norms_{i}",
                                dtype=self.dtype)(prev)
            prev = jax.nn.relu(prev)
        return prev


class MaskPredictor(nn.Module):
    """Mask logits = <mask_embed(query), pixel embedding> at every pixel."""

    hidden_dim: int = 256
    dtype: Any = None

    @nn.compact
    def __call__(self, queries, pixel_embed):
        """queries (B, Q, C), pixel_embed (B, H, W, C) -> (B, Q, H, W)."""
        embed = MLP(self.hidden_dim, self.hidden_dim, 3, dtype=self.dtype, name="mask_embed")(queries)
        return jnp.einsum("bqc,bhwc->bqhw", embed, pixel_embed)


class UniversalSegmentationHead(nn.Module):
    """``segmentation_head``: instance masks for every query plus a one-channel semantic map.

    The encoder memory first cross-attends to the prompt (residual, pre-norm ``cross_attn_norm``),
    then replaces the coarsest FPN level in the pixel decoder.
    """

    d_model: int = 256
    num_heads: int = 8
    dtype: Any = None

    @nn.compact
    def __call__(self, backbone_fpn: Sequence[jax.Array], encoder_memory, hs, prompt, prompt_mask):
        """backbone_fpn: NHWC maps finest..coarsest; encoder_memory (B, H*W, C) at the coarsest level;
        hs (B, Q, C) the last decoder layer; prompt (B, Lp, C), prompt_mask (B, Lp) True = padding.

        Returns (pred_masks (B, Q, Hf, Wf) logits, semantic_seg (B, Hf, Wf, 1) logits).
        """
        c = self.d_model
        q = LayerNorm(name="cross_attn_norm", dtype=self.dtype)(encoder_memory)
        memory = encoder_memory + MultiheadAttention(c, self.num_heads, 0.0, dtype=self.dtype,
                                                     name="cross_attend_prompt")(
            q, prompt, prompt, key_padding_mask=prompt_mask)
        b, (h, w) = memory.shape[0], backbone_fpn[-1].shape[1:3]
        feats = list(backbone_fpn[:-1]) + [memory.reshape(b, h, w, c)]
        pixel_embed = PixelDecoder(c, dtype=self.dtype, name="pixel_decoder")(feats)
        instance_embed = nn.Conv(c, (1, 1), name="instance_seg_head", dtype=self.dtype)(pixel_embed)
        pred_masks = MaskPredictor(c, dtype=self.dtype, name="mask_predictor")(hs, instance_embed)
        semantic_seg = nn.Conv(1, (1, 1), name="semantic_seg_head", dtype=self.dtype)(pixel_embed)
        return pred_masks, semantic_seg


def joint_logits(logits, presence_logits):
    """Video detector scores: logit(sigmoid(score) * sigmoid(presence)), clamped to +-10.

    logits (L, B, Q, 1), presence_logits (L, B, 1).
    """
    prob = jax.nn.sigmoid(logits) * jax.nn.sigmoid(presence_logits)[:, :, None, :]
    return jnp.clip(inverse_sigmoid(prob), -10.0, 10.0)


def detector_outputs(dec: DecoderOutput, logits, num_queries: int, *, train: bool, joint_box_scores: bool,
                     pred_masks=None, semantic_seg=None) -> dict:
    """The reference's output dict (``_update_scores_and_boxes`` + ``_run_segmentation_heads``).

    ``logits`` (L, B, Q', 1) from ``DotProductScoring`` on ``dec.hs``. Final-layer entries:
    ``pred_logits`` (B, Q, 1), ``pred_boxes`` (B, Q, 4) cxcywh, ``pred_boxes_xyxy``,
    ``presence_logit_dec`` (B, 1), ``presence_feats``, ``queries`` (B, Q, C); with DAC queries
    (Q' = 2Q) also ``*_o2m``. In training, ``aux_outputs`` holds the same per-layer entries for
    layers 0..L-2. ``pred_masks`` (B, Q', H, W) is split into o2o / o2m the same way (no aux masks).
    """
    if joint_box_scores:
        logits = joint_logits(logits, dec.presence_logits)
    num_o2m = dec.hs.shape[2] - num_queries
    per_layer = {}
    if dec.presence_logits is not None:
        per_layer["presence_logit_dec"] = dec.presence_logits
    heads = {"pred_logits": logits, "pred_boxes": dec.pred_boxes,
             "pred_boxes_xyxy": box_cxcywh_to_xyxy(dec.pred_boxes)}
    for name, value in heads.items():
        per_layer[name] = value[:, :, :num_queries]
        if num_o2m > 0:
            per_layer[f"{name}_o2m"] = value[:, :, num_queries:]
    out = {name: value[-1] for name, value in per_layer.items()}
    if train:
        out["aux_outputs"] = [{name: value[i] for name, value in per_layer.items()}
                              for i in range(dec.hs.shape[0] - 1)]
    out["queries"] = dec.hs[-1][:, :num_queries]
    if dec.presence_feats is not None:
        out["presence_feats"] = dec.presence_feats
    if pred_masks is not None:
        out["pred_masks"] = pred_masks[:, :num_queries]
        if num_o2m > 0:
            out["pred_masks_o2m"] = pred_masks[:, num_queries:]
    if semantic_seg is not None:
        out["semantic_seg"] = semantic_seg
    return out
