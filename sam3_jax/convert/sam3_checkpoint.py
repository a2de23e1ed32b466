"""Official ``sam3.pt`` -> converted directory (see ``checkpoint.py`` for its layout).

Every key of the file is accounted for in the manifest: mapped to a Flax path, recomputed and
checked (RoPE tables), kept aside as dead, or (tracker keys, until the tracker converter lands)
"not converted yet". Anything else is an error listing every offending key.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re

import numpy as np

from sam3_jax import __version__
from sam3_jax.convert import checkpoint, keymap, torch_io
from sam3_jax.model.config import ModelConfig
from sam3_jax.nn import rope

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


def check_rope(recomputed: dict[str, np.ndarray], cfg: ModelConfig) -> list[str]:
    """Compares stored ``freqs_cis`` buffers with the tables our ViT computes from the config."""
    vit = cfg.vit
    head_dim = vit.embed_dim // vit.num_heads
    problems = []
    for key, stored in recomputed.items():
        m = _BLOCK.search(key)
        if m is None:
            problems.append(f"{key}: unexpected recomputed buffer")
            continue
        block = int(m.group(1))
        if block in vit.global_att_blocks:
            want = rope.axial_cis(head_dim, vit.grid, vit.grid, vit.rope_theta, vit.pretrain_grid / vit.grid)
        else:
            want = rope.axial_cis(head_dim, vit.window_size, vit.window_size, vit.rope_theta, 1.0)
        if stored.shape != want.shape or not np.allclose(stored, want, atol=1e-4):
            err = np.max(np.abs(stored - want)) if stored.shape == want.shape else f"shape {stored.shape} vs {want.shape}"
            problems.append(f"{key}: stored RoPE table differs from the recomputed one ({err})")
    return problems


def convert_file(torch_ckpt: str, output_dir: str, *, cfg: ModelConfig | None = None,
                 bpe_path: str | None = None, overwrite: bool = False) -> dict:
    """Converts ``torch_ckpt`` and writes ``output_dir`` atomically; returns the manifest."""
    from sam3_jax.model import detector, tokenizer, vit

    cfg = cfg or ModelConfig.official()
    vocab = bpe_path or tokenizer.DEFAULT_BPE_PATH
    if not os.path.isfile(vocab):
        raise FileNotFoundError(f"BPE vocabulary not found: {vocab}")
    state_dict = torch_io.read_state_dict(torch_ckpt)
    num_keys = len(state_dict)
    det_sd, trk_sd = split_layout(state_dict, torch_ckpt)
    if not trk_sd and not any(k.startswith("backbone.vision_backbone.sam2_convs.") for k in det_sd):
        cfg = cfg.replace(neck=dataclasses.replace(cfg.neck, add_sam2_neck=False))  # image-model file
    # The key map targets the torch layout (unrolled ViT blocks); a scanned trunk is stacked after.
    unrolled = cfg.replace(vit=dataclasses.replace(cfg.vit, scan_blocks=False))
    del state_dict  # det_sd / trk_sd now own the tensors; convert frees each one as it goes
    conversion = keymap.convert(det_sd, detector.abstract_params(unrolled), source=f"{torch_ckpt} (detector.*)",
                                consume=True)
    problems = check_rope(conversion.recomputed, cfg)
    if problems:
        raise keymap.ConversionError(f"{torch_ckpt}:\n  " + "\n  ".join(problems))
    fate = {DETECTOR + k: v for k, v in conversion.fate.items()}
    fate.update({TRACKER + k: "not converted yet (tracker)" for k in trk_sd})
    dead = {DETECTOR + k: v for k, v in conversion.dead.items()}
    manifest = {
        "format": "sam3-jax converted checkpoint",
        "sam3_jax_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": os.path.abspath(torch_ckpt), "sha256": checkpoint.sha256(torch_ckpt),
                   "num_keys": num_keys},
        "model_config": checkpoint.config_to_json(cfg),
        "keys": fate,
        "summary": _summary(fate),
    }
    params = conversion.params
    if cfg.vit.scan_blocks:
        vision = params["backbone"]["vision_backbone"]
        vision["trunk"] = vit.stack_blocks(vision["trunk"], cfg.vit)
    del det_sd, conversion
    checkpoint.write(output_dir, params, manifest=manifest, dead=dead, vocab_path=vocab, overwrite=overwrite)
    return manifest


def _summary(fate: dict[str, str]) -> dict[str, int]:
    kinds = ("mapped", "recomputed", "dead", "not converted yet")
    return {kind: sum(v.startswith(kind) for v in fate.values()) for kind in kinds}
