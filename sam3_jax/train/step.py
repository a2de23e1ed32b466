"""The video train step: ``jit(value_and_grad(shard_map(per-shard loss)))`` + optax
(docs/architecture.md, 'The train step').

Per shard (a block of clips x a block of their frames, see `mesh`):
  1. the ViT trunk and necks encode the local frames, the text encoder the clips' phrases;
  2. the detector grounds every local (frame, phrase) query and its losses are computed there,
     with the normalisers (valid boxes, real queries) summed over the whole mesh, so the shards'
     partial losses add up (``psum``) to the loss of the global batch, however it is split;
  3. ``all_gather`` (tiled, bf16) over "frame" hands the clip-level stage what it needs of every
     frame: the tracker's FPN features and the detector's final predictions. This replaces the
     reference's NCCL buffers; its transpose in the backward pass is a reduce-scatter.
  4. the clip-level stage (``clip_stage``, the tracker's losses) runs on the gathered clip.
``jax.grad`` is taken outside the ``shard_map``; gradients of the replicated parameters are summed
over the mesh by the transpose of their broadcast. The update skips (and counts) non-finite steps.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from sam3_jax.data import schema
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.detector import Sam3Detector
from sam3_jax.nn import ops
from sam3_jax.train import mesh as mesh_lib
from sam3_jax.train import metrics, sharding
from sam3_jax.train.losses.detector import DetectorLossConfig, detector_loss

GATHER_DTYPE = jnp.bfloat16
# What of the detector's final-layer outputs the clip-level stage receives, per (frame, phrase).
CLIP_DETECTIONS = ("pred_logits", "pred_boxes", "presence_logit_dec")

# clip_stage(params, clip, batch, rng) -> (loss, metrics): ``clip`` holds the gathered arrays of the
# shard's clips (every frame), ``batch`` the shard's batch, ``rng`` the step's key (the same on every
# device: fold in global indices). The returned loss and metrics are partial sums: the step adds
# them up over the whole mesh (so a stage may divide its work, e.g. the clip's objects, over the
# "frame" devices). `tracker_stage.make_tracker_stage` is the tracker's.
ClipStage = Callable[[Any, dict, dict, jax.Array], tuple[jax.Array, dict]]


def query_targets(batch: Mapping[str, jax.Array]) -> tuple[dict, jax.Array]:
    """The detection targets of every (clip, frame, phrase) query, flattened in that order.

    A query's targets are the frame's objects that are positives of its phrase; its masks and
    boxes are the frame's. Returns (targets for ``detector_loss``, query_valid).
    """
    b, t, n = batch["object_valid"].shape
    p = batch["phrase_valid"].shape[1]
    q = b * t * p

    def per_query(x):  # (b, t, ...) -> (b * t * p, ...)
        return jnp.broadcast_to(x[:, :, None], (b, t, p) + x.shape[2:]).reshape((q,) + x.shape[2:])

    valid = batch["query_positives"] & batch["object_valid"][:, :, None, :]
    targets = {"boxes": per_query(batch["boxes"]), "valid": valid.reshape(q, n),
               "masks": per_query(schema.unpack_masks(batch["masks"], jnp)),
               "is_exhaustive": batch["query_exhaustive"].reshape(q)}
    query_valid = (batch["frame_valid"][:, :, None] & batch["phrase_valid"][:, None, :]).reshape(q)
    return targets, query_valid


def _encode_frames(model: Sam3Detector, params, batch, *, deterministic: bool, rngs: dict) -> dict:
    """The backbone's features of the local frames (b * t, ...)."""
    frames = batch["frames"]
    return model.apply({"params": params}, ops.normalize_pixels(frames.reshape((-1,) + frames.shape[2:])),
                       deterministic, method=Sam3Detector.encode_image, rngs=rngs)


def _ground_clips(model: Sam3Detector, params, batch, *, deterministic: bool, rngs: dict) -> tuple[dict, dict]:
    """Image features of the local frames and detector outputs of all their (frame, phrase) queries."""
    b, t = batch["frames"].shape[:2]
    p, length = batch["phrase_tokens"].shape[1:]
    variables = {"params": params}
    feats = _encode_frames(model, params, batch, deterministic=deterministic, rngs=rngs)
    text, text_mask = model.apply(variables, batch["phrase_tokens"].reshape(b * p, length), deterministic,
                                  method=Sam3Detector.encode_text, rngs=rngs)
    clip_i, frame_i, phrase_i = jnp.meshgrid(jnp.arange(b), jnp.arange(t), jnp.arange(p), indexing="ij")
    img_ids = (clip_i * t + frame_i).reshape(-1)
    text_ids = (clip_i * p + phrase_i).reshape(-1)
    q = img_ids.shape[0]
    outputs = model.apply(
        variables, feats, jnp.take(text, text_ids, axis=0), jnp.take(text_mask, text_ids, axis=0),
        jnp.zeros((q, 0, 4), jnp.float32), jnp.zeros((q, 0), bool), jnp.zeros((q, 0), jnp.int32),
        img_ids=img_ids, train=True, deterministic=deterministic, method=Sam3Detector.ground, rngs=rngs)
    return feats, outputs


