"""The reference's detector training forward pass on a clip of ours: ``Sam3Image`` in training
mode with its Hungarian matcher and ``Sam3LossWrapper`` configured as the fine-tuning configs do.

Shared by ``benchmarks/bench_train_step.py`` (timings) and the train-step parity test (values).
Call ``reference.load()`` and ``reference.install_loss_shims`` before any function here that
imports ``sam3.train``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np


def demo_clip(image_size: int, frames: int, phrases: int, objects: int, video_dir: str, seed: int = 0) -> dict:
    """One clip (batch of 1) of the generated demo videos at ``image_size``, as the data pipeline
    yields it, plus ``phrase_text``: its phrases as text, for the reference's text encoder."""
    from sam3_jax.data import config as data_config
    from sam3_jax.data import pipeline
    from sam3_jax.model.tokenizer import SimpleTokenizer

    data = data_config.get_config("demo")
    data.synthetic.output_dir = video_dir
    data.image_size = image_size
    data.num_frames, data.batch_size, data.max_phrases, data.num_workers = frames, 1, phrases, 0
    data.max_objects = objects
    batch = next(iter(pipeline.build_dataset(data, seed=seed, shard_index=0, shard_count=1)))
    tok = SimpleTokenizer()
    texts = []
    for ids, valid in zip(batch["phrase_tokens"][0], batch["phrase_token_valid"][0]):
        ids = [i for i in ids[valid] if i not in (tok.sot_token_id, tok.eot_token_id)]
        texts.append(tok.decode(ids).strip())
    return dict(batch, phrase_text=np.array(texts))


def reference_inputs(torch, batch: dict, device: str):
    """The clip as the reference's ``BatchedDatapoint``: one find query per valid (frame, phrase),
    targets packed (valid slots first in the padded views), as its collator builds them."""
    from sam3.model.data_misc import BatchedDatapoint, BatchedFindTarget, FindStage

    from sam3_jax.data import schema

    frames = batch["frames"][0]  # (T, S, S, 3) uint8
    t_, p_ = batch["query_positives"].shape[1:3]
    n_max = batch["object_valid"].shape[-1]
    img_ids, text_ids, num_boxes, exhaustive = [], [], [], []
    boxes, masks, obj_ids, boxes_padded, ids_padded = [], [], [], [], []
    for t in range(t_):
        for p in range(p_):
            if not (batch["frame_valid"][0, t] and batch["phrase_valid"][0, p]):
                continue
            slots = np.flatnonzero(batch["query_positives"][0, t, p] & batch["object_valid"][0, t])
            img_ids.append(t)
            text_ids.append(p)
            num_boxes.append(len(slots))
            exhaustive.append(bool(batch["query_exhaustive"][0, t, p]))
            boxes.append(batch["boxes"][0, t, slots])
            masks.append(schema.unpack_masks(batch["masks"][0, t, slots]))
            obj_ids.append(batch["object_ids"][0, slots])
            pad = np.zeros((n_max, 4), np.float32)
            pad[:len(slots)] = batch["boxes"][0, t, slots]
            boxes_padded.append(pad)
            ids = np.full(n_max, -1, np.int64)
            ids[:len(slots)] = batch["object_ids"][0, slots]
            ids_padded.append(ids)
    q = len(img_ids)

    def tensor(x, dtype=None):
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)

    packed_boxes = tensor(np.concatenate(boxes), torch.float32)
    target = BatchedFindTarget(
        num_boxes=tensor(num_boxes, torch.long), boxes=packed_boxes,
        boxes_padded=tensor(np.stack(boxes_padded), torch.float32), repeated_boxes=None,
        segments=tensor(np.concatenate(masks), torch.bool), semantic_segments=None,
        is_valid_segment=torch.ones(len(packed_boxes), dtype=torch.bool, device=device),
        is_exhaustive=tensor(exhaustive, torch.bool), object_ids=tensor(np.concatenate(obj_ids), torch.long),
        object_ids_padded=tensor(np.stack(ids_padded), torch.long))
    find = FindStage(
        img_ids=tensor(img_ids, torch.long), text_ids=tensor(text_ids, torch.long),
        input_boxes=torch.zeros(0, q, 4, device=device), input_boxes_mask=torch.zeros(q, 0, dtype=torch.bool, device=device),
        input_boxes_label=torch.zeros(0, q, dtype=torch.long, device=device), input_points=None, input_points_mask=None)
    img = tensor(frames, torch.float32).permute(0, 3, 1, 2) / 255.0 * 2.0 - 1.0  # mean = std = 0.5
    return BatchedDatapoint(img_batch=img.contiguous(), find_text_batch=[str(s) for s in batch["phrase_text"]],
                            find_inputs=[find], find_targets=[target], find_metadatas=[None])


