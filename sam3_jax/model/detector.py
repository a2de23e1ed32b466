"""The SAM 3 detector (the reference's ``Sam3Image``): image + text/box prompts -> boxes, scores, masks.

Parameter tree (mirrors ``sam3.pt``'s ``detector.*``): ``backbone/{vision_backbone,
language_backbone}``, ``geometry_encoder``, ``transformer/{encoder,decoder}``,
``segmentation_head``, ``dot_prod_scoring``.

The forward is split the way training and video need it: ``encode_image`` once per frame,
``encode_text`` once per phrase, ``ground`` once per (frame, phrase) query with the query's image
features gathered by ``img_ids`` — all batch-first and with static shapes.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam3_jax.model import init
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.decoder import TransformerDecoder
from sam3_jax.model.encoder import TransformerEncoderFusion
from sam3_jax.model.geometry import SequenceGeometryEncoder
from sam3_jax.model.heads import DotProductScoring, UniversalSegmentationHead, detector_outputs
from sam3_jax.model.neck import Sam3DualViTDetNeck
from sam3_jax.model.text import VETextEncoder


class VLBackbone(nn.Module):
    """``backbone``: the vision backbone (trunk + necks) and the text encoder."""

    config: ModelConfig
    dtype: Any = None

    def setup(self):
        cfg = self.config
        self.vision_backbone = Sam3DualViTDetNeck(cfg.neck, cfg.vit, dtype=self.dtype)
        self.language_backbone = VETextEncoder(cfg.text, cfg.d_model, dtype=self.dtype)

    def forward_image(self, images, deterministic: bool = True):
        return self.vision_backbone(images, deterministic)

    def forward_text(self, token_ids, deterministic: bool = True):
        return self.language_backbone(token_ids, deterministic)


class Transformer(nn.Module):
    """``transformer``: the fusion encoder and the DETR decoder."""

    config: ModelConfig
    dtype: Any = None

    def setup(self):
        cfg = self.config
        self.encoder = TransformerEncoderFusion(cfg.encoder, cfg.d_model, dtype=self.dtype)
        self.decoder = TransformerDecoder(cfg.decoder, cfg.d_model, dtype=self.dtype)


class Sam3Detector(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg = self.config
        dtype = None if cfg.compute_dtype == "float32" else jnp.dtype(cfg.compute_dtype)
        self.backbone = VLBackbone(cfg, dtype=dtype)
        self.geometry_encoder = SequenceGeometryEncoder(cfg.geometry, cfg.d_model, dtype=dtype)
        self.transformer = Transformer(cfg, dtype=dtype)
        self.segmentation_head = UniversalSegmentationHead(cfg.d_model, cfg.seg.num_heads, dtype=dtype)
        self.dot_prod_scoring = DotProductScoring(cfg.d_model, cfg.d_model, cfg.decoder.scoring_mlp_dim,
                                                  dropout=cfg.decoder.dropout, dtype=dtype)

    def encode_image(self, images, deterministic: bool = True) -> dict:
        """images (N, S, S, 3) in [-1, 1] -> per-level features (see ``Sam3DualViTDetNeck``)."""
        return self.backbone.forward_image(images, deterministic)

    def encode_text(self, token_ids, deterministic: bool = True):
        """token_ids (P, 32) -> (features (P, 32, C), padding mask (P, 32))."""
        return self.backbone.forward_text(token_ids, deterministic)

    def ground(self, image_feats: dict, text_feats, text_mask, boxes, box_mask, box_labels, *,
               img_ids=None, points=None, point_mask=None, point_labels=None, train: bool = False,
               deterministic: bool = True) -> dict:
        """One detection query per row: B queries with their text (B, 32, C) and geometry prompts.

        ``image_feats`` comes from ``encode_image``; ``img_ids`` (B,) picks each query's image (None:
        query b uses image b). Boxes (B, Nb, 4) normalised cxcywh with ``box_mask`` True at padding
        and ``box_labels`` 1 (positive) / 0 (negative); points likewise (optional).
        """
        fpn = image_feats["backbone_fpn"]
        pos = image_feats["vision_pos_enc"]
        if img_ids is not None:
            fpn = [jnp.take(f, img_ids, axis=0) for f in fpn]
            pos = [jnp.take(p, img_ids, axis=0) for p in pos]
        b = text_feats.shape[0]
        if points is None:
            points = jnp.zeros((b, 0, 2), jnp.float32)
            point_mask = jnp.zeros((b, 0), bool)
            point_labels = jnp.zeros((b, 0), jnp.int32)
        img, img_pos = fpn[-1], pos[-1]
        geo, geo_mask = self.geometry_encoder(boxes, box_mask, box_labels, points, point_mask, point_labels,
                                              img, img_pos, deterministic=deterministic)
        prompt = jnp.concatenate([text_feats.astype(geo.dtype), geo], axis=1)
        prompt_mask = jnp.concatenate([text_mask, geo_mask], axis=1)

        h, w = img.shape[1:3]
        src = img.reshape(b, h * w, -1)
        src_pos = img_pos.reshape(b, h * w, -1)
        memory = self.transformer.encoder(src, src_pos, prompt, prompt_mask, deterministic=deterministic)
        dec = self.transformer.decoder(memory, src_pos, (h, w), prompt, prompt_mask, train=train,
                                       deterministic=deterministic)
        logits = self.dot_prod_scoring(dec.hs, prompt, prompt_mask, deterministic=deterministic)
        pred_masks, semantic_seg = self.segmentation_head(fpn, memory, dec.hs[-1], prompt, prompt_mask)
        out = detector_outputs(dec, logits, self.config.decoder.num_queries, train=train,
                               joint_box_scores=self.config.joint_box_scores, pred_masks=pred_masks,
                               semantic_seg=semantic_seg)
        out["encoder_hidden_states"] = memory
        return out

    def __call__(self, images, token_ids, boxes, box_mask, box_labels, *, train: bool = False,
                 deterministic: bool = True) -> dict:
        """One prompt per image: images (B, S, S, 3), token_ids (B, 32), boxes (B, Nb, 4) ..."""
        feats = self.encode_image(images, deterministic)
        text, text_mask = self.encode_text(token_ids, deterministic)
        return self.ground(feats, text, text_mask, boxes, box_mask, box_labels, train=train,
                           deterministic=deterministic)


def example_inputs(cfg: ModelConfig, batch: int = 1, num_boxes: int = 1):
    s = cfg.image_size
    return (jnp.zeros((batch, s, s, 3), jnp.float32), jnp.zeros((batch, cfg.text.context_length), jnp.int32),
            jnp.zeros((batch, num_boxes, 4), jnp.float32), jnp.ones((batch, num_boxes), bool),
            jnp.zeros((batch, num_boxes), jnp.int32))


def abstract_params(cfg: ModelConfig):
    """The parameter tree's shapes and dtypes, without allocating it."""
    model = Sam3Detector(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(cfg)))["params"]


def init_params(cfg: ModelConfig, rng):
    """Random parameters initialised as the reference's modules are (`init.reference_init`), drawn
    from the parameter shapes alone, so no module ``init`` (a traced forward pass) is compiled: that,
    with one random draw per leaf, was far slower to compile (benchmarks/README.md)."""
    abstract = abstract_params(cfg)
    return jax.jit(lambda r: init.reference_init(abstract, r))(rng)