def _gather_clip(feats: dict, outputs: dict, b: int, t: int, p: int) -> dict:
    """Every frame of the local clips, in bf16: (b, T, ...) arrays, T the whole clip."""
    def gather(x):
        return jax.lax.all_gather(x.astype(GATHER_DTYPE), "frame", axis=1, tiled=True)

    clip = {name: gather(outputs[name].reshape((b, t, p) + outputs[name].shape[1:])) for name in CLIP_DETECTIONS
            if name in outputs}
    if feats.get("sam2_backbone_fpn") is not None:
        clip["tracker_fpn"] = [gather(f.reshape((b, t) + f.shape[1:])) for f in feats["sam2_backbone_fpn"]]
    return clip


def _shard_rngs(rng):
    """(dropout, loss) keys of this shard. The dropout key is an ``unsafe_rbg`` key, so that each
    dropout mask is one XLA ``RngBitGenerator`` op: with threefry keys each mask (and each one
    recomputed under remat) is a hash loop of its own, which lengthens the step's compile."""
    shard = jax.lax.axis_index("data") * jax.lax.axis_size("frame") + jax.lax.axis_index("frame")
    drop, loss = jax.random.split(jax.random.fold_in(rng, shard))
    return jax.random.wrap_key_data(jax.random.bits(drop, (4,), jnp.uint32), impl="unsafe_rbg"), loss


def _shard_loss(model, loss_cfg, params, batch, rng, *, deterministic: bool):
    """The detector part of a shard: its partial loss and terms, and what it computed on the way."""
    drop_rng, loss_rng = _shard_rngs(rng)
    feats, outputs = _ground_clips(model, params["detector"], batch, deterministic=deterministic,
                                   rngs={"dropout": drop_rng})
    targets, query_valid = query_targets(batch)
    loss, terms = detector_loss(outputs, targets, loss_cfg, query_valid=query_valid, rng=loss_rng,
                                global_sum=_global_sum)
    return loss, terms, feats, outputs, targets, query_valid


def _global_sum(x):
    return jax.lax.psum(x, mesh_lib.AXES)


def _sharded(fn, mesh, batch, out_specs):
    """``fn(params, batch, rng)`` under ``shard_map`` with the batch laid out as `mesh` says and the
    parameters whole on every device (gathered first where they are sharded: `sharding.gather`)."""
    specs = {name: mesh_lib.batch_spec(name) for name in batch}
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(), specs, P()), out_specs=out_specs)
    return lambda params, batch, rng: mapped(sharding.gather(params), batch, rng)


def make_loss_fn(model_cfg: ModelConfig, loss_cfg: DetectorLossConfig, mesh, *, clip_stage: ClipStage | None = None,
                 detect: bool = True, return_clip: bool = False, deterministic: bool = False):
    """``loss_fn(params, batch, rng) -> (loss, aux)`` over the mesh; ``params = {"detector": ...}``
    (plus whatever ``clip_stage`` reads). ``detect=False`` leaves out the detector's grounding and
    losses (the backbone still runs: tracker-only training); the trainer's tasks set ``detect`` and
    ``clip_stage`` (`tasks.loss_parts`). aux: ``terms`` (every loss term),
    ``num_boxes``, ``num_queries`` and, with ``return_clip``, ``clip``: the gathered arrays (for tests
    and tools) with a leading axis over the "frame" devices, each of which holds the whole clip."""
    model = Sam3Detector(model_cfg)

    def per_shard(params, batch, rng):
        b, t = batch["frames"].shape[:2]
        p = batch["phrase_valid"].shape[1]
        if detect:
            loss, terms, feats, outputs, targets, query_valid = _shard_loss(model, loss_cfg, params, batch, rng,
                                                                            deterministic=deterministic)
            num_boxes, num_queries = targets["valid"].sum(), query_valid.sum()
        else:
            feats = _encode_frames(model, params["detector"], batch, deterministic=deterministic,
                                   rngs={"dropout": _shard_rngs(rng)[0]})
            loss, terms, outputs = jnp.zeros((), jnp.float32), {}, {}
            num_boxes = num_queries = jnp.zeros((), jnp.int32)
        clip = _gather_clip(feats, outputs, b, t, p)
        if clip_stage is not None:
            clip_loss, clip_terms = clip_stage(params, clip, batch, rng)
            loss = loss + clip_loss
            terms = {**terms, **clip_terms}
        aux = {"terms": _global_sum(terms), "num_boxes": _global_sum(num_boxes),
               "num_queries": _global_sum(num_queries)}
        if return_clip:
            aux["clip"] = jax.tree.map(lambda x: x[None], clip)
        return _global_sum(loss), aux

    def loss_fn(params, batch, rng):
        aux_specs = {"terms": P(), "num_boxes": P(), "num_queries": P()}
        if return_clip:
            aux_specs["clip"] = P("frame", "data")
        return _sharded(per_shard, mesh, batch, (P(), aux_specs))(params, batch, rng)

    return loss_fn


