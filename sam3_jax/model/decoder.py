"""The DETR decoder with a presence token, box-relative position bias and box refinement
(docs/reference_model.md, 'Decoder').

Batch-first: queries (B, Q, C), memory (B, HW, C). The decoder sequence is
``[presence, o2o queries..., o2m queries...]``: the presence token (if any) sits at index 0 with a
zero query position and a zero boxRPB row; in training with DAC the queries are doubled and the
one-to-many half skips self-attention. Every layer refines the boxes: the next layer sees the new
boxes with the gradient stopped, while the per-layer predictions keep it ("look forward twice").
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax.model.config import DecoderConfig
from sam3_jax.nn.attention import MultiheadAttention
from sam3_jax.nn.boxes import box_cxcywh_to_xyxy
from sam3_jax.nn.layers import MLP, LayerNorm
from sam3_jax.nn.position import sine_embed_for_position
from sam3_jax.nn.repeat import unroll, varying_like


def inverse_sigmoid(x, eps: float = 1e-3):
    """The reference's clamped logit: log(max(x, eps) / max(1 - x, eps)) with x clipped to [0, 1]."""
    x = jnp.clip(x, 0.0, 1.0)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


class DecoderOutput(NamedTuple):
    """Per-layer decoder outputs (L layers, Q' = Q, or 2Q with DAC in training)."""

    hs: jax.Array  # (L, B, Q', C) queries after the shared output norm
    ref_boxes: jax.Array  # (L, B, Q', 4) cxcywh boxes each layer started from (un-detached)
    pred_boxes: jax.Array  # (L, B, Q', 4) cxcywh boxes each layer predicts
    presence_logits: jax.Array | None  # (L, B, 1), unclamped as in the reference
    presence_feats: jax.Array | None  # (B, 1, C) the last layer's raw presence token


class TransformerDecoderLayer(nn.Module):
    """Post-norm layer: self-attention (``norm2``), text cross-attention (``catext_norm``), image
    cross-attention with an additive bias (``norm1``), then a float32 ReLU FFN (``norm3``)."""

    d_model: int
    num_heads: int
    dim_feedforward: int
    dropout: float = 0.1
    dtype: Any = None

    @nn.compact
    def __call__(self, tgt, query_pos, memory, memory_pos, prompt, prompt_mask, cross_bias,
                 num_self: int, deterministic: bool = True):
        """tgt, query_pos (B, N, C); memory, memory_pos (B, HW, C); prompt (B, Lp, C);
        prompt_mask (B, Lp) True = padding; cross_bias (B, heads, N, HW) or None.

        Only the first ``num_self`` tokens take part in self-attention (the others are the DAC
        one-to-many queries); ``norm2`` still applies to all of them.
        """

        def drop(x):
            return nn.Dropout(self.dropout)(x, deterministic=deterministic)

        def attention(name):
            return MultiheadAttention(self.d_model, self.num_heads, self.dropout, dtype=self.dtype, name=name)

        head, tail = tgt[:, :num_self], tgt[:, num_self:]
        q = head + query_pos[:, :num_self]
        head = head + drop(attention("self_attn")(q, q, head, deterministic=deterministic))
        tgt = LayerNorm(name="norm2", dtype=self.dtype)(jnp.concatenate([head, tail], axis=1))

        t2 = attention("ca_text")(tgt + query_pos, prompt, prompt, key_padding_mask=prompt_mask,
                                  deterministic=deterministic)
        tgt = LayerNorm(name="catext_norm", dtype=self.dtype)(tgt + drop(t2))

        t2 = attention("cross_attn")(tgt + query_pos, memory + memory_pos, memory, attn_bias=cross_bias,
                                     deterministic=deterministic)
        tgt = LayerNorm(name="norm1", dtype=self.dtype)(tgt + drop(t2))

        # The reference runs the FFN with autocast disabled: float32 whatever the compute dtype.
        t32 = tgt.astype(jnp.float32)
        t2 = drop(jax.nn.relu(nn.Dense(self.dim_feedforward, name="linear1", dtype=jnp.float32)(t32)))
        t2 = nn.Dense(self.d_model, name="linear2", dtype=jnp.float32)(t2)
        return LayerNorm(name="norm3", dtype=self.dtype)(t32 + drop(t2))


