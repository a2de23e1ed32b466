"""What each parameter gets from the optimiser, decided from its '/'-joined path (docs/reference_model.md,
'Detector training' and 'Tracker training').

  * groups: the config's ``optim.groups``, an ordered tuple of ``(name, regex)`` rules; a parameter
    belongs to the first rule whose regex it matches (``re.search``), and the last rule, ``rest``,
    matches everything. Each group has its peak lr in ``optim.lr[name]`` and its decoupled weight
    decay in ``optim.weight_decay[name]`` (the recipe, written in ``configs/*.py``);
  * layer-wise lr decay over the ViT trunk as ``ViT.get_layer_id``: patch_embed / ln_pre = layer 0,
    block i = i + 1, anything else = depth + 1; a parameter at layer l gets decay ** (depth + 1 - l),
    on top of its group's lr, except ``layer_decay_exempt`` (the reference's ``pos_embed``). The
    blocks' leaves are stacked over groups of blocks (``stacking``), so their factor is a vector;
  * weight decay except where the reference exempts it: names containing "bias" and the weights of
    ``torch.nn.LayerNorm`` modules only (GroupNorm, LayerNorm2d, embeddings and position embeddings
    are decayed there, so they are here);
  * frozen: a match of ``optim.freeze``, or a parameter that is a buffer in the reference (always).

Paths are of the detector's tree; the trainer's ``{"detector": ..., "tracker": ...}`` is understood too.
"""
from __future__ import annotations

import re

import jax
import numpy as np

VISION, TEXT, REST, FROZEN = "vision", "text", "rest", "frozen"
DETECTOR = "detector/"
TRUNK = "backbone/vision_backbone/trunk/"
# The reference's three groups: the vision backbone, the text backbone, everything else (heads,
# fusion encoder, decoder, and every tracker parameter).
BACKBONE_GROUPS = ((VISION, r"^(detector/)?backbone/vision_backbone/"),
                   (TEXT, r"^(detector/)?backbone/language_backbone/"),
                   (REST, r".*"))

# Parameters here that are buffers in the reference: never trained, whatever the config says.
ALWAYS_FROZEN = {
    "the SAM prompt encoder's random Fourier features (a torch buffer)":
        re.compile(r"(^|/)positional_encoding_gaussian_matrix$"),
}

# Norm scales the reference decays: its exemption is by module class torch.nn.LayerNorm, exactly.
DECAYED_NORMS = {
    "GroupNorm (pixel decoder)": re.compile(r"(^|/)pixel_decoder/norms_\d+/scale$"),
    "LayerNorm2d (tracker convolution stacks)": re.compile(
        r"(^|/)(output_upscaling_1|mask_downscaling_\d+|mask_downsampler/encoder_\d+|fuser/layers_\d+/norm)/scale$"),
}


def path_str(path) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def by_path(tree) -> dict:
    """{'/'-joined path: leaf}."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_map(fn, tree):
    """``fn(path_string, leaf)`` over a tree (masked subtrees inside optax included)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def names(cfg) -> list[str]:
    """The group names of an ``optim`` config, in match order."""
    return [name for name, _ in cfg.groups]


def group_errors(cfg) -> list[str]:
    """One line per problem of ``optim.groups`` / ``lr`` / ``weight_decay`` (empty when they agree)."""
    out, groups = [], list(cfg.groups)
    if not groups or any(not isinstance(g, (tuple, list)) or len(g) != 2 for g in groups):
        return [f"optim.groups={tuple(groups)!r}: must be a non-empty tuple of (name, regex) rules"]
    for name, pattern in groups:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            out.append(f"optim.groups: the regex of {name!r} ({pattern!r}) does not compile: {e}")
    listed = names(cfg)
    if len(set(listed)) != len(listed) or FROZEN in listed:
        out.append(f"optim.groups: names {listed} must be unique and not {FROZEN!r}")
    if listed[-1] != REST or groups[-1][1] not in ("", ".*"):
        out.append(f"optim.groups: the last rule must be the catch-all ({REST!r}, '.*'), got {tuple(groups[-1])!r}")
    for field in ("lr", "weight_decay"):
        given = sorted(cfg[field].keys())
        if given != sorted(listed):
            out.append(f"optim.{field} needs exactly the groups {', '.join(listed)}; got {', '.join(given)}")
        else:
            out += [f"optim.{field}.{k}={v!r}: must be a number >= 0" for k, v in cfg[field].items()
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0]
    return out


