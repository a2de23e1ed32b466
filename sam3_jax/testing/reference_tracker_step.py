"""The PyTorch side of ``bench_train_step.py --mode=tracker|joint``: the tracker's training work on one
clip, built from the reference's SAM 3 tracker modules under SAM 2's training recipe
(docs/reference_model.md, 'Tracker training').

Meta released no tracker training code for SAM 3 (``Sam3TrackerBase.forward`` raises), so this
drives the reference's own ``track_step`` the way SAM 2's ``SAM2Train.forward_tracking`` does:

* the modules in train mode (dropout on in the memory attention, memory stride 1, object pointers
  of every conditioning frame, token 0 for single-mask outputs), with the two attributes that
  ``track_step`` reads in train mode and only a training subclass would set: no teacher-forced
  object scores and no random dropping of spatial memories (SAM 2's recipe has neither; neither
  has our trainer);
* every object slot of the clip as one batch, frames in time order, frame 0 the initial
  conditioning frame with the GT mask as input (``_use_mask_as_output``), the other frames
  memory-conditioned with no prompt (multimask output, as ``_use_multimask`` decides with
  ``multimask_output_for_tracking``), memories and pointers kept in the reference's ``output_dict``;
* SAM 2's ``MultiStepMultiMasksAndIous`` on every predicted frame, from the reference's own
  ``sigmoid_focal_loss``, ``dice_loss`` and ``iou_loss`` (``loss_on_multimask=True``): the candidate
  with the lowest 20 * focal + dice gives the mask terms, the IoU term is the mean over candidates,
  the object-score term is BCE, all divided by the number of tracked objects. The decoder's
  candidates are read by wrapping the instance's ``_forward_sam_heads`` (``track_step`` keeps only
  the chosen mask); a mask-input frame has no SAM prediction and no loss, as in our trainer (its
  loss in SAM 2 is that of the GT mask itself: constant, no gradient).

Objects not visible on frame 0 (padding slots) are tracked with the others and left out of the
losses, as in our trainer, so both sides do the work of every slot.
"""
from __future__ import annotations

import numpy as np

from sam3_jax.data import schema

TERMS = ("mask", "dice", "iou", "class")


def prepare_tracker(trk):
    """The reference tracker in train mode, with the attributes its train-mode ``track_step`` reads."""
    trk.teacher_force_obj_scores_for_mem = False
    trk.prob_to_dropout_spatial_mem = 0.0
    return trk.train()


def clip_targets(torch, batch: dict, device: str):
    """(gt (N, T, M, M) bool, tracked (N,) bool): every object slot of the clip's first (only) clip;
    tracked = valid on frame 0 (SAM 2's sampler; ``tracker_stage`` takes the same)."""
    gt = np.swapaxes(schema.unpack_masks(batch["masks"][0]), 0, 1)  # (T, N, M, M) -> (N, T, M, M)
    tracked = batch["object_valid"][0, 0]
    return torch.as_tensor(gt, device=device), torch.as_tensor(tracked, device=device)


class _HeadsRecorder:
    """Wraps a tracker's ``_forward_sam_heads`` (on the instance) and keeps its last outputs."""

    def __init__(self, trk):
        self.trk, self.orig, self.last, self.calls = trk, trk._forward_sam_heads, None, 0

    def __call__(self, *args, **kwargs):
        self.last = self.orig(*args, **kwargs)
        self.calls += 1
        return self.last

    def __enter__(self):
        self.trk._forward_sam_heads = self
        return self

    def __exit__(self, *exc):
        del self.trk._forward_sam_heads  # back to the class's method


