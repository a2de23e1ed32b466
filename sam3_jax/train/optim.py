"""The optimiser: AdamW over SAM 3's parameter groups as one optax transformation (docs/reference_model.md,
'Detector training' and 'Tracker training').

What the reference's fine-tuning configs build with torch param groups; which group, weight decay,
layer factor and freezing each parameter gets is `param_groups`' (from the config's rules):
  * each group's lr on the same schedule (``optim.lr[group]`` its peak), times the leaf's layer
    factor (layer-wise lr decay over the ViT trunk);
  * decoupled weight decay at the group's rate (``optim.weight_decay[group]``) except where the
    reference exempts it;
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
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sam3_jax.train.param_groups import (
    BACKBONE_GROUPS, FROZEN, VISION, by_path, check_groups, decays, layer_scales, names, param_labels, path_str,
    trunk_depth, weight_decay)
from sam3_jax.train.param_groups import tree_map as _map


def default_config() -> ml_collections.ConfigDict:
    """The ``optim`` section's fields, with the reference's detector fine-tuning values (roboflow /
    odinw configs); each config in ``configs/*.py`` writes its own recipe over them."""
    return ml_collections.ConfigDict(dict(
        groups=BACKBONE_GROUPS,  # (name, regex) rules in match order; the last, "rest", a catch-all
        lr=dict(vision=2.5e-5, text=5e-6, rest=8e-5),  # each group's peak lr (2.5e-4, 5e-5, 8e-4 x 0.1)
        weight_decay=dict(vision=0.1, text=0.1, rest=0.1),  # each group's decoupled weight decay
        b1=0.9, b2=0.999, eps=1e-8,  # torch.optim.AdamW defaults (the configs set none)
        layer_decay=0.9,  # over the ViT trunk, on top of the group's lr; 1.0 turns it off
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
    """Each group's lr schedule, in the rules' order."""
    check_groups(cfg)
    return {group: schedule(cfg, cfg.lr[group], total_steps) for group in names(cfg)}


def learning_rates(cfg, total_steps: int, step) -> dict[str, jax.Array]:
    """Each group's lr at train step ``step`` (for logging; the trunk's blocks get it times their
    layer factor, the top of the vision backbone gets it as is). Works under jit."""
    count = step // cfg.accumulate_steps
    return {group: fn(count) for group, fn in schedules(cfg, total_steps).items()}


# ------------------------------------------------------------------------------------------ optimiser
class Packing:
    """The trainable leaves of a parameter tree as one flat vector per (group, decayed or not, dtype),
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
        self.group, self.weight_decay = {}, {}  # per key: lr group, decoupled weight decay rate
        for i, (path, _) in enumerate(leaves):
            path = path_str(path)
            if labels[path] == FROZEN:
                continue
            key = f"{labels[path]}/{'decay' if decays(path) else 'no_decay'}/{self.dtypes[i].name}" if fuse else path
            self.members.setdefault(key, []).append(i)
            self.group[key], self.weight_decay[key] = labels[path], weight_decay(path, labels[path], cfg)

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


def decay_packed(packing: Packing) -> optax.GradientTransformation:
    """Decoupled weight decay inside `packed`: packed updates + rate * packed params, each vector at
    its rate (`Packing.weight_decay`; vectors at 0 are left alone). The parameters are packed here, inside the update, so under `skip_nonfinite`
    (a ``lax.cond``) the copy is made once the gradients are known. Packed before the step, as a
    value that depends on nothing computed, XLA scheduled it at the start and held the copy through
    the backward pass's peak."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the parameters: pass them to update")
        rates = packing.weight_decay
        flat = packing.pack(params, [key for key in updates if rates[key]])
        return {key: u + rates[key] * flat[key] if key in flat else u for key, u in updates.items()}, state

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
        decay_packed(packing),
        scale_by_group_lr(schedules(cfg, total_steps), packing.group),
    ]
    trainable = optax.chain(*parts)
    if cfg.accumulate_steps > 1:
        trainable = optax.MultiSteps(trainable, every_k_schedule=cfg.accumulate_steps).gradient_transformation()
    return optax.chain(packed(skip_nonfinite(trainable), packing), scale_by_layer(by_path(layer_scales(params, cfg))))


# ------------------------------------------------------------------------------------------ summaries
def group_counts(params, cfg) -> dict[str, dict[str, int]]:
    """Per label (each group and ``frozen``): tensors, scalars, and how many of them are decayed."""
    counts = {g: {"tensors": 0, "params": 0, "decayed_tensors": 0} for g in [*names(cfg), FROZEN]}
    labels = by_path(param_labels(params, cfg))
    for path, x in by_path(params).items():
        c = counts[labels[path]]
        c["tensors"] += 1
        c["params"] += int(np.prod(np.shape(x)))
        c["decayed_tensors"] += labels[path] != FROZEN and decays(path)
    return counts


def summarize(params, cfg, total_steps: int) -> str:
    """A few lines for the console at start-up: each group's rule, size, lr and weight decay, the
    schedule, what is frozen."""
    counts = group_counts(params, cfg)
    depth = trunk_depth(params)
    updates = jnp.arange(max(total_steps // cfg.accumulate_steps, 1))
    peak = {g: float(jnp.max(fn(updates))) for g, fn in schedules(cfg, total_steps).items()}
    lines = [(f"optimiser: AdamW (b1 {cfg.b1}, b2 {cfg.b2}, eps {cfg.eps}), {cfg.schedule} schedule over "
              f"{total_steps} steps, clip {cfg.clip_norm or 'off'}, accumulate {cfg.accumulate_steps}; "
              f"groups, first match wins:")]
    for group, pattern in cfg.groups:
        c = counts[group]
        line = (f"  {group:<6} {c['tensors']:5d} tensors {c['params']:>13,d} params "
                f"({c['tensors'] - c['decayed_tensors']} without decay)  peak lr {peak[group]:.3g}, "
                f"weight decay {cfg.weight_decay[group]:g}, rule {pattern!r}")
        if group == VISION and depth is not None and cfg.layer_decay != 1.0:
            line += f", layer decay {cfg.layer_decay} over {depth} blocks"
        lines.append(line)
    c = counts[FROZEN]
    lines.append(f"  {FROZEN:<6} {c['tensors']:5d} tensors {c['params']:>13,d} params"
                 + (f" (freeze {cfg.freeze!r})" if cfg.freeze else ""))
    return "\n".join(lines)
