"""The reference's tracker training step (SAM 3's stage 4) on a clip of ours, for the tracker
train-step parity test (tests/parity/test_tracker_step_parity.py).

The reference image model (``Sam3Image`` at a ``ModelConfig``'s sizes, seeded random weights) encodes
the clip's frames in eval mode under ``no_grad``: the frozen backbone of ``configs/video.py:tracker``.
Its tracker levels are then rounded to each of the requested dtypes (``"bfloat16"``: as our train step
hands them to the tracker, ``step._gather_clip`` gathers them in ``GATHER_DTYPE``; ``"float32"``: not
rounded). On each, the reference tracker (``Sam3TrackerBase`` at a ``TrackerConfig``'s sizes,
seeded random weights) runs over the clip as ``reference_tracker_step`` drives it (its own ``track_step`` under SAM 2's training recipe: GT mask on frame 0, the other frames
memory-conditioned with multimask output, SAM 2's ``MultiStepMultiMasksAndIous`` from the reference's
loss functions), and the weighted total is backpropagated into the tracker.

Call ``step_one_in_child``: the reference runs in a child process (``python -m
sam3_jax.testing.tracker_train_reference DIR``), whose memory goes back to the system when it ends.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np


def _no_dropout(torch, module) -> None:
    """Refuses a module that would drop anything in train mode (the comparison needs dropout off)."""
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Dropout):
            p = m.p
        elif isinstance(m, torch.nn.MultiheadAttention):
            p = m.dropout
        else:
            p = getattr(m, "dropout_p", 0.0)  # RoPEAttention's, in scaled_dot_product_attention
        if p:
            raise ValueError(f"{name or type(module).__name__}: dropout {p} in train mode; build it with 0")


def step_one(out_dir: str) -> None:
    """The reference's step as ``out_dir/request.json`` asks (``model``: a ``ModelConfig`` dict,
    ``tracker``: a ``TrackerConfig`` dict, ``loss``: a ``TrackerLossConfig`` dict, ``seed``,
    ``feature_dtypes``: torch dtype names) on the clip in ``out_dir/clip.npz``. Writes both models'
    weights as a video-model checkpoint (``sam3.pt``: ``detector.*`` and ``tracker.*`` keys, as
    ``reference.convert_video_models`` writes it) and to ``step.json``, per feature dtype, the four
    loss terms, the weighted total, the global norm of the tracker's gradients and the work done
    (``reference_tracker_step.track_clip``'s count)."""
    from sam3_jax.model.config import ModelConfig
    from sam3_jax.model.tracker.config import TrackerConfig
    from sam3_jax.testing import reference
    from sam3_jax.testing import reference_tracker_step as rts
    from sam3_jax.testing.parity import randomize_, state_dict_numpy
    from sam3_jax.testing.train_reference import global_grad_norm
    from sam3_jax.train.losses.tracker import TrackerLossConfig

    with open(os.path.join(out_dir, "request.json")) as f:
        request = json.load(f)
    torch = reference.load().torch
    reference.install_loss_shims(torch)  # before sam3.train.loss (track_clip's loss functions)
    seed = request["seed"]
    image_model = reference.build_image_model(ModelConfig.from_dict(request["model"]))
    randomize_(image_model, seed=seed)  # some of its parameters are torch.empty until a checkpoint is loaded
    image_model = image_model.eval().requires_grad_(False)
    trk = rts.prepare_tracker(reference.build_tracker(TrackerConfig(**request["tracker"]), seed=seed + 1))
    _no_dropout(torch, trk)

    clip = dict(np.load(os.path.join(out_dir, "clip.npz")))
    frames = torch.as_tensor(clip["frames"][0], dtype=torch.float32).permute(0, 3, 1, 2)
    frames = (frames / 255.0 * 2.0 - 1.0).contiguous()  # (T, 3, S, S), mean = std = 0.5
    with torch.no_grad():
        sam2_out = image_model.backbone.forward_image(frames)["sam2_backbone_out"]
    gt, tracked = rts.clip_targets(torch, clip, "cpu")
    loss_cfg = TrackerLossConfig(**request["loss"])
    results = {}
    heads = trk._forward_sam_heads
    for dtype in request["feature_dtypes"]:
        fpn = [x.to(getattr(torch, dtype)).float() for x in sam2_out["backbone_fpn"]]
        scores = []

        def record(*args, **kwargs):
            out = heads(*args, **kwargs)
            scores.append(out[-1].detach()[:, 0])  # object_score_logits
            return out

        trk._forward_sam_heads = record  # track_clip's recorder wraps it, and removes both when done
        loss, terms, work = rts.track_clip(torch, trk, dict(sam2_out, backbone_fpn=fpn), frames, gt, tracked,
                                           loss_cfg)
        # Tracked objects predicted present on the frames with a loss: where absent, the reference
        # (and we) replace the mask logits by a constant, which the mask terms then do not depend on.
        work["present"] = int(sum(int((s[tracked] > 0).sum()) for s in scores[1:]))
        loss.backward()
        results[dtype] = {"terms": terms, "loss": float(loss.detach()),
                          "grad_norm": global_grad_norm(torch, trk.parameters()), "work": work}
        del loss, fpn
        trk.zero_grad(set_to_none=True)
    del sam2_out

    sd = {"detector." + k: v for k, v in state_dict_numpy(image_model).items()}
    sd.update({"tracker." + k: v for k, v in state_dict_numpy(trk).items()})
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}},
               os.path.join(out_dir, "sam3.pt"))
    with open(os.path.join(out_dir, "step.json"), "w") as f:
        json.dump(results, f)


def step_one_in_child(model_cfg, tracker_cfg, loss_cfg, clip: dict, out_dir: str, *, seed: int,
                      feature_dtypes=("float32", "bfloat16")) -> dict:
    """``step_one`` in a child process on ``clip`` (a batch of one clip as the data pipeline yields
    it) with the models at ``model_cfg`` / ``tracker_cfg`` (dataclasses) and the loss of
    ``loss_cfg`` (a ``TrackerLossConfig``). Returns ``step.json``'s dict ({feature dtype: results});
    the weights are in ``out_dir/sam3.pt``."""
    np.savez(os.path.join(out_dir, "clip.npz"), **{k: v for k, v in clip.items() if k != "phrase_text"})
    request = {"model": dataclasses.asdict(model_cfg), "tracker": dataclasses.asdict(tracker_cfg),
               "loss": dataclasses.asdict(loss_cfg), "seed": seed,
               "feature_dtypes": list(feature_dtypes)}
    with open(os.path.join(out_dir, "request.json"), "w") as f:
        json.dump(request, f)
    subprocess.run([sys.executable, "-m", "sam3_jax.testing.tracker_train_reference", out_dir], check=True)
    with open(os.path.join(out_dir, "step.json")) as f:
        return json.load(f)


if __name__ == "__main__":
    step_one(sys.argv[1])