class TransformerDecoder(nn.Module):
    """``transformer.decoder``: ``layers_scan/layers_0`` (the layers, stacked; torch ``layers.{i}``),
    ``norm``, ``query_embed``, ``reference_points``, ``bbox_embed``, ``ref_point_head``,
    ``boxRPB_embed_{x,y}`` and the presence token with its ``presence_token_head`` /
    ``presence_token_out_norm``.

    The layers run as one scan, but not through ``nn.repeat``: between two layers the decoder's own
    heads (box refinement, query positions, boxRPB, presence) run on the stream, so each step needs
    the layer's slice of the stacked parameters and the heads' parameters whole. Flax's
    ``nn.scan`` splits variables by collection, not by module, so the heads are broadcast
    (``variable_broadcast``) and the stacked layer parameters are the scan's input, applied to an
    unbound layer."""

    config: DecoderConfig = DecoderConfig()
    d_model: int = 256
    dtype: Any = None

    def setup(self):
        cfg, c = self.config, self.d_model
        if cfg.box_rpb not in ("none", "log", "linear", "both"):
            raise ValueError(f"unknown box_rpb mode {cfg.box_rpb!r}")
        self.layers_scan = self.param("layers_scan", self._init_stacked_layers)
        self.norm = LayerNorm(dtype=self.dtype)
        self.query_embed = nn.Embed(cfg.num_queries, c)
        self.reference_points = nn.Embed(cfg.num_queries, 4)
        self.bbox_embed = MLP(c, 4, 3, dtype=self.dtype)
        self.ref_point_head = MLP(c, c, 2, dtype=self.dtype)
        if cfg.box_rpb != "none":
            self.boxRPB_embed_x = MLP(c, cfg.num_heads, 2, dtype=self.dtype)
            self.boxRPB_embed_y = MLP(c, cfg.num_heads, 2, dtype=self.dtype)
        if cfg.presence_token:
            self.presence_token = nn.Embed(1, c)
            self.presence_token_head = MLP(c, 1, 3, dtype=self.dtype)
            self.presence_token_out_norm = LayerNorm(dtype=self.dtype)

    def box_rpb(self, boxes, hw: tuple[int, int]):
        """Box-relative position bias: (B, N, 4) cxcywh -> (B, heads, N, H*W).

        Per head, the bias of grid cell (y, x) is an MLP of its offsets to the box's two y edges
        plus an MLP of its offsets to the two x edges; the grid is the cells' left/top edges
        arange(n) / n. "log" squashes offsets as sign(8d) log2(|8d| + 1) / 3.
        """
        mode = self.config.box_rpb
        h, w = hw
        x0, y0, x1, y1 = (box_cxcywh_to_xyxy(boxes)[..., i] for i in range(4))

        def offsets(n, lo, hi):  # (B, N, n, 2 or 4)
            grid = jnp.asarray(np.arange(n, dtype=np.float32) / np.float32(n))
            d = grid[None, None, :, None] - jnp.stack([lo, hi], axis=-1)[:, :, None, :]
            if mode == "linear":
                return d
            d_log = jnp.sign(8 * d) * jnp.log2(jnp.abs(8 * d) + 1.0) / np.float32(3.0)
            return d_log if mode == "log" else jnp.concatenate([d, d_log], axis=-1)

        heads = self.config.num_heads
        by = self.boxRPB_embed_y(offsets(h, y0, y1))  # (B, N, H, heads)
        bx = self.boxRPB_embed_x(offsets(w, x0, x1))  # (B, N, W, heads)
        bias = by[:, :, :, None, :] + bx[:, :, None, :, :]
        b, n = boxes.shape[:2]
        return bias.reshape(b, n, h * w, heads).transpose(0, 3, 1, 2)

    def __call__(self, memory, memory_pos, hw: tuple[int, int], prompt, prompt_mask, train: bool = False,
                 deterministic: bool = True) -> DecoderOutput:
        """memory, memory_pos (B, H*W, C) with ``hw`` = (H, W); prompt (B, Lp, C); prompt_mask (B, Lp)
        True = padding. ``train`` turns on DAC (if configured): 2Q queries, the second half o2m."""
        cfg = self.config
        b, c = memory.shape[0], self.d_model
        copies = 2 if (train and cfg.dac) else 1
        num_q = copies * cfg.num_queries
        tgt = jnp.broadcast_to(jnp.tile(self.query_embed.embedding, (copies, 1)), (b, num_q, c))
        ref = jax.nn.sigmoid(jnp.tile(self.reference_points.embedding, (copies, 1)))
        ref = jnp.broadcast_to(ref, (b, num_q, 4)).astype(jnp.float32)
        presence = None
        if cfg.presence_token:
            presence = jnp.broadcast_to(self.presence_token.embedding, (b, 1, c))
        num_extra = 0 if presence is None else 1
        num_self = num_extra + cfg.num_queries

        # The carry (tgt, ref, ref_kept, presence): `ref` feeds the next layer (gradient stopped after
        # layer 0); `ref_kept` keeps the gradient for the per-layer box predictions. A scan's carry
        # keeps its dtype: the stream as the layers return it.
        inputs = (memory, memory_pos, prompt, prompt_mask)
        stream = jnp.result_type(self.dtype or jnp.float32)
        carry = (tgt.astype(stream), ref, ref, None if presence is None else presence.astype(stream))
        carry = varying_like(carry, memory)
        carry, outs = self._scan_layers(carry, inputs, hw, num_self, deterministic)
        hs, ref_boxes, pred_boxes, presence_logits = outs
        return DecoderOutput(hs=hs, ref_boxes=ref_boxes, pred_boxes=pred_boxes, presence_logits=presence_logits,
                             presence_feats=carry[3])

    def _layer_step(self, carry, layer, inputs, hw):
        """One layer and the shared heads around it: query positions and boxRPB from the current
        boxes, the layer, the refined boxes and the presence logit. -> (carry, this layer's outputs)."""
        tgt, ref, ref_kept, presence = carry
        memory, memory_pos, prompt, prompt_mask = inputs
        query_pos = self.ref_point_head(sine_embed_for_position(ref, self.d_model))
        bias = None if self.config.box_rpb == "none" else self.box_rpb(ref, hw)
        seq = tgt
        if presence is not None:
            seq = jnp.concatenate([presence, tgt], axis=1)
            query_pos = jnp.concatenate([jnp.zeros_like(query_pos[:, :1]), query_pos], axis=1)
            if bias is not None:
                bias = jnp.pad(bias, ((0, 0), (0, 0), (1, 0), (0, 0)))
        out = layer(seq, query_pos, memory, memory_pos, prompt, prompt_mask, bias)
        num_extra = 0 if presence is None else 1
        normed = self.norm(out[:, num_extra:])
        delta = self.bbox_embed(normed).astype(jnp.float32)
        new_ref = jax.nn.sigmoid(delta + inverse_sigmoid(ref))
        pred = jax.nn.sigmoid(inverse_sigmoid(ref_kept) + delta)
        logit = None
        if presence is not None:
            presence = out[:, :1]
            logit = self.presence_token_head(self.presence_token_out_norm(presence))[:, 0].astype(jnp.float32)
        return (out[:, num_extra:], jax.lax.stop_gradient(new_ref), new_ref, presence), (normed, ref_kept, pred, logit)

    def _layer_def(self) -> TransformerDecoderLayer:
        """The layer as an unbound module, applied functionally to each slice of ``layers_scan``."""
        cfg = self.config
        return TransformerDecoderLayer(self.d_model, cfg.num_heads, cfg.dim_feedforward, cfg.dropout,
                                       dtype=self.dtype, parent=None)

    def _init_stacked_layers(self, rng):
        """Every layer's parameters, stacked: one init per layer on tiny inputs (a layer's
        parameters do not depend on sequence lengths)."""
        c = self.d_model
        tokens, memory = jnp.zeros((1, 2, c)), jnp.zeros((1, 3, c))
        args = (tokens, tokens, memory, memory, jnp.zeros((1, 1, c)), jnp.zeros((1, 1), bool), None, 2)
        layers = jax.vmap(lambda r: self._layer_def().init(r, *args)["params"])(
            jax.random.split(rng, self.config.num_layers))
        return {"layers_0": layers}

    def _scan_layers(self, carry, inputs, hw, num_self: int, deterministic: bool):
        """The layers as one ``nn.scan`` over ``layers_scan`` (each step its slice of the stacked
        layer parameters; the heads' parameters broadcast)."""
        layer_def = self._layer_def()

        def apply_layer(params, rng, *args):
            rngs = None if deterministic else {"dropout": rng}
            return layer_def.apply({"params": params}, *args, num_self, deterministic, rngs=rngs)

        if self.config.remat:
            apply_layer = jax.checkpoint(apply_layer, prevent_cse=False)

        def body(module, carry, params):
            rng = None if deterministic else module.make_rng("dropout")
            return module._layer_step(carry, lambda *args: apply_layer(params, rng, *args), inputs, hw)

        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                       length=self.config.num_layers, unroll=unroll(self.config.num_layers))
        return scan(self, carry, self.layers_scan["layers_0"])