def _step_losses(torch, lf, masks, ious, scores, gt, num_objects, cfg) -> dict:
    """One prediction step, SAM 2's ``MultiStepMultiMasksAndIous._update_losses`` (summed over objects
    and divided by ``num_objects``). masks (n, K, M, M) logits, ious (n, K), scores (n, 1), gt (n, M, M)."""
    target = gt[:, None].float().expand_as(masks)
    focal = lf.sigmoid_focal_loss(masks, target, num_objects, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
                                  loss_on_multimask=True, triton=False)
    dice = lf.dice_loss(masks, target, num_objects, loss_on_multimask=True)
    iou = lf.iou_loss(masks, target, ious, num_objects, loss_on_multimask=True, use_l1_loss=cfg.iou_use_l1_loss)
    target_obj = gt.flatten(1).any(-1)[:, None].float()
    cls = lf.sigmoid_focal_loss(scores, target_obj, num_objects, alpha=cfg.class_focal_alpha,
                                gamma=cfg.class_focal_gamma, triton=False)
    best = torch.argmin(focal * cfg.weight_mask + dice * cfg.weight_dice, dim=-1)
    rows = torch.arange(masks.shape[0], device=masks.device)
    iou = iou.mean(-1) if cfg.supervise_all_iou else iou[rows, best]
    keep = target_obj[:, 0]
    return {"mask": (focal[rows, best] * keep).sum(), "dice": (dice[rows, best] * keep).sum(),
            "iou": (iou * keep).sum(), "class": cls}


def track_clip(torch, trk, sam2_out: dict, frames, gt, tracked, loss_cfg):
    """The tracker over one clip and its losses.

    sam2_out: the backbone's ``sam2_backbone_out`` for the clip's T frames (``backbone_fpn`` and
    ``vision_pos_enc``, 3 levels each, (T, C, h, w)); frames (T, 3, S, S) (only a non-default memory
    encoder reads them); gt (N, T, M, M) bool; tracked (N,) bool; loss_cfg: our ``TrackerLossConfig``
    (the same weights and switches). The 4x and 2x levels go through the decoder's conv_s0 / conv_s1
    here, with gradient (``forward_image`` does it for the reference's predictors).

    Returns (loss, terms, work): the weighted total (a tensor to backpropagate), the four terms as
    floats, and a count of what was computed.
    """
    from sam3.train.loss import loss_fns as lf

    F = torch.nn.functional
    n, t, m = gt.shape[:3]
    dec = trk.sam_mask_decoder
    fpn = list(sam2_out["backbone_fpn"])
    fpn[0], fpn[1] = dec.conv_s0(fpn[0]), dec.conv_s1(fpn[1])
    pos = sam2_out["vision_pos_enc"]
    feat_sizes = [tuple(x.shape[-2:]) for x in pos]
    feats = [x.flatten(2).permute(2, 0, 1) for x in fpn]  # (hw, T, C), as the reference flattens
    pos = [x.flatten(2).permute(2, 0, 1) for x in pos]
    rows = torch.nonzero(tracked).flatten()
    num_objects = max(int(tracked.sum()), 1)
    output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    terms = {k: torch.zeros((), device=gt.device) for k in TERMS}
    work = {"frames": t, "object_slots": n, "tracked": int(tracked.sum()), "mask_input_frames": 0,
            "memory_frames": 0, "multimask_steps": 0, "loss_steps": 0, "corrections": 0}
    with _HeadsRecorder(trk) as heads:
        for f in range(t):
            ids = torch.full((n,), f, dtype=torch.long, device=gt.device)
            init = f == 0
            out = trk.track_step(
                frame_idx=f, is_init_cond_frame=init, current_vision_feats=[x[:, ids] for x in feats],
                current_vision_pos_embeds=[x[:, ids] for x in pos], feat_sizes=feat_sizes, image=frames[ids],
                point_inputs=None, mask_inputs=gt[:, f, None].float() if init else None, output_dict=output_dict,
                num_frames=t)
            output_dict["cond_frame_outputs" if init else "non_cond_frame_outputs"][f] = out
            if init:
                work["mask_input_frames"] += 1
                continue
            work["memory_frames"] += 1
            low_res, high_res, ious, _, _, _, scores = heads.last
            work["multimask_steps"] += low_res.shape[1] > 1
            masks = high_res if high_res.shape[-1] == m else F.interpolate(
                low_res, size=(m, m), mode="bilinear", align_corners=False)
            if len(rows):
                step = _step_losses(torch, lf, masks[rows], ious[rows], scores[rows], gt[rows, f], num_objects,
                                    loss_cfg)
                terms = {k: terms[k] + step[k] for k in TERMS}
                work["loss_steps"] += 1
        work["sam_heads_calls"] = heads.calls
    loss = sum(loss_cfg.weight(k) * terms[k] for k in TERMS)
    return loss, {k: float(v.detach()) for k, v in terms.items()}, work