def detector_reference(cfg, device: str = "cpu", *, pad_n_queries: int | None, seed: int = 0):
    """The reference ``Sam3Image`` at the sizes of ``cfg`` (a ``ModelConfig``) with seeded random
    weights, in train mode with its matcher, and its training loss as the fine-tuning configs set
    it up: (model, ``Sam3LossWrapper``). Activation checkpointing is on where the official builder
    switches it on (its fusion encoder asserts it in training mode)."""
    from sam3.train import matcher as tmatcher
    from sam3.train.loss import loss_fns, sam3_loss

    from sam3_jax.testing import reference
    from sam3_jax.testing.parity import randomize_

    model = reference.build_image_model(cfg)
    randomize_(model, seed=seed)  # some of its parameters are torch.empty until a checkpoint is loaded
    # The ViT and text encoder have it already.
    model.transformer.encoder.use_act_checkpoint = True
    model.transformer.decoder.use_act_checkpoint = True
    model.segmentation_head.act_ckpt = True
    model.geometry_encoder.use_act_ckpt = True
    if device == "cuda":
        # Checkpointed, its text encoder fails the backward pass on CUDA (torch 2.11: CheckpointError,
        # nn.MultiheadAttention recomputes with another attention-mask shape); its 24 layers over 32
        # tokens hold little memory, so there it runs without.
        for module in model.backbone.language_backbone.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = False
    hungarian = tmatcher.BinaryHungarianMatcherV2(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal=True,
                                                  alpha=0.25, gamma=2, stable=False)
    model.matcher = hungarian
    model = model.to(device).train()
    decoder = model.transformer.decoder
    if device == "cuda" and decoder.compilable_cord_cache is not None:  # built on the CPU by reference.load()'s shim
        decoder.compilable_cord_cache = tuple(c.to(device) for c in decoder.compilable_cord_cache)
    loss = sam3_loss.Sam3LossWrapper(
        [loss_fns.IABCEMdetr(pos_weight=10.0, weight_dict={"loss_ce": 20.0, "presence_loss": 20.0}, gamma=2,
                             alpha=0.25, weak_loss=False, use_presence=True, pad_n_queries=pad_n_queries),
         loss_fns.Boxes(weight_dict={"loss_bbox": 5.0, "loss_giou": 2.0}),
         loss_fns.Masks(weight_dict={"loss_mask": 200.0, "loss_dice": 10.0}, focal_alpha=0.25, focal_gamma=2.0,
                        compute_aux=False)],
        normalization="local", matcher=hungarian,
        o2m_matcher=tmatcher.BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4), o2m_weight=2.0,
        use_o2m_matcher_on_o2m_aux=False, scale_by_find_batch_size=True)
    return model, loss


def reference_train_forward(model, loss, datapoint) -> dict:
    """The model's training forward (its matcher runs inside) and the wrapper's loss dict:
    ``core_loss`` (the total, with its graph) and every weighted-before-summing term."""
    stages = model(datapoint)
    targets = [model.back_convert(t) for t in datapoint.find_targets]
    return loss(stages, targets)


def global_grad_norm(torch, params) -> float:
    """The L2 norm of the gradients of ``params`` (those that have one), in float64."""
    sq = sum(p.grad.detach().double().square().sum() for p in params if p.grad is not None)
    return float(torch.sqrt(torch.as_tensor(sq)))


def step_one(out_dir: str) -> None:
    """The reference's step 1 as ``out_dir/request.json`` asks (``model``: a ``ModelConfig`` dict,
    ``pad_n_queries``, ``seed``) on the clip in ``out_dir/clip.npz``: writes its seeded weights
    (before the step) to ``weights.npz`` and every loss term and the global gradient norm to
    ``step.json``."""
    from sam3_jax.model.config import ModelConfig
    from sam3_jax.testing import reference
    from sam3_jax.testing.parity import state_dict_numpy

    with open(os.path.join(out_dir, "request.json")) as f:
        request = json.load(f)
    torch = reference.load().torch
    reference.install_loss_shims(torch)
    model, loss = detector_reference(ModelConfig.from_dict(request["model"]), "cpu",
                                     pad_n_queries=request["pad_n_queries"], seed=request["seed"])
    np.savez(os.path.join(out_dir, "weights.npz"), **state_dict_numpy(model))
    clip = dict(np.load(os.path.join(out_dir, "clip.npz")))
    terms = reference_train_forward(model, loss, reference_inputs(torch, clip, "cpu"))
    terms["core_loss"].backward()
    with open(os.path.join(out_dir, "step.json"), "w") as f:
        json.dump({"terms": {k: float(v.detach()) for k, v in terms.items()},
                   "grad_norm": global_grad_norm(torch, model.parameters())}, f)


def step_one_in_child(model_cfg, clip: dict, out_dir: str, *, pad_n_queries: int | None, seed: int) -> dict:
    """``step_one`` in a child process, whose memory goes back to the system when it ends: at the
    official size the reference's model, gradients and activations and then our train state do
    not fit a 24 GiB machine together. Returns ``step.json``'s dict; the weights are in
    ``out_dir/weights.npz``."""
    np.savez(os.path.join(out_dir, "clip.npz"), **clip)
    with open(os.path.join(out_dir, "request.json"), "w") as f:
        json.dump({"model": dataclasses.asdict(model_cfg), "pad_n_queries": pad_n_queries, "seed": seed}, f)
    subprocess.run([sys.executable, "-m", "sam3_jax.testing.train_reference", out_dir], check=True)
    with open(os.path.join(out_dir, "step.json")) as f:
        return json.load(f)


if __name__ == "__main__":
    step_one(sys.argv[1])
