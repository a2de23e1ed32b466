"""SAM's mask decoder (``sam/mask_decoder.py:MaskDecoder`` + ``sam/transformer.py:TwoWayTransformer``),
docs/reference_model.md, 'Tracker', step 3, as the tracker builds it: high-resolution features, object-score token and
MLP head, IoU head with sigmoid, multimask tokens for the object pointer, dynamic multimask via
stability at eval.

Output tokens are [obj_score, iou, mask_0..3] followed by the sparse prompts. Prompt tokens may be
padding (static shapes): they are masked out as keys, so the outputs equal the reference's on the
valid prompts only. Masks are (B, M, 4h, 4w) logits (one map per mask token, no channel axis).

``conv_s0``/``conv_s1`` live here (as in the reference) but are applied once per frame to the
backbone's two high-resolution levels by ``project_high_res``, outside the per-object decoder.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam3_jax.model.tracker.attention import Attention
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.nn.layers import MLP, ConvTranspose2x2, LayerNorm, LayerNorm2d, gelu


class MLPBlock(nn.Module):
    """``sam/common.py:MLPBlock``: lin2(ReLU(lin1(x)))."""

    dim: int
    mlp_dim: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(self.mlp_dim, name="lin1", dtype=self.dtype)(x))
        return nn.Dense(self.dim, name="lin2", dtype=self.dtype)(x)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, tokens -> image, token MLP, image -> tokens; post-norm."""

    dim: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int
    skip_first_layer_pe: bool
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe, token_padding_mask):
        def attention(name, rate=1):
            return Attention(self.dim, self.num_heads, downsample_rate=rate, dtype=self.dtype, name=name)

        def norm(name):
            return LayerNorm(name=name, dtype=self.dtype)

        if self.skip_first_layer_pe:
            queries = attention("self_attn")(queries, queries, queries, token_padding_mask)
        else:
            q = queries + query_pe
            queries = queries + attention("self_attn")(q, q, queries, token_padding_mask)
        queries = norm("norm1")(queries)
        out = attention("cross_attn_token_to_image", self.downsample_rate)(queries + query_pe, keys + key_pe, keys)
        queries = norm("norm2")(queries + out)
        queries = norm("norm3")(queries + MLPBlock(self.dim, self.mlp_dim, dtype=self.dtype, name="mlp")(queries))
        out = attention("cross_attn_image_to_token", self.downsample_rate)(keys + key_pe, queries + query_pe, queries,
                                                                         token_padding_mask)
        keys = norm("norm4")(keys + out)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Params ``layers_{i}``, ``final_attn_token_to_image``, ``norm_final_attn``."""

    depth: int
    dim: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, image, image_pe, tokens, token_padding_mask=None):
        """image (B, HW, C), image_pe (B or 1, HW, C), tokens (B, N, C) -> (tokens, image) updated."""
        queries, keys = tokens, image
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(self.dim, self.num_heads, self.mlp_dim, self.downsample_rate,
                                                 skip_first_layer_pe=i == 0, dtype=self.dtype, name=f"layers_{i}")(
                queries, keys, tokens, image_pe, token_padding_mask)
        out = Attention(self.dim, self.num_heads, downsample_rate=self.downsample_rate, dtype=self.dtype,
                        name="final_attn_token_to_image")(queries + tokens, keys + image_pe, keys)
        return LayerNorm(name="norm_final_attn", dtype=self.dtype)(queries + out), keys


def stability_scores(mask_logits, delta: float):
    """IoU of {logit > delta} and {logit > -delta} per mask (1 when both are empty). (..., H, W) -> (...)."""
    area_i = jnp.sum(mask_logits > delta, axis=(-2, -1)).astype(jnp.float32)
    area_u = jnp.sum(mask_logits > -delta, axis=(-2, -1)).astype(jnp.float32)
    return jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1.0), 1.0)


def best_multimask_index(iou):
    """Index (B,) of the multimask token (1..M) with the highest predicted IoU (first on ties)."""
    return jnp.argmax(iou[:, 1:], axis=-1).astype(jnp.int32) + 1


class MaskDecoder(nn.Module):
    """Params ``transformer``, ``iou_token``, ``mask_tokens``, ``obj_score_token``, ``output_upscaling_{0,1,3}``,
    ``conv_s0``, ``conv_s1``, ``output_hypernetworks_mlps_{i}``, ``iou_prediction_head``,
    ``pred_obj_score_head``. Initialise through a function that calls both ``project_high_res`` and
    ``__call__`` (the tracker does) so that every parameter is created."""

    cfg: TrackerConfig
    dtype: jnp.dtype | None = None

    def setup(self):
        cfg, c = self.cfg, self.cfg.d_model
        self.transformer = TwoWayTransformer(cfg.two_way_depth, c, cfg.two_way_heads, cfg.two_way_mlp,
                                             cfg.attention_downsample_rate, dtype=self.dtype)
        self.obj_score_token = nn.Embed(1, c)
        self.iou_token = nn.Embed(1, c)
        self.mask_tokens = nn.Embed(cfg.num_mask_tokens, c)
        # Sequential(ConvT, LN2d, GELU, ConvT, GELU): torch indices kept.
        self.output_upscaling = {0: ConvTranspose2x2(c // 4, dtype=self.dtype), 1: LayerNorm2d(dtype=self.dtype),
                                 3: ConvTranspose2x2(c // 8, dtype=self.dtype)}
        self.conv_s0 = nn.Conv(c // 8, (1, 1), dtype=self.dtype)
        self.conv_s1 = nn.Conv(c // 4, (1, 1), dtype=self.dtype)
        self.output_hypernetworks_mlps = [MLP(c, c // 8, 3, dtype=self.dtype) for _ in range(cfg.num_mask_tokens)]
        self.iou_prediction_head = MLP(cfg.iou_head_hidden, cfg.num_mask_tokens, cfg.iou_head_depth,
                                       sigmoid_output=True, dtype=self.dtype)
        self.pred_obj_score_head = MLP(c, 1, 3, dtype=self.dtype)

    def project_high_res(self, feat_s0, feat_s1):
        """The backbone's 4x and 2x levels (B, 4h, 4w, C), (B, 2h, 2w, C) -> C/8 and C/4 channels."""
        return self.conv_s0(feat_s0), self.conv_s1(feat_s1)

    def predict_masks(self, image_embeddings, image_pe, sparse, dense, high_res_features, sparse_padding_mask=None):
        """All mask tokens: masks (B, M+1, 4h, 4w), iou (B, M+1), mask tokens (B, M+1, C), object score (B, 1)."""
        b, h, w, c = image_embeddings.shape
        out_tokens = jnp.concatenate([self.obj_score_token.embedding, self.iou_token.embedding,
                                      self.mask_tokens.embedding], axis=0)
        out_tokens = jnp.broadcast_to(out_tokens, (b,) + out_tokens.shape)
        tokens = jnp.concatenate([out_tokens, sparse.astype(out_tokens.dtype)], axis=1)
        token_mask = None
        if sparse_padding_mask is not None:
            token_mask = jnp.concatenate([jnp.zeros(out_tokens.shape[:2], bool), sparse_padding_mask], axis=1)
        src = (image_embeddings + dense).reshape(b, h * w, c)
        pos = jnp.reshape(image_pe, (-1, h * w, c))
        hs, src = self.transformer(src, pos, tokens, token_mask)
        n = self.cfg.num_mask_tokens
        mask_tokens_out = hs[:, 2:2 + n]

        feat_s0, feat_s1 = high_res_features
        up = self.output_upscaling
        x = gelu(up[1](up[0](src.reshape(b, h, w, c)) + feat_s1))
        x = gelu(up[3](x) + feat_s0)
        hyper = jnp.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1)
        masks = jnp.einsum("bmc,byxc->bmyx", hyper, x)
        iou_pred = self.iou_prediction_head(hs[:, 1])
        object_score_logits = self.pred_obj_score_head(hs[:, 0])
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def single_mask_index(self, masks, iou, deterministic: bool):
        """The mask token a single-mask output uses, (B,): token 0, or at eval (dynamic multimask via
        stability) the best-IoU multimask token where token 0's mask is unstable."""
        cfg = self.cfg
        if not (cfg.dynamic_multimask_via_stability and deterministic):
            return jnp.zeros(masks.shape[:1], jnp.int32)
        stable = stability_scores(masks[:, 0], cfg.stability_delta) >= cfg.stability_thresh
        return jnp.where(stable, 0, best_multimask_index(iou))

    def __call__(self, image_embeddings, image_pe, sparse, dense, high_res_features, *, multimask_output: bool,
                 sparse_padding_mask=None, deterministic: bool = True):
        """image_embeddings, dense (B, h, w, C); image_pe (h, w, C) (``PromptEncoder.get_dense_pe``);
        sparse (B, N, C) with ``sparse_padding_mask`` (B, N) True = padding; high_res_features: the
        ``project_high_res`` outputs. ``deterministic`` is the reference's eval mode: only then does a
        single-mask output fall back to the best multimask output when token 0 is unstable.

        Returns (masks (B, M, 4h, 4w), iou (B, M), sam tokens for the object pointer (B, T, C),
        object score logits (B, 1)); M = T = 3 for multimask output, else 1.
        """
        masks, iou, tokens, obj = self.predict_masks(image_embeddings, image_pe, sparse, dense, high_res_features,
                                                     sparse_padding_mask)
        if multimask_output:
            out_masks, out_iou = masks[:, 1:], iou[:, 1:]
        else:
            idx = self.single_mask_index(masks, iou, deterministic)
            out_masks = jnp.take_along_axis(masks, idx[:, None, None, None], axis=1)
            out_iou = jnp.take_along_axis(iou, idx[:, None], axis=1)
        use_multimask_tokens = multimask_output and self.cfg.use_multimask_token_for_obj_ptr
        return out_masks, out_iou, tokens[:, 1:] if use_multimask_tokens else tokens[:, :1], obj
