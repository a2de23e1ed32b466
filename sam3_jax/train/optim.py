"""The optimiser: AdamW over SAM 3's parameter groups as one optax transformation (docs/reference_model.md,
'Detector training' and 'Tracker training').

What the reference's fine-tuning configs build with torch param groups, decided here from each
parameter's '/'-joined path:
  * groups: ``vision`` (``backbone/vision_backbone/...``), ``text`` (``backbone/language_backbone/...``)
    and ``rest``, each with its own learning rate on the same schedule;
  * layer-wise lr decay over the ViT trunk as ``ViT.get_layer_id``: patch_embed / ln_pre = layer 0,
    block i = i + 1, anything else = depth + 1; a parameter at layer l gets decay ** (depth + 1 - l),
    except ``pos_embed``, which the reference overrides to 1.0. With ``ViTConfig.scan_blocks`` the
    blocks' leaves are stacked over groups and their factor is a vector over that axis;
  * weight decay except where the reference exempts it: names containing "bias" and the weights of
    ``torch.nn.LayerNorm`` modules only (GroupNorm, LayerNorm2d, embeddings and position embeddings
    are decayed there, so they are here);
  * global-norm clipping over the trainable gradients, gradient accumulation (``optax.MultiSteps``),
    and freezing by regex: frozen leaves get zero updates and hold no optimiser state;
  * updates whose gradients are not finite are skipped and counted (``skipped_updates``).

The trainable leaves are packed into a few flat vectors (`Packing`) before clipping, Adam and the
finite check, so XLA makes a handful of large fusions of that work instead of several per leaf,
which compiles faster at the same memory (benchmarks/README.md). The layer factors, which differ
per leaf (and per stacked block), are applied after unpacking, where XLA fuses them into each
leaf's parameter update.

Steps: ``total_steps`` and ``step`` below count train steps (calls of ``update``); with gradient
accumulation over k of them the schedules advance once per k, on the optimiser update count.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

VISION, TEXT, REST, FROZEN = "vision", "text", "rest", "frozen"
# Paths are of the detector's tree; the trainer's ``{"detector": ..., "tracker": ...}`` is
# understood too (the tracker's parameters are all in ``rest``).
DETECTOR = "detector/"
GROUPS = {VISION: re.compile(r"^(detector/)?backbone/vision_backbone/"),
          TEXT: re.compile(r"^(detector/)?backbone/language_backbone/")}
TRUNK = "backbone/vision_backbone/trunk/"


def _model_path(path: str) -> str:
    return path.removeprefix(DETECTOR)

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


def default_config() -> ml_collections.ConfigDict:
    """The ``optim`` section; defaults = the reference's detector fine-tuning (roboflow / odinw configs)."""
    return ml_collections.ConfigDict(dict(
        lr=dict(vision=2.5e-5, text=5e-6, rest=8e-5),  # 2.5e-4, 5e-5, 8e-4 times lr_scale 0.1
        b1=0.9, b2=0.999, eps=1e-8,  # torch.optim.AdamW defaults (the configs set none)
        weight_decay=0.1,
        layer_decay=0.9,  # over the ViT trunk; 1.0 turns it off
        layer_decay_exempt="pos_embed",  # regex over trunk paths whose factor is 1.0 ("" for none)
        schedule="inverse_sqrt",  # or "cosine"
        warmup_steps=20,
        cooldown_steps=20,  # inverse_sqrt: linear ramp down over the last steps
        timescale=20,  # inverse_sqrt
        final_lr_fraction=0.1,  # cosine: lr at the end / base lr
        clip_norm=0.1,  # global L2 norm of the trainable gradients; 0 turns it off
        accumulate_steps=1,
        freeze="",  # regex searched in '/'-joined paths, e.g. "detector/backbone/" (the whole backbone)
    ))


def path_str(path) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def by_path(tree) -> dict:
    """{'/'-joined path: leaf}."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _map(fn, tree):
    """``fn(path_string, leaf)`` over a tree (masked subtrees inside optax included)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def is_frozen(path: str, freeze: str = "") -> bool:
    """Always-frozen buffers, or a match of the config's ``freeze`` regex."""
    return any(p.search(path) for p in ALWAYS_FROZEN.values()) or bool(freeze and re.search(freeze, path))


def group_of(path: str) -> str:
    return next((name for name, pattern in GROUPS.items() if pattern.search(path)), REST)