def check_groups(cfg) -> None:
    if errors := group_errors(cfg):
        raise ValueError("; ".join(errors))


def is_frozen(path: str, freeze: str = "") -> bool:
    """Always-frozen buffers, or a match of the config's ``freeze`` regex."""
    return any(p.search(path) for p in ALWAYS_FROZEN.values()) or bool(freeze and re.search(freeze, path))


def param_labels(params, cfg):
    """Each leaf's label: ``frozen``, or the name of the first group whose regex matches its path."""
    check_groups(cfg)
    rules = [(name, re.compile(pattern)) for name, pattern in cfg.groups]

    def label(path, _):
        if is_frozen(path, cfg.freeze):
            return FROZEN
        return next(name for name, pattern in rules if pattern.search(path))

    return tree_map(label, params)


def decays(path: str) -> bool:
    """Weight decay unless the reference exempts it (name contains "bias", or a LayerNorm weight)."""
    if "bias" in path:
        return False
    return not path.endswith("/scale") or any(p.search(path) for p in DECAYED_NORMS.values())


def weight_decay(path: str, label: str, cfg) -> float:
    """The decoupled weight decay rate of a leaf: its group's, 0 where exempt or frozen."""
    return 0.0 if label == FROZEN or not decays(path) else cfg.weight_decay[label]


def _model_path(path: str) -> str:
    return path.removeprefix(DETECTOR)


def trunk_depth(params) -> int | None:
    """Number of ViT blocks in the tree (groups x blocks a group under ``block_groups``), or None."""
    groups = {}
    for path, x in by_path(params).items():
        if m := re.match(re.escape(TRUNK) + r"block_groups/blocks_(\d+)/", _model_path(path)):
            groups[int(m[1])] = x.shape[0]
    return len(groups) * next(iter(groups.values())) if groups else None


def vit_layer_id(trunk_path: str, depth: int, leaf_shape=()) -> int | np.ndarray:
    """``ViT.get_layer_id`` for a path below the trunk, same precedence; a block leaf (stacked over
    the groups) gives a vector, one id per group."""
    if "rel_pos" in trunk_path:
        return depth + 1
    if any(name in trunk_path for name in ("ln_pre", "pos_embed", "cls_token", "patch_embed")):
        return 0
    if m := re.match(r"block_groups/blocks_(\d+)/", trunk_path):
        groups = leaf_shape[0]
        return np.arange(groups) * (depth // groups) + int(m[1]) + 1
    return depth + 1


def layer_scales(params, cfg):
    """Each leaf's lr factor: 1.0 outside the trunk, decay ** (depth + 1 - layer id) inside it; a
    block leaf (stacked) gets an array broadcastable to its shape (one factor per stacked block)."""
    depth = trunk_depth(params)

    def scale(path, x):
        path = _model_path(path)
        if depth is None or not path.startswith(TRUNK):
            return 1.0
        rel = path[len(TRUNK):]
        if cfg.layer_decay_exempt and re.search(cfg.layer_decay_exempt, rel):
            return 1.0
        ids = vit_layer_id(rel, depth, np.shape(x))
        if np.ndim(ids) == 0:
            return float(cfg.layer_decay ** (depth + 1 - ids))
        factors = np.asarray(cfg.layer_decay, np.float64) ** (depth + 1 - ids)
        return factors.astype(np.float32).reshape((-1,) + (1,) * (np.ndim(x) - 1))

    return tree_map(scale, params)
