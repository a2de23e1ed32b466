"""Text-prompted video segmentation: detect on every frame, track what was found (SAM 3's video model).

``DetectTrackPredictor.propagate_iter`` follows the reference's detect-and-track loop with the
heuristics of ``build_sam3_video_model``, every threshold a field of ``DetectTrackConfig``; the steps,
directions and what is left out are in docs/architecture.md, 'The detect-and-track predictor', and
the reference's loop in docs/reference_model.md, 'Detect and track'. All per-call state is a
``TrackState``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sam3_jax.infer import objects
from sam3_jax.infer.detect_track_state import TrackState, commit_frame
from sam3_jax.infer.heuristics import (
    ALWAYS_OCCLUDED,
    NEVER_OCCLUDED,
    Association,
    DetectTrackConfig,
    DetectTrackFrame,
    Hotstart,
    Pending,
    associate,
    boxes_xywh,
    frame_output,
    mask_iou,
    nms_keep,
    object_wise_non_overlap,
    occlusion_suppression,
    padded_rows,
    recondition_rows,
    suppress_occluded,
)
from sam3_jax.infer.objects import NO_OBJ_LOGIT, component_areas, encode_memories, fill_holes, group_mean, non_overlap
from sam3_jax.infer.video_inputs import DIRECTIONS, FrameSource, VideoInputError, preprocess, read_video_checkpoint
from sam3_jax.model import detector
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.memory_bank import bank_capacity, compact_memory, select_memory, slots_in_use
from sam3_jax.model.tracker.memory_score import presence
from sam3_jax.model.tracker.tracker import NO_OBJ_SCORE, Tracker
from sam3_jax.nn import compiler, ops

# The predictor, and the heuristics and kernels of its loop (defined in `heuristics` and `objects`).
__all__ = ["ALWAYS_OCCLUDED", "NEVER_OCCLUDED", "Association", "DetectTrackConfig", "DetectTrackFrame",
           "DetectTrackPredictor", "Hotstart", "associate", "boxes_xywh", "component_areas", "fill_holes",
           "group_mean", "mask_iou", "nms_keep", "non_overlap", "object_wise_non_overlap", "occlusion_suppression",
           "padded_rows"]


class DetectTrackPredictor:
    """Finds and tracks every instance of a text prompt through a video (see the module docstring).

    params: a converted video checkpoint's ``{"detector": ..., "tracker": ...}``; ``model_cfg.joint_box_scores``
    should be True (the video model's detector scores).
    """

    def __init__(self, params, model_cfg: ModelConfig, tracker_cfg: TrackerConfig,
                 cfg: DetectTrackConfig | None = None, tokenizer=None):
        from sam3_jax.model.tokenizer import SimpleTokenizer

        if tracker_cfg is None or "tracker" not in params:
            raise ValueError("this checkpoint has no tracker: text-prompted video needs the video model's "
                             "sam3.pt converted with its tracker.* weights")
        if model_cfg.image_size != tracker_cfg.image_size:
            raise ValueError(f"detector image size {model_cfg.image_size} != tracker {tracker_cfg.image_size}")
        self.model_cfg, self.tcfg = model_cfg, tracker_cfg
        self.cfg = cfg or DetectTrackConfig()
        if self.cfg.objects_per_step < 1:
            raise ValueError(f"DetectTrackConfig.objects_per_step must be >= 1, got {self.cfg.objects_per_step}")
        self.tokenizer = tokenizer or SimpleTokenizer()
        devices = jax.local_devices()
        self.block = self.cfg.detection_block if self.cfg.detection_block > 0 else len(devices)
        self.mesh = Mesh(np.array(devices[:math.gcd(self.block, len(devices))]), ("frame",))
        self._device = devices[0]
        # Detection (and the tracker's feature projection) on every device of the mesh, tracking on the
        # first with its replica of the tracker (no copy).
        self._mesh_params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self.params = {"tracker": jax.tree.map(lambda x: x.addressable_data(0), self._mesh_params["tracker"])}
        dtype = None if model_cfg.compute_dtype == "float32" else jnp.dtype(model_cfg.compute_dtype)
        self.detector = detector.Sam3Detector(model_cfg)
        self.tracker = Tracker(tracker_cfg, dtype=dtype)
        self.num_cond = tracker_cfg.max_cond_frames_in_attn
        self.slots = self.num_cond + bank_capacity(tracker_cfg) - 1
        self._text = jax.jit(self._text_fn)
        self._detect = jax.jit(jax.shard_map(self._detect_fn, mesh=self.mesh, in_specs=(P(), P("frame"), P(), P()),
                                             out_specs=P("frame")),
                               compiler_options=compiler.encoder_options(model_cfg))
        self._frame = jax.jit(lambda tree, i: jax.tree.map(lambda x: x[i][None], tree))
        self._track = jax.jit(self._track_fn, static_argnames=("slots", "reverse"))
        self._mask_prompt = jax.jit(self._mask_prompt_fn)
        self._new_objects = jax.jit(self._new_objects_fn, static_argnums=5)
        self._update_memory = jax.jit(self._update_memory_fn)
        self._fill = jax.jit(fill_holes, static_argnums=1)
        self._to_video = jax.jit(lambda x, size: ops.resize_masks(x, size) > 0, static_argnums=1)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str, cfg: DetectTrackConfig | None = None) -> DetectTrackPredictor:
        from sam3_jax.model.tokenizer import SimpleTokenizer

        read = read_video_checkpoint(checkpoint_dir, "text-prompted video")
        model_cfg = read.model_cfg.replace(joint_box_scores=True)  # the video detector's scores
        return cls(read.params, model_cfg, read.tracker_cfg, cfg, SimpleTokenizer(read.vocab))

    @property
    def capacity(self) -> int:
        """The fewest object rows a call pads to (``cfg.capacity``); a call's own count is its state's."""
        return max(1, self.cfg.capacity)

    # ----------------------------------------------------------------------------------- jitted parts
    def _trk(self, params, *args, method, **kwargs):
        return self.tracker.apply({"params": params["tracker"]}, *args, method=method, **kwargs)

    def _text_fn(self, params, token_ids):
        return self.detector.apply({"params": params["detector"]}, token_ids, method=detector.Sam3Detector.encode_text)

    def _detect_fn(self, params, images, text, text_mask):
        """B frames (one device's share of a block): detection probs (B, Q), mask logits (B, Q, h, w), and
        the tracker's features (pixel features, high-res levels)."""
        p, b = params["detector"], images.shape[0]
        feats = self.detector.apply({"params": p}, images, method=detector.Sam3Detector.encode_image)
        text, text_mask = objects.broadcast((text, text_mask), b)
        out = self.detector.apply({"params": p}, feats, text, text_mask, jnp.zeros((b, 1, 4)), jnp.ones((b, 1), bool),
                                  jnp.zeros((b, 1), jnp.int32), method=detector.Sam3Detector.ground)
        # The reference casts the tracker levels to bfloat16 when its detector hands them over.
        fpn = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in feats["sam2_backbone_fpn"]]
        high_res = self._trk(params, fpn[0], fpn[1], method=Tracker.project_high_res)
        probs = jax.nn.sigmoid(out["pred_logits"][..., 0].astype(jnp.float32))
        return probs, out["pred_masks"].astype(jnp.float32), (fpn[2], high_res)

    def _track_fn(self, params, pix, high_res, bank, valid, group, frame_idx, num_frames, *, slots: int,
                  reverse: bool):
        """Propagation without memory encoding: hole-filled low-res logits, score logits, pointers and the
        memory-selection score (mean over each group, as the reference's per-state batch). ``reverse``:
        the memories of the frames after this one (tracking backward in time). ``slots``: the spatial
        memories attended to (``slots_in_use``)."""
        memory = compact_memory(select_memory(bank, frame_idx, num_frames, self.tcfg, reverse=reverse), slots)
        out = objects.track(self._trk, params, (pix, high_res), memory, self.cfg.objects_per_step,
                            run_mem_encoder=False)
        score = out["object_score_logits"][:, 0]
        eff = group_mean(presence(score), group, valid) * group_mean(out["iou_score"], group, valid)
        low = jnp.where(valid[:, None, None], out["pred_masks"], NO_OBJ_LOGIT)
        return fill_holes(low, self.cfg.fill_hole_area), score, out["obj_ptr"], eff

    def _mask_prompt_fn(self, params, pix, high_res, det_logits):
        """``add_new_mask`` with a detection: its low-res logits, upsampled to the mask-input size and
        binarised, used as the output; -> low-res logits, pointer, score (+-10)."""
        m = self.tcfg.input_mask_size
        masks = (ops.resize_masks(det_logits, (m, m)) > 0).astype(jnp.float32)
        out = objects.prompt(self._trk, params, (pix, high_res), self.cfg.objects_per_step, masks=masks)
        return out["pred_masks"], out["obj_ptr"], out["object_score_logits"][:, 0]

    def _new_objects_fn(self, params, pix, high_res, det_logits, fresh, size):
        """New objects (``_tracker_add_new_objects``): the pointer and score of ``add_new_mask`` and the
        memory of their conditioning frame as ``propagate_in_video_preflight`` encodes it: from the mask
        prompt at the video's size (antialiased, > 0.5; where the group's masks overlap the later object
        wins), brought to the low-res grid, then to the image size, non-overlapping, binarised."""
        n, cfg = det_logits.shape[0], self.tcfg
        _, ptr, score = self._mask_prompt_fn(params, pix, high_res, det_logits)
        m = cfg.input_mask_size
        mask = (ops.resize_masks(det_logits, (m, m)) > 0).astype(jnp.float32)
        video = (ops.resize_masks(mask, size, antialias=True) > 0.5) & fresh[:, None, None]
        later = jnp.flip(jnp.cumsum(jnp.flip(video.astype(jnp.int32), 0), 0), 0) - video
        video = video & (later == 0)
        r, s = cfg.low_res_mask_size, cfg.image_size
        low = ops.resize_masks(jnp.where(video, -NO_OBJ_SCORE, NO_OBJ_SCORE), (r, r), antialias=True)
        high = non_overlap(ops.resize_masks(low, (s, s)), fresh)
        return ptr, encode_memories(self._trk, params, pix, high, jnp.ones((n,), bool), score,
                                    self.cfg.objects_per_step)

    def _update_memory_fn(self, params, pix, low_res, valid):
        """``_tracker_update_memories``: tracked masks at the memory encoder's size; a mask that loses more
        than ``1 - shrink_thresh`` of its area to pixel-wise non-overlap is suppressed; score +-10 by area."""
        n, s = low_res.shape[0], self.tcfg.mask_interpol_size
        high = ops.resize_masks(low_res, (s, s))
        before = jnp.sum(high > 0, axis=(1, 2))
        after = jnp.sum(non_overlap(high, valid) > 0, axis=(1, 2))
        keep = after / jnp.maximum(before, 1) >= self.cfg.shrink_thresh
        high = jnp.where(keep[:, None, None], high, jnp.minimum(high, NO_OBJ_LOGIT))
        score = jnp.where(jnp.any(high > 0, axis=(1, 2)), 10.0, -10.0)
        return encode_memories(self._trk, params, pix, high, jnp.zeros((n,), bool), score, self.cfg.objects_per_step)

    def _commit_fn(self, bank, feats, ptr, eff, frame_idx, is_cond, write, reset):
        """One frame stored around itself in a bank of this predictor's layout (``commit_frame``)."""
        return commit_frame(bank, self.tcfg, self.num_cond, feats, ptr, eff, frame_idx, is_cond, write, reset,
                            frame_idx)

    # ---------------------------------------------------------------------------------------- the loop
    def _detections(self, frames: FrameSource | np.ndarray, order: Sequence[int], text, text_mask,
                    st: TrackState) -> Iterator[tuple]:
        """Per frame of ``order``: (index, (H, W), probs (Q,), mask logits (Q, h, w), tracker features on
        the tracking device). Frames are read, encoded and detected ``self.block`` at a time, sharded over
        the mesh; one block is held at a time."""
        s = self.tcfg.image_size
        for start in range(0, len(order), self.block):
            chunk = order[start:start + self.block]
            images = np.zeros((self.block, s, s, 3), np.float32)  # the last block's padding: never read
            for j, f in enumerate(chunk):
                images[j] = preprocess(st.frame(frames, f), s)
            images = jax.device_put(images, NamedSharding(self.mesh, P("frame")))
            probs, det_all, feats = self._detect(self._mesh_params, images, text, text_mask)
            probs, det_all = np.asarray(probs), np.asarray(det_all)
            feats = jax.device_put(feats, self._device)
            for j, f in enumerate(chunk):  # a copy: a view would keep the whole block alive
                yield f, st.size, probs[j], det_all[j].copy(), self._frame(feats, j)
            del probs, det_all, feats  # before the next block is made

    def propagate_iter(self, frames: FrameSource | np.ndarray, prompt: str, start_frame: int = 0,
                       direction: str = "forward") -> Iterator[DetectTrackFrame]:
        """Yields every frame's result once, each pass in its processing order, delayed within the pass by
        ``hotstart_delay`` frames: forward, frames ``start_frame`` .. T-1; backward, ``start_frame`` (the
        reference's ``add_prompt``), then ``start_frame - 1`` .. 0 tracking backward in time; both, the
        forward pass, then the backward pass from ``start_frame - 1`` with every object, memory and
        heuristic state the forward pass left."""
        if direction not in DIRECTIONS:
            raise VideoInputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if not prompt or not prompt.strip():
            raise VideoInputError("give a text prompt (e.g. --prompt='person')")
        num_frames = len(frames)
        if num_frames == 0:
            raise VideoInputError("the video has no frames")
        if not 0 <= start_frame < num_frames:
            raise VideoInputError(f"start frame {start_frame} is outside the video's {num_frames} frames")
        ids = self.tokenizer([prompt], context_length=self.model_cfg.text.context_length)
        text, text_mask = self._text(self._mesh_params, jnp.asarray(ids))
        # The backward pass of "both" starts from what the forward pass reached nearest the start frame: a
        # second bank keeps it. After a one-frame forward pass ("backward") the bank itself is that.
        st = TrackState.start(self.cfg, self.tcfg, self.num_cond, self.slots,
                              seed=direction == "both" and start_frame > 0)
        end = num_frames - 1 if direction in ("forward", "both") else start_frame
        yield from self._pass(st, frames, range(start_frame, end + 1), text, text_mask, reverse=False)
        if direction != "forward" and start_frame > 0:
            if st.seed is not None:
                st.bank, st.seed = st.seed, None
            yield from self._pass(st, frames, range(start_frame - 1, -1, -1), text, text_mask, reverse=True)

    def _pass(self, st: TrackState, frames, order: range, text, text_mask, reverse: bool
              ) -> Iterator[DetectTrackFrame]:
        """``propagate_in_video`` over ``order`` (one direction): the per-frame loop, its outputs held
        ``hotstart_delay`` frames and all given at the pass's last frame."""
        cfg = self.cfg
        num_frames, anchor = len(frames), order[0]
        max_objects = cfg.max_num_objects if cfg.max_num_objects > 0 else 10000
        pending: list[Pending] = []
        for f, size, probs, det_all, (pix, high_res) in self._detections(frames, order, text, text_mask, st):
            keep = probs > cfg.score_threshold_detection
            if cfg.det_nms_thresh > 0:
                keep &= nms_keep(probs, det_all, cfg.score_threshold_detection, cfg.det_nms_thresh)
            det_idx = np.flatnonzero(keep)
            det_logits, det_scores = det_all[det_idx], probs[det_idx]

            # 2. propagate the live objects.
            obj_ids, group = st.obj_ids, st.group
            n, prev_ids = len(obj_ids), obj_ids.copy()
            valid = np.arange(st.rows) < n
            trk_low, trk_score = np.zeros((0,) + det_all.shape[1:], np.float32), np.zeros(0, np.float32)
            if n:
                slots = slots_in_use(st.bank, f, num_frames, self.tcfg, reverse=reverse)
                low, trk_score, ptr, eff = self._track(self.params, pix, high_res, st.bank, jnp.asarray(valid),
                                                       jnp.asarray(st.pad(group, -1)), f, num_frames,
                                                       slots=slots, reverse=reverse)
                trk_low, trk_score = np.array(low[:n]), np.asarray(trk_score[:n])
            if trk_low.shape[1:] != det_logits.shape[1:]:
                raise ValueError(f"detector masks {det_logits.shape[1:]} and tracker masks {trk_low.shape[1:]} differ")

            # 3. plan.
            assoc = associate(det_logits > 0, det_scores, trk_low > 0, obj_ids, cfg)
            new_det = assoc.new_det
            if n + len(new_det) > max_objects:  # keep the best-scoring new detections
                new_det = new_det[np.argsort(det_scores[new_det])[::-1][:max(0, max_objects - n)]]
            new_ids = st.max_id + 1 + np.arange(len(new_det))
            removed = st.hot.update(f, assoc, new_ids, reverse=reverse)
            recond = np.zeros(st.rows, bool)
            recond_rows = recondition_rows(assoc, obj_ids, trk_score, f, cfg)
            if recond_rows:
                recond_masks = np.zeros((st.rows,) + det_all.shape[1:], np.float32)
                for row, d in recond_rows.items():
                    recond[row], recond_masks[row] = True, det_logits[d]
                _, new_ptr, _ = self._mask_prompt(self.params, pix, high_res, jnp.asarray(recond_masks))
                ptr = jnp.where(jnp.asarray(recond)[:, None], new_ptr, ptr)
            if n and cfg.occlusion_iou_thresh > 0:
                suppress, st.last_occluded = suppress_occluded(trk_low > 0, obj_ids, st.last_occluded, removed, f,
                                                               cfg, reverse)
                trk_low[suppress] = NO_OBJ_LOGIT
            if n:
                feats = self._update_memory(self.params, pix, jnp.asarray(st.pad(trk_low, NO_OBJ_LOGIT)),
                                            jnp.asarray(valid))
                # A reconditioned object's whole group gets this frame as a conditioning frame.
                cond = jnp.asarray(valid & np.isin(st.pad(group, -1), group[recond[:n]]))
                st.commit(feats, ptr, eff, f, cond, jnp.asarray(valid), jnp.zeros(st.rows, bool), anchor)

            # 4. execute: new objects, then removals.
            if len(new_det):
                st.fit(n + len(new_det))
                rows = np.arange(st.rows)
                fresh = jnp.asarray((rows >= n) & (rows < n + len(new_det)))
                new_masks = np.zeros((st.rows,) + det_all.shape[1:], np.float32)
                new_masks[n:n + len(new_det)] = det_logits[new_det]
                new_ptr, feats = self._new_objects(self.params, pix, high_res, jnp.asarray(new_masks), fresh,
                                                   tuple(size))
                st.commit(feats, new_ptr, jnp.zeros(st.rows), f, fresh, fresh, fresh, anchor)
                st.add(new_ids, det_scores[new_det], f)
            if removed:
                st.remove(removed)

            # 5. outputs: the tracked masks of the objects live before this frame's changes, the
            # hole-filled detection masks of the new ones (rows n.. of the padded rows).
            masks, tprobs = {}, {}
            if n:
                video = np.asarray(self._to_video(jnp.asarray(st.pad(trk_low, NO_OBJ_LOGIT)), tuple(size)))
                sig = 1.0 / (1.0 + np.exp(-trk_score.astype(np.float64)))
                for k, i in enumerate(prev_ids):
                    masks[int(i)], tprobs[int(i)] = video[k], float(sig[k])
            if len(new_det):
                filled = self._fill(jnp.asarray(new_masks), cfg.fill_hole_area)
                video = np.asarray(self._to_video(filled, tuple(size)))[n:]
                for k, (i, d) in enumerate(zip(new_ids, new_det)):
                    masks[int(i)], tprobs[int(i)] = video[k], float(det_scores[d])
            pending.append(Pending(f, masks, tprobs, set(st.hot.suppressed.get(f, set()))))
            st.fit(len(st.obj_ids))  # after removals: fewer rows for the next frame
            if f == order[-1]:
                ready, pending = pending, []
            elif cfg.hotstart_delay <= 0 or len(pending) >= cfg.hotstart_delay:
                ready, pending = pending[:1], pending[1:]
            else:
                ready = []
            for p in ready:
                yield frame_output(p, st.first_score, st.hot.removed, size)
