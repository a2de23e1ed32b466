"""The torch key layout of a model that no ``sam3.pt`` was converted into (one trained from scratch),
so that it exports like a converted one: a manifest naming every parameter's torch key
(`keymap.torch_key`) and the ViT's RoPE buffers, and the weights the reference holds but never
reads, as zeros shaped like the live module each one repeats at another level.
"""
from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

from sam3_jax.checkpoint import converted
from sam3_jax.convert import keymap
from sam3_jax.model import stacking
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig

# (live key pattern, the dead key it gives, the dead key's shape from the live one's). The neck's
# fourth level and the pixel decoder's third stage repeat the level / stage before them; the text
# encoder's projection maps its width to CLIP's 512.
TEXT_PROJECTION_DIM = 512
_DEAD_FROM_LIVE = (
    (re.compile(r"((?:^|\.)(?:sam2_)?convs)\.2\."), r"\1.3.", lambda shape: shape),
    (re.compile(r"(pixel_decoder\.(?:conv_layers|norms))\.1\."), r"\1.2.", lambda shape: shape),
    (re.compile(r"(^|\.)no_mem_embed$"), r"\1no_mem_pos_enc", lambda shape: shape),
    (re.compile(r"(^|\.)encoder\.ln_final\.weight$"), r"\1encoder.text_projection",
     lambda shape: (shape[0], TEXT_PROJECTION_DIM)),
)
FREQS_CIS = "backbone.vision_backbone.trunk.blocks.{}.attn.freqs_cis"


def layout(cfg: ModelConfig, tracker_cfg: TrackerConfig | None) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest, dead weights) of a checkpoint of these sizes, as `sam3_checkpoint.convert_file`
    would have written them from the reference's own file."""
    keys, dead = {}, {}
    for root, tree in stacking.unrolled_shapes(converted.abstract_params(cfg, tracker_cfg)).items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            local = keymap.torch_key(path)
            keys[f"{root}.{local}"] = "mapped to " + "/".join(path)
            for pattern, replacement, shape in _DEAD_FROM_LIVE:
                if pattern.search(local):
                    name = f"{root}.{pattern.sub(replacement, local)}"
                    torch_shape = keymap.to_torch(local, path[-1], np.broadcast_to(np.float32(0), leaf.shape)).shape
                    dead[name] = np.zeros(shape(torch_shape), np.float32)
                    keys[name] = f"dead, kept for export ({keymap.dead_reason(name)})"
    for block in range(cfg.vit.depth):
        key = "detector." + FREQS_CIS.format(block)
        keys[key] = f"recomputed ({keymap.recomputed_reason(key)})"
    manifest = {"model_config": converted.config_to_json(cfg),
                "tracker_config": converted.config_to_json(tracker_cfg) if tracker_cfg is not None else None,
                "keys": keys}
    return manifest, dead
