"""Official ``sam3.pt`` -> converted directory (its layout: `sam3_jax.checkpoint.converted`).

The params become ``{"detector": ..., "tracker": ...}``, mirroring the ``detector.*`` / ``tracker.*``
prefixes of ``sam3.pt`` (a bare image-model state_dict gives only "detector"; a file in the video
layout must hold the whole tracker). Every key of the file is accounted for in the manifest: mapped
to a Flax path, recomputed and checked (RoPE tables), or kept aside as dead. Anything else is an
error listing every offending key.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re

import numpy as np

from sam3_jax import __version__
from sam3_jax.checkpoint import converted, finite
from sam3_jax.convert import keymap, torch_io
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.nn import rope

ALLOW_HINT = " (pass --allow_nonfinite to convert anyway)"
DETECTOR = "detector."
TRACKER = "tracker."
_BLOCK = re.compile(r"trunk\.blocks\.(\d+)\.attn\.freqs_cis$")


def split_layout(state_dict: dict, path: str) -> tuple[dict, dict]:
    """(detector keys without prefix, tracker keys without prefix); accepts the video-model layout
    of ``sam3.pt`` and a bare image-model state_dict (no prefixes, no tracker)."""
    keys = list(state_dict)
    if not any(k.startswith(DETECTOR) for k in keys) and any(
            k.startswith("backbone.vision_backbone.trunk.") for k in keys):
        return dict(state_dict), {}
    torch_io.check_is_sam3(keys, path)
    det = {k[len(DETECTOR):]: v for k, v in state_dict.items() if k.startswith(DETECTOR)}
    trk = {k[len(TRACKER):]: v for k, v in state_dict.items() if k.startswith(TRACKER)}
    stray = [k for k in keys if not k.startswith((DETECTOR, TRACKER))]
    if stray:
        raise keymap.ConversionError(f"{path}: keys outside detector.*/tracker.* ({len(stray)}): " + ", ".join(stray[:20]))
    return det, trk


def rope_args(key: str, cfg: ModelConfig) -> tuple | None:
    """``(dim, end_x, end_y, theta, scale)`` of a ViT block's ``freqs_cis`` buffer (None: not one)."""
    m = _BLOCK.search(key)
    if m is None:
        return None
    vit = cfg.vit
    head_dim = vit.embed_dim // vit.num_heads
    if int(m.group(1)) in vit.global_att_blocks:
        return head_dim, vit.grid, vit.grid, vit.rope_theta, vit.pretrain_grid / vit.grid
    return head_dim, vit.window_size, vit.window_size, vit.rope_theta, 1.0


def check_rope(recomputed: dict[str, np.ndarray], cfg: ModelConfig) -> list[str]:
    """Compares stored ``freqs_cis`` buffers with the tables our ViT computes from the config."""
    problems = []
    for key, stored in recomputed.items():
        args = rope_args(key, cfg)
        if args is None:
            problems.append(f"{key}: unexpected recomputed buffer")
            continue
        want = rope.axial_cis(*args)
        if stored.shape != want.shape or not np.allclose(stored, want, atol=1e-4):
            err = np.max(np.abs(stored - want)) if stored.shape == want.shape else f"shape {stored.shape} vs {want.shape}"
            problems.append(f"{key}: stored RoPE table differs from the recomputed one ({err})")
    return problems


def convert_file(torch_ckpt: str, output_dir: str, *, cfg: ModelConfig | None = None,
                 tracker_cfg: TrackerConfig | None = None, bpe_path: str | None = None,
                 overwrite: bool = False, allow_nonfinite: bool = False) -> dict:
    """Converts ``torch_ckpt`` and writes ``output_dir`` atomically; returns the manifest.
    ``cfg`` / ``tracker_cfg`` give the sizes the file holds (default: official). The output is checked
    first (``converted.check_output``); tensors holding NaN or Inf are refused, all named, unless
    ``allow_nonfinite`` (then the manifest lists them under ``"nonfinite"``)."""
    from sam3_jax.model import detector, tokenizer
    from sam3_jax.model.tracker import tracker

    cfg = cfg or ModelConfig.official()
    tracker_cfg = tracker_cfg or TrackerConfig.official()
    vocab = bpe_path or tokenizer.DEFAULT_BPE_PATH
    if not os.path.isfile(vocab):
        raise FileNotFoundError(f"BPE vocabulary not found: {vocab}")
    converted.check_output(output_dir, overwrite)
    state_dict, source_dtypes = torch_io.read_state_dict(torch_ckpt)
    nonfinite = finite.check_finite(state_dict, torch_ckpt, allow=allow_nonfinite, hint=ALLOW_HINT)
    num_keys = len(state_dict)
    det_sd, trk_sd = split_layout(state_dict, torch_ckpt)
    video_layout = any(k.startswith(DETECTOR) for k in state_dict)
    if not video_layout and not any(k.startswith("backbone.vision_backbone.sam2_convs.") for k in det_sd):
        cfg = cfg.replace(neck=dataclasses.replace(cfg.neck, add_sam2_neck=False))  # image-model file
    del state_dict  # det_sd / trk_sd now own the tensors; convert frees each one as it goes
    conversion = keymap.convert(det_sd, detector.abstract_params(cfg), source=f"{torch_ckpt} (detector.*)",
                                consume=True)
    problems = check_rope(conversion.recomputed, cfg)
    if problems:
        raise keymap.ConversionError(f"{torch_ckpt}:\n  " + "\n  ".join(problems))
    fate = {DETECTOR + k: v for k, v in conversion.fate.items()}
    dead = {DETECTOR + k: v for k, v in conversion.dead.items()}
    params = {"detector": conversion.params}
    del det_sd, conversion
    if video_layout:
        tracked = keymap.convert(trk_sd, tracker.abstract_params(tracker_cfg), source=f"{torch_ckpt} (tracker.*)",
                                 consume=True)
        if tracked.recomputed:  # the tracker's RoPE tables are not buffers of the state_dict
            raise keymap.ConversionError(f"{torch_ckpt}: unexpected tracker buffers: " + ", ".join(tracked.recomputed))
        fate.update({TRACKER + k: v for k, v in tracked.fate.items()})
        dead.update({TRACKER + k: v for k, v in tracked.dead.items()})
        params["tracker"] = tracked.params
        del tracked
    manifest = {
        "format": "sam3-jax converted checkpoint",
        "sam3_jax_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": os.path.abspath(torch_ckpt), "sha256": converted.sha256(torch_ckpt),
                   "num_keys": num_keys},
        "model_config": converted.config_to_json(cfg),
        "tracker_config": converted.config_to_json(tracker_cfg) if video_layout else None,
        "keys": fate,
        "summary": _summary(fate),
        "source_dtypes": source_dtypes,  # keys stored in another float type than float32
    }
    if nonfinite:
        manifest["nonfinite"] = nonfinite  # converted with allow_nonfinite
    converted.write(output_dir, params, manifest=manifest, dead=dead, vocab_path=vocab, overwrite=overwrite)
    return manifest


def _summary(fate: dict[str, str]) -> dict[str, int]:
    kinds = ("mapped", "recomputed", "dead")
    return {kind: sum(v.startswith(kind) for v in fate.values()) for kind in kinds}