def param_labels(params, cfg):
    """Each leaf's group: ``frozen``, ``vision``, ``text`` or ``rest``."""
    return _map(lambda p, _: FROZEN if is_frozen(p, cfg.freeze) else group_of(p), params)


def decays(path: str) -> bool:
    """Weight decay unless the reference exempts it (name contains "bias", or a LayerNorm weight)."""
    if "bias" in path:
        return False
    return not path.endswith("/scale") or any(p.search(path) for p in DECAYED_NORMS.values())


def trunk_depth(params) -> int | None:
    """Number of ViT blocks in the tree (unrolled ``blocks_i`` or stacked ``block_groups``), or None."""
    unrolled, stacked = set(), {}
    for path, x in by_path(params).items():
        path = _model_path(path)
        if m := re.match(re.escape(TRUNK) + r"blocks_(\d+)/", path):
            unrolled.add(int(m[1]))
        elif m := re.match(re.escape(TRUNK) + r"block_groups/blocks_(\d+)/", path):
            stacked[int(m[1])] = x.shape[0]
    if stacked:
        return len(stacked) * next(iter(stacked.values()))
    return max(unrolled) + 1 if unrolled else None


def vit_layer_id(trunk_path: str, depth: int, leaf_shape=()) -> int | np.ndarray:
    """``ViT.get_layer_id`` for a path below the trunk, same precedence; stacked blocks give a vector."""
    if "rel_pos" in trunk_path:
        return depth + 1
    if any(name in trunk_path for name in ("ln_pre", "pos_embed", "cls_token", "patch_embed")):
        return 0
    if m := re.match(r"block_groups/blocks_(\d+)/", trunk_path):
        groups = leaf_shape[0]
        return np.arange(groups) * (depth // groups) + int(m[1]) + 1
    if m := re.match(r"blocks_(\d+)/", trunk_path):
        return int(m[1]) + 1
    return depth + 1


def layer_scales(params, cfg):
    """Each leaf's lr factor: 1.0 outside the trunk, decay ** (depth + 1 - layer id) inside it; a
    stacked block leaf gets an array broadcastable to its shape (one factor per stacked block)."""
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

    return _map(scale, params)


# ------------------------------------------------------------------------------------------ schedules
def inverse_sqrt_schedule(base_lr: float, warmup_steps: int, cooldown_steps: int, timescale: int,
                          total_steps: int) -> Callable:
    """The reference's ``InverseSquareRootParamScheduler`` at ``where = step / total_steps``: linear
    warmup, then base * sqrt(timescale / (step - warmup + timescale)), times a linear cooldown over
    the last ``cooldown_steps``. Its quirk at step 0 (``where == 0`` takes total = 1) is kept; past the
    end (where the reference stops stepping its schedulers) the lr is 0, not negative."""

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        lr = base_lr * jnp.where(step > warmup_steps,
                                 jax.lax.rsqrt((step + timescale - warmup_steps) / timescale), 1.0)
        if warmup_steps:
            lr = lr * jnp.minimum(1.0, step / warmup_steps)
        if cooldown_steps:
            total = jnp.where(step > 0, float(total_steps), 1.0)
            lr = lr * jnp.clip((total - step) / cooldown_steps, 0.0, 1.0)
        return lr

    return fn


def warmup_cosine_schedule(base_lr: float, warmup_steps: int, total_steps: int, final_fraction: float) -> Callable:
    """Linear warmup from 0, then a half cosine from base to ``final_fraction * base`` at the end (the
    SAM 2 recipe: fvcore's CosineParamScheduler to base / 10, no warmup)."""

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        t = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cosine = final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        warm = step / warmup_steps if warmup_steps else 1.0
        return base_lr * jnp.where(step < warmup_steps, warm, cosine)

    return fn


def schedule(cfg, base_lr: float, total_steps: int) -> Callable:
    """lr as a function of the optimiser update count (train steps // accumulate_steps)."""
    updates = max(total_steps // cfg.accumulate_steps, 1)
    if cfg.schedule == "inverse_sqrt":
        return inverse_sqrt_schedule(base_lr, cfg.warmup_steps, cfg.cooldown_steps, cfg.timescale, updates)
    if cfg.schedule == "cosine":
        return warmup_cosine_schedule(base_lr, cfg.warmup_steps, updates, cfg.final_lr_fraction)
    raise ValueError(f"optim.schedule must be 'inverse_sqrt' or 'cosine', got {cfg.schedule!r}")


def schedules(cfg, total_steps: int) -> dict[str, Callable]:
    if set(cfg.lr.keys()) != {VISION, TEXT, REST}:
        raise ValueError(f"optim.lr needs exactly the groups {VISION}, {TEXT}, {REST}; got {sorted(cfg.lr.keys())}")
    return {group: schedule(cfg, cfg.lr[group], total_steps) for group in (VISION, TEXT, REST)}


def learning_rates(cfg, total_steps: int, step) -> dict[str, jax.Array]:
    """Each group's lr at train step ``step`` (for logging; the trunk's blocks get it times their
    layer factor, the top of the vision backbone gets it as is). Works under jit."""
    count = step // cfg.accumulate_steps
    return {group: fn(count) for group, fn in schedules(cfg, total_steps).items()}


# ------------------------------------------------------------------------------------------ optimiser
class Packing:
    """The trainable leaves of a parameter tree as one flat vector per (group, weight decay, dtype),
    keyed ``"<group>/decay|no_decay/<dtype>"``, each the concatenation of its leaves, raveled, in
    tree order. Built from shapes alone (arrays or ShapeDtypeStructs); frozen leaves are left out.

    ``fuse=False`` keeps each leaf as it is, keyed by its path: for parameters sharded over the
    mesh, whose shards a concatenation would have to move between devices."""

    def __init__(self, params, cfg, fuse: bool = True):
        self.fuse = fuse
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        labels = by_path(param_labels(params, cfg))
        self.shapes = [tuple(np.shape(x)) for _, x in leaves]
        self.dtypes = [jnp.dtype(x.dtype) for _, x in leaves]
        self.members: dict[str, list[int]] = {}
        self.group, self.decays = {}, {}
        for i, (path, _) in enumerate(leaves):
            path = path_str(path)
            if labels[path] == FROZEN:
                continue
            key = f"{labels[path]}/{'decay' if decays(path) else 'no_decay'}/{self.dtypes[i].name}" if fuse else path
            self.members.setdefault(key, []).append(i)
            self.group[key], self.decays[key] = labels[path], decays(path)

    def pack(self, tree, keys=None) -> dict[str, jax.Array]:
        """The vectors of ``keys`` (default: all) from a tree like the params."""
        leaves = self.treedef.flatten_up_to(tree)
        keys = self.members if keys is None else keys
        if not self.fuse:
            return {key: leaves[self.members[key][0]] for key in keys}
        return {key: jnp.concatenate([jnp.ravel(leaves[i]) for i in self.members[key]]) for key in keys}

    def unpack(self, flat: dict[str, jax.Array]):
        """The tree again; frozen leaves are zeros."""
        leaves = [jnp.zeros(shape, dtype) for shape, dtype in zip(self.shapes, self.dtypes)]
        for key, idx in self.members.items():
            if not self.fuse:
                leaves[idx[0]] = flat[key]
                continue
            ends = np.cumsum([math.prod(self.shapes[i]) for i in idx])
            for i, piece in zip(idx, jnp.split(flat[key], ends[:-1])):
                leaves[i] = piece.reshape(self.shapes[i])
        return self.treedef.unflatten(leaves)

    def norm(self, tree) -> jax.Array:
        """Global L2 norm of the trainable leaves of ``tree``."""
        return optax.tree.norm(self.pack(tree))


def packed(inner: optax.GradientTransformation, packing: Packing) -> optax.GradientTransformation:
    """``inner`` run on the packed gradients (its state holds vectors); updates come back as a tree.
    ``inner`` gets the parameters as the tree itself: see `decay_packed` for why."""

    def init_fn(params):
        return inner.init(packing.pack(params))

    def update_fn(updates, state, params=None):
        flat, state = inner.update(packing.pack(updates), state, params)
        return packing.unpack(flat), state

    return optax.GradientTransformation(init_fn, update_fn)


def decay_packed(rate: float, packing: Packing) -> optax.GradientTransformation:
    """Decoupled weight decay inside `packed`: packed updates + rate * packed params, for the
    vectors that decay. The parameters are packed here, inside the update, so under `skip_nonfinite`
    (a ``lax.cond``) the copy is made once the gradients are known. Packed before the step, as a
    value that depends on nothing computed, XLA scheduled it at the start and held the copy through
    the backward pass's peak."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the parameters: pass them to update")
        keys = [key for key in updates if packing.decays[key]] if rate else []
        flat = packing.pack(params, keys)
        return {key: u + rate * flat[key] if key in flat else u for key, u in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class GroupLrState(NamedTuple):
    count: jax.Array  # optimiser updates so far


def scale_by_group_lr(scheds: dict[str, Callable], groups: dict[str, str]) -> optax.GradientTransformation:
    """updates * -lr_group(count) over a dict of updates; ``groups`` maps its keys to lr groups."""

    def init_fn(params):
        del params
        return GroupLrState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        lrs = {group: fn(state.count) for group, fn in scheds.items()}
        new = {key: (u * -lrs[groups[key]]).astype(u.dtype) for key, u in updates.items()}
        return new, GroupLrState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_layer(scales) -> optax.GradientTransformation:
    """updates * layer factor, leaf by leaf (``scales``: path -> float or stacked-block array)."""

    def update_fn(updates, state, params=None):
        del params
        return _map(lambda p, u: u if np.all(scales[p] == 1.0) else (u * scales[p]).astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def skip_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Skip (zero) updates whose gradients are not finite, and count them; the loop decides whether to stop."""
    return optax.apply_if_finite(tx, max_consecutive_errors=2**30)


def skipped_updates(opt_state) -> jax.Array:
    """How many updates `skip_nonfinite` has skipped so far."""
    return optax.tree_utils.tree_get(opt_state, "total_notfinite")


def make_optimizer(cfg, params, total_steps: int, fuse: bool = True) -> optax.GradientTransformation:
    """The whole transformation for ``params`` (arrays or ShapeDtypeStructs): frozen leaves ->
    zeros; the others, packed (`Packing`, ``fuse`` as there) -> skip if not finite -> [accumulate k]
    clip -> Adam -> decoupled weight decay -> -lr, then unpacked -> * layer factor."""
    packing = Packing(params, cfg, fuse)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts += [
        optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps),
        decay_packed(cfg.weight_decay, packing),
        scale_by_group_lr(schedules(cfg, total_steps), packing.group),
    ]
    trainable = optax.chain(*parts)
    if cfg.accumulate_steps > 1:
        trainable = optax.MultiSteps(trainable, every_k_schedule=cfg.accumulate_steps).gradient_transformation()
    return optax.chain(packed(skip_nonfinite(trainable), packing), scale_by_layer(by_path(layer_scales(params, cfg))))


# ------------------------------------------------------------------------------------------ summaries
def group_counts(params, cfg) -> dict[str, dict[str, int]]:
    """Per label (the three groups and ``frozen``): tensors, scalars, and how many of them are decayed."""
    counts = {g: {"tensors": 0, "params": 0, "decayed_tensors": 0} for g in (VISION, TEXT, REST, FROZEN)}
    labels = by_path(param_labels(params, cfg))
    for path, x in by_path(params).items():
        c = counts[labels[path]]
        c["tensors"] += 1
        c["params"] += int(np.prod(np.shape(x)))
        c["decayed_tensors"] += labels[path] != FROZEN and decays(path)
    return counts


def summarize(params, cfg, total_steps: int) -> str:
    """A few lines for the console at start-up: each group's size, lr and schedule, what is frozen."""
    counts = group_counts(params, cfg)
    depth = trunk_depth(params)
    updates = jnp.arange(max(total_steps // cfg.accumulate_steps, 1))
    peak = {g: float(jnp.max(fn(updates))) for g, fn in schedules(cfg, total_steps).items()}
    lines = [(f"optimiser: AdamW (b1 {cfg.b1}, b2 {cfg.b2}, eps {cfg.eps}, weight decay {cfg.weight_decay}), "
              f"{cfg.schedule} schedule over {total_steps} steps, clip {cfg.clip_norm or 'off'}, "
              f"accumulate {cfg.accumulate_steps}")]
    for group in (VISION, TEXT, REST):
        c = counts[group]
        line = (f"  {group:<6} {c['tensors']:5d} tensors {c['params']:>13,d} params "
                f"({c['tensors'] - c['decayed_tensors']} without decay)  peak lr {peak[group]:.3g}")
        if group == VISION and depth is not None and cfg.layer_decay != 1.0:
            line += f", layer decay {cfg.layer_decay} over {depth} blocks"
        lines.append(line)
    c = counts[FROZEN]
    lines.append(f"  {FROZEN:<6} {c['tensors']:5d} tensors {c['params']:>13,d} params"
                 + (f" (freeze {cfg.freeze!r})" if cfg.freeze else ""))
    return "\n".join(lines)
