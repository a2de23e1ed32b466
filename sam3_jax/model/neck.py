"""The dual SimpleFPN neck (the reference's ``necks.Sam3DualViTDetNeck``; docs/reference_model.md, 'Neck').

One trunk, two identical stacks of per-scale convs with separate weights: ``convs`` feed the
detector, ``sam2_convs`` the tracker. From the stride-14 trunk map each level is upsampled with
2x2 transposed convs (x4, x2) or used as is (x1), then projected by a 1x1 and a 3x3 conv. The
reference's fourth level (x0.5, max-pool) is dropped by the VL backbone (``scalp=1``) and is not
built here; the converter keeps its weights aside as dead (keymap ``DEAD``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sam3_jax.model.config import NeckConfig, ViTConfig
from sam3_jax.model.vit import ViT
from sam3_jax.nn import layers, position


class FpnLevel(nn.Module):
    """One SimpleFPN level (torch ``convs[i]``, an ``nn.Sequential``); submodule names follow it.

    x4: ``dconv_2x2_0`` -> GELU -> ``dconv_2x2_1``; x2: ``dconv_2x2``; x1: nothing. Then
    ``conv_1x1`` and ``conv_3x3`` (padding 1), both with bias, no norm or activation after.
    """

    scale: float
    d_model: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        if self.scale == 4.0:
            x = layers.ConvTranspose2x2(dim // 2, name="dconv_2x2_0", dtype=self.dtype)(x)
            x = layers.ConvTranspose2x2(dim // 4, name="dconv_2x2_1", dtype=self.dtype)(layers.gelu(x))
        elif self.scale == 2.0:
            x = layers.ConvTranspose2x2(dim // 2, name="dconv_2x2", dtype=self.dtype)(x)
        elif self.scale != 1.0:
            raise ValueError(f"FPN scale {self.scale} is not supported (only 4, 2 and 1 are used)")
        x = nn.Conv(self.d_model, (1, 1), name="conv_1x1", dtype=self.dtype)(x)
        return nn.Conv(self.d_model, (3, 3), padding=((1, 1), (1, 1)), name="conv_3x3", dtype=self.dtype)(x)


class Sam3DualViTDetNeck(nn.Module):
    """The vision backbone (torch ``backbone.vision_backbone``): ``trunk``, ``convs_{i}`` and, with
    ``config.add_sam2_neck``, ``sam2_convs_{i}``, one per scale in ``config.scale_factors``.

    Returns a dict of per-level lists, finest first (288², 144², 72² at the official size), NHWC:
      ``backbone_fpn``: (B, h, w, d_model) features; ``vision_pos_enc``: their sine position
      encodings (B, h, w, d_model); ``sam2_backbone_fpn`` / ``sam2_pos_enc``: the same for the
      tracker's convs, or None without the sam2 neck.
    """

    config: NeckConfig
    vit: ViTConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, images, deterministic: bool = True):
        """images (B, H, W, 3), normalised to [-1, 1]."""
        x = ViT(self.vit, name="trunk", dtype=self.dtype)(images, deterministic)
        stacks = [("convs", "backbone_fpn", "vision_pos_enc")]
        if self.config.add_sam2_neck:
            stacks.append(("sam2_convs", "sam2_backbone_fpn", "sam2_pos_enc"))
        out = {"sam2_backbone_fpn": None, "sam2_pos_enc": None}
        for name, feats_key, pos_key in stacks:
            feats = [FpnLevel(s, self.config.d_model, name=f"{name}_{i}", dtype=self.dtype)(x)
                     for i, s in enumerate(self.config.scale_factors)]
            out[feats_key] = feats
            out[pos_key] = [_pos_enc(f) for f in feats]
        return out


def _pos_enc(feat):
    """The sine position encoding of a (B, h, w, C) map, broadcast over the batch, in its dtype."""
    b, h, w, c = feat.shape
    return jnp.broadcast_to(position.sine_map(h, w, c).astype(feat.dtype), (b, h, w, c))