def make_eval_fn(model_cfg: ModelConfig, loss_cfg: DetectorLossConfig, mesh, top_k: int = 0):
    """``eval_fn(params, batch, rng) -> (sums, detections)`` in eval mode (no dropout): ``sums``
    {"loss", every term, `metrics.detection_counts`} over the batch; ``detections`` (with ``top_k``, else
    {}) each (clip, frame, phrase) query's ``top_k`` best predictions (`metrics.top_detections`),
    laid out (B, T, P, top_k, ...)."""
    model = Sam3Detector(model_cfg)

    def per_shard(params, batch, rng):
        loss, terms, _, outputs, targets, query_valid = _shard_loss(model, loss_cfg, params, batch, rng,
                                                                    deterministic=True)
        counts = metrics.detection_counts(outputs, targets, query_valid)
        detections = {}
        if top_k:
            b, t, p = batch["query_exhaustive"].shape
            found = metrics.top_detections(outputs, top_k, batch["masks"].shape[-2])  # M
            detections = {k: v.reshape((b, t, p) + v.shape[1:]) for k, v in found.items()}
        return _global_sum({"loss": loss, **terms, **counts}), detections

    def eval_fn(params, batch, rng):
        return _sharded(per_shard, mesh, batch, (P(), P("data", "frame")))(params, batch, rng)

    return eval_fn


def make_tracker_eval_fn(model_cfg: ModelConfig, tracker_predict, mesh):
    """``eval_fn(params, batch) -> (pred, gt, tracked)``: ``tracker_predict`` (see
    `tracker_stage.make_tracker_predict`) on the gathered features of every clip; pred and gt
    (B, N, T, M, M) bool, tracked (B, N), the objects' axis laid out over "frame"."""
    model = Sam3Detector(model_cfg)

    def per_shard(params, batch, rng):
        b, t = batch["frames"].shape[:2]
        feats = _encode_frames(model, params["detector"], batch, deterministic=True, rngs={})
        clip = _gather_clip(feats, {}, b, t, batch["phrase_valid"].shape[1])
        return tracker_predict(params, clip, batch)

    def eval_fn(params, batch):
        out = P("data", "frame")
        return _sharded(per_shard, mesh, batch, (out, out, out))(params, batch, jax.random.key(0))

    return eval_fn


def make_predict_fn(model_cfg: ModelConfig):
    """``predict(params, batch) -> (pred_masks (Q', nq, h, w) logits, scores (Q', nq))`` for every
    (clip, frame, phrase) query of a small batch, in eval mode, without sharding (for overlays)."""
    model = Sam3Detector(model_cfg)

    def predict(params, batch):
        _, out = _ground_clips(model, params["detector"], batch, deterministic=True, rngs={})
        return out["pred_masks"], metrics.query_scores(out)[0]

    return predict


def init_state(params, tx: optax.GradientTransformation, seed: int) -> dict:
    """The whole training state as a plain pytree (what checkpoints hold)."""
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key(seed)}


def make_train_step(loss_fn, tx: optax.GradientTransformation, *, frozen=None,
                    learning_rates: Callable[[jax.Array], dict] | None = None,
                    grad_norm: Callable[[Any], jax.Array] = optax.tree.norm):
    """``step(state, batch) -> (state, metrics)``, to be jitted.

    ``tx`` should skip non-finite gradients (`optim.skip_nonfinite`; the trainer's optimiser does):
    the parameters then stay untouched. ``frozen`` (a bool tree like the params) stops gradients at
    frozen leaves, so e.g. a frozen backbone costs no backward pass. ``learning_rates(step)`` ->
    {group: lr} for the metrics. ``grad_norm(grads)`` for the metrics (the trainer's is
    `optim.Packing.norm`: over the same packed vectors as its optimiser).
    """
    def step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])

        def objective(params):
            if frozen is not None:
                params = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, params, frozen)
            return loss_fn(params, batch, rng)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        norm = grad_norm(grads)
        metrics = {"loss": loss, **aux["terms"], "grad_norm": norm,
                   "finite": jnp.isfinite(loss) & jnp.isfinite(norm),
                   "num_boxes": aux["num_boxes"], "num_queries": aux["num_queries"],
                   "skipped_samples": batch["skipped"].sum()}
        if learning_rates is not None:
            metrics.update({f"lr/{group}": lr for group, lr in learning_rates(state["step"]).items()})
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    return step
