"""Promptable video object segmentation, the SAM 2 task: objects given on one frame, tracked through the video.

``VideoPredictor.propagate(frames, prompts, frame_idx, direction)`` follows the reference's
``Sam3TrackerPredictor`` (``init_state``, ``add_new_mask`` / ``add_new_points_or_box`` per object,
``propagate_in_video``; forward, backward, or forward then backward as ``propagation_direction="both"``)
with the switches ``build_tracker`` sets:

* frames: resized square with PIL, normalised in float16 as the reference loads a video;
* prompt frame: a mask prompt is the output (``_use_mask_as_output``; on the video's grid a later
  object's mask wins where they overlap); clicks / a box (labels 2 and 3, first) are scaled to the
  model's input, the first and last halves kept beyond ``max_points``; its memory is encoded from the
  objects' masks made pixel-wise non-overlapping;
* every other frame: one ``track_step`` for all objects over their memory banks; the memory-selection
  score is mean(presence) x mean(IoU) over the objects tracked together, as in the reference;
* outputs: low-res logits resized to the video's size, > 0 (no non-overlap, no hole filling).

Memory stays bounded: frames are encoded one at a time and each object keeps a fixed ``MemoryBank``, the
prompt frame plus the tracked frames the reference's rules can still reach (``memory_bank.store``). For
"both" a second (seed) bank keeps, during the forward pass, the forward frames its backward pass reaches.
A frame attends only to the spatial memories some object uses (``compact_memory``).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax.infer import objects
from sam3_jax.infer.objects import in_object_chunks
from sam3_jax.infer.video_inputs import (
    DIRECTIONS,
    FrameSource,
    ImageFolderFrames,
    VideoInputError,
    preprocess,
    read_frame,
    read_video_checkpoint,
)
from sam3_jax.model import detector
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.memory_bank import (
    MemoryBank,
    bank_capacity,
    compact_memory,
    select_memory,
    slots_in_use,
    store,
)
from sam3_jax.model.tracker.memory_score import presence
from sam3_jax.model.tracker.tracker import Tracker
from sam3_jax.nn import compiler, ops

# The predictor, its prompts and results, and what it shares with the detect-and-track predictor.
__all__ = ["DIRECTIONS", "Box", "Clicks", "FrameResult", "FrameSource", "ImageFolderFrames", "Prompt",
           "VideoInputError", "VideoPredictor", "VideoResult", "bank_capacity", "in_object_chunks", "preprocess",
           "read_video_checkpoint", "select_config", "store"]

MASK_LOGIT = 1024.0  # the reference's -NO_OBJ_SCORE: a mask prompt as video-sized logits


@dataclass(frozen=True)
class Box:
    """A box prompt in pixels of the video frame (x0, y0) top-left, (x1, y1) bottom-right."""

    x0: float
    y0: float
    x1: float
    y1: float


@dataclass(frozen=True)
class Clicks:
    """Clicks in pixels of the video frame, (x, y), with labels 1 (positive) or 0 (negative); an
    optional box goes first, as the reference's ``add_new_points_or_box`` puts it."""

    points: Sequence[Sequence[float]] = ()
    labels: Sequence[int] = ()
    box: Box | None = None


Prompt = np.ndarray | Box | Clicks  # a mask (h, w) bool / {0, 1}, any size (resized like the reference)


@dataclass
class FrameResult:
    frame_idx: int
    masks: np.ndarray  # (O, H, W) bool
    logits: np.ndarray  # (O, H, W) float32 mask logits at the video's size
    scores: np.ndarray  # (O,) object score logits (> 0: present)


@dataclass
class VideoResult:
    obj_ids: list
    masks: np.ndarray  # (T, O, H, W) bool; False on frames not reached by the direction
    scores: np.ndarray  # (T, O) object score logits; NaN on frames not reached
    tracked: np.ndarray  # (T,) bool: frames with a result


def select_config(cfg: TrackerConfig) -> TrackerConfig:
    """With one prompt frame, ``select_memory`` needs one conditioning slot (the same choice, less padding)."""
    return cfg.replace(max_cond_frames_in_attn=1)


class VideoPredictor:
    """Tracks objects prompted on one frame through a video (see the module docstring).

    params: a converted checkpoint's ``{"detector": ..., "tracker": ...}``. ``objects_per_step``: objects
    tracked together in one call at most (``objects.in_object_chunks``); more objects are tracked chunk by chunk.
    """

    def __init__(self, params, model_cfg: ModelConfig, tracker_cfg: TrackerConfig | None, objects_per_step: int = 4):
        if tracker_cfg is None or "tracker" not in params:
            raise ValueError("this checkpoint has no tracker (an image-model checkpoint?): video tracking needs "
                             "the video model's sam3.pt converted with its tracker.* weights")
        if not model_cfg.neck.add_sam2_neck:
            raise ValueError("the detector has no tracker neck (sam2_convs): cannot feed the tracker")
        if model_cfg.image_size != tracker_cfg.image_size:
            raise ValueError(f"detector image size {model_cfg.image_size} != tracker image size "
                             f"{tracker_cfg.image_size}")
        if objects_per_step < 1:
            raise ValueError(f"objects_per_step must be >= 1, got {objects_per_step}")
        self.model_cfg, self.cfg = model_cfg, tracker_cfg
        self.params, self.objects_per_step = params, objects_per_step
        dtype = None if model_cfg.compute_dtype == "float32" else jnp.dtype(model_cfg.compute_dtype)
        self.detector = detector.Sam3Detector(model_cfg)
        self.tracker = Tracker(tracker_cfg, dtype=dtype)
        self._select_cfg = select_config(tracker_cfg)
        self.capacity = bank_capacity(tracker_cfg)
        self._encode = jax.jit(self._encode_fn, compiler_options=compiler.encoder_options(model_cfg))
        self._prompt = jax.jit(self._prompt_fn)
        self._prompt_memory = jax.jit(self._prompt_memory_fn)
        self._track = jax.jit(self._track_fn, static_argnames=("slots", "reverse"))
        self._to_video = jax.jit(self._to_video_fn, static_argnums=1)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str, objects_per_step: int = 4) -> VideoPredictor:
        read = read_video_checkpoint(checkpoint_dir, "video tracking")
        return cls(read.params, read.model_cfg, read.tracker_cfg, objects_per_step=objects_per_step)

    # ----------------------------------------------------------------------------------- jitted parts
    def _apply(self, params, *args, method, **kwargs):
        return self.tracker.apply({"params": params}, *args, method=method, **kwargs)

    def _encode_fn(self, params, image):
        """image (1, S, S, 3) -> the tracker's raw 1x level (1, g, g, C) and projected 4x / 2x levels."""
        fpn = self.detector.apply({"params": params["detector"]}, image,
                                  method=detector.Sam3Detector.encode_image)["sam2_backbone_fpn"]
        high_res = self._apply(params["tracker"], fpn[0], fpn[1], method=Tracker.project_high_res)
        return fpn[2], high_res

    def _prompt_fn(self, params, feats, coords, labels, valid, mask_inputs, has_mask):
        """The prompt frame without memory encoding (``add_new_*``): low-res logits, pointer, score."""
        out = objects.prompt(self._apply, params["tracker"], feats, self.objects_per_step, (coords, labels, valid),
                             mask_inputs, has_mask)
        return out["pred_masks"], out["obj_ptr"], out["object_score_logits"][:, 0]

    def _prompt_memory_fn(self, params, feats, low_res, video_logits, has_mask, score):
        """``_consolidate_temp_output_across_obj(run_mem_encoder=True)``: the prompt frame's memory."""
        cfg, n = self.cfg, low_res.shape[0]
        from_mask = ops.resize_masks(video_logits, low_res.shape[1:], antialias=True)
        low_res = jnp.where(has_mask[:, None, None], from_mask, low_res)
        high = objects.non_overlap(ops.resize_masks(low_res, (cfg.image_size, cfg.image_size)), jnp.ones((n,), bool))
        return objects.encode_memories(self._apply, params["tracker"], feats[0], high, jnp.ones((n,), bool), score,
                                       self.objects_per_step)

    def _track_fn(self, params, feats, bank, seed, frame_idx, num_frames, prompt_frame, *, slots: int,
                  reverse: bool):
        """One tracked frame for every object, attending over ``slots`` spatial memories; returns (bank,
        seed, low-res logits, scores). The seed bank (kept in forward passes for a backward pass to
        follow) is a few small writes: always kept."""
        n = bank.frame.shape[0]
        memory = compact_memory(select_memory(bank, frame_idx, num_frames, self._select_cfg, reverse=reverse),
                                slots)
        out = objects.track(self._apply, params["tracker"], feats, memory, self.objects_per_step,
                            run_mem_encoder=True)
        score = out["object_score_logits"][:, 0]
        # cal_mem_score on the objects tracked together: (B, 1) * (B,) broadcasts, so the reference's
        # mean is mean(object score) * mean(IoU), the same for every object.
        eff = jnp.broadcast_to(jnp.mean(presence(score)) * jnp.mean(out["iou_score"]), (n,))
        feats_mem, ptr = out["maskmem_features"], out["obj_ptr"]
        bank = store(bank, self.cfg, frame_idx, feats_mem, ptr, eff, frame_idx, force=True)
        if not reverse:
            seed = store(seed, self.cfg, frame_idx, feats_mem, ptr, eff, prompt_frame, force=False)
        return bank, seed, out["pred_masks"], score

    @staticmethod
    def _to_video_fn(low_res, size):
        return ops.resize_masks(low_res, size)

    # ---------------------------------------------------------------------------------------- inputs
    def encode_frame(self, frame: np.ndarray):
        image = preprocess(frame, self.cfg.image_size)[None]
        return self._encode(self.params, jnp.asarray(image))

    def _point_prompt(self, prompt: Clicks, obj_id, height: int, width: int):
        points = [] if prompt.box is None else [(prompt.box.x0, prompt.box.y0), (prompt.box.x1, prompt.box.y1)]
        labels = [] if prompt.box is None else [2, 3]
        if len(prompt.points) != len(prompt.labels):
            raise VideoInputError(f"object {obj_id}: {len(prompt.points)} points but {len(prompt.labels)} labels")
        points += [tuple(p) for p in prompt.points]
        labels += [int(v) for v in prompt.labels]
        if not points:
            raise VideoInputError(f"object {obj_id}: a click prompt needs at least one point or a box")
        if any(v not in (0, 1) for v in labels[2 if prompt.box else 0:]):
            raise VideoInputError(f"object {obj_id}: click labels must be 1 (positive) or 0 (negative)")
        xy = np.asarray(points, np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or not np.all(np.isfinite(xy)):
            raise VideoInputError(f"object {obj_id}: points must be finite (x, y) pairs, got {points}")
        if prompt.box is not None and (prompt.box.x1 <= prompt.box.x0 or prompt.box.y1 <= prompt.box.y0):
            raise VideoInputError(f"object {obj_id}: box needs x1 > x0 and y1 > y0, got {prompt.box}")
        # rel_coordinates: normalised by the video size, then in pixels of the model's square input.
        xy = (xy / np.array([width, height]) * self.cfg.image_size).astype(np.float32)
        labels = np.asarray(labels, np.int32)
        p = self.cfg.max_points
        if len(labels) > p:  # max_point_num_in_prompt_enc: the first half and the last half
            keep = np.r_[0:p // 2, len(labels) - (p - p // 2):len(labels)]
            xy, labels = xy[keep], labels[keep]
        return xy, labels

    def prompt_arrays(self, prompts: Mapping, height: int, width: int) -> dict:
        """Static-shape prompt inputs for the objects in ``prompts`` order."""
        n, p, m = len(prompts), self.cfg.max_points, self.cfg.input_mask_size
        a = {"coords": np.zeros((n, p, 2), np.float32), "labels": np.zeros((n, p), np.int32),
             "valid": np.zeros((n, p), bool), "has_mask": np.zeros((n,), bool), "masks": {}}
        for i, (obj_id, prompt) in enumerate(prompts.items()):
            if isinstance(prompt, Box):
                prompt = Clicks(box=prompt)
            if isinstance(prompt, Clicks):
                xy, labels = self._point_prompt(prompt, obj_id, height, width)
                k = len(labels)
                a["coords"][i, :k], a["labels"][i, :k], a["valid"][i, :k] = xy, labels, True
                continue
            mask = np.asarray(prompt)
            if mask.ndim != 2 or mask.size == 0 or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)):
                raise VideoInputError(f"object {obj_id}: a mask prompt must be a 2-D bool array, got "
                                      f"{mask.dtype} {mask.shape}")
            a["masks"][i] = mask.astype(np.float32)
            a["has_mask"][i] = True
        mask_inputs = np.zeros((n, m, m), np.float32)
        video = np.zeros((n, height, width), bool)
        for i, mask in a["masks"].items():
            mask_inputs[i] = np.asarray(ops.resize_masks(jnp.asarray(mask)[None], (m, m), antialias=True)[0])
            on_video = mask if mask.shape == (height, width) else np.asarray(
                ops.resize_masks(jnp.asarray(mask)[None], (height, width), antialias=True)[0])
            video[i] = on_video > 0.5
        # add_new_mask: a mask prompt removes itself from the mask prompts added before it.
        claimed = np.zeros((height, width), bool)
        for i in sorted(a["masks"], reverse=True):
            video[i] &= ~claimed
            claimed |= video[i]
        a["mask_inputs"], a["video_masks"] = mask_inputs, video
        return a

    # ----------------------------------------------------------------------------------- propagation
    def propagate_iter(self, frames: FrameSource | np.ndarray, prompts: Mapping, frame_idx: int = 0,
                       direction: str = "forward") -> Iterator[FrameResult]:
        """Yields the prompt frame's result, then each tracked frame's in processing order (forward:
        frame_idx+1 .. T-1; backward: frame_idx-1 .. 0; both: forward, then backward)."""
        if direction not in DIRECTIONS:
            raise VideoInputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if isinstance(frames, np.ndarray) and (frames.ndim != 4 or frames.shape[-1] != 3):
            raise VideoInputError(f"frames must be (T, H, W, 3) uint8, got {frames.shape}")
        num_frames = len(frames)
        if num_frames == 0:
            raise VideoInputError("the video has no frames")
        if not prompts:
            raise VideoInputError("no objects: give at least one prompt")
        if not 0 <= frame_idx < num_frames:
            raise VideoInputError(f"prompt frame {frame_idx} is outside the video's {num_frames} frames")
        first = read_frame(frames, frame_idx)
        size = first.shape[:2]
        a = self.prompt_arrays(prompts, *size)
        feats = self.encode_frame(first)
        has_mask = jnp.asarray(a["has_mask"])
        low_res, ptr, score = self._prompt(
            self.params, feats, jnp.asarray(a["coords"]), jnp.asarray(a["labels"]), jnp.asarray(a["valid"]),
            jnp.asarray(a["mask_inputs"]) if a["has_mask"].any() else None, has_mask if a["has_mask"].any() else None)
        video_logits = jnp.where(jnp.asarray(a["video_masks"]), MASK_LOGIT, -MASK_LOGIT)
        mem = self._prompt_memory(self.params, feats, low_res, video_logits, has_mask, score)
        n = len(prompts)
        bank = MemoryBank.empty(self.cfg, n, self.capacity, dtype=jnp.bfloat16)  # stored as the reference does
        bank = bank.write(0, frame_idx, mem, ptr, True, 0.0)
        logits = jnp.where(has_mask[:, None, None], video_logits, self._to_video(low_res, size))
        yield self._result(frame_idx, logits, score)

        seed = bank
        if direction in ("forward", "both"):
            for f in range(frame_idx + 1, num_frames):
                bank, seed, out = self._step(frames, f, bank, seed, num_frames, frame_idx, size, reverse=False)
                yield out
        if direction in ("backward", "both"):
            bank = seed  # the prompt frame, and the forward frames the backward pass still reaches
            for f in range(frame_idx - 1, -1, -1):
                bank, _, out = self._step(frames, f, bank, bank, num_frames, frame_idx, size, reverse=True)
                yield out

    def propagate(self, frames: FrameSource | np.ndarray, prompts: Mapping, frame_idx: int = 0,
                  direction: str = "forward") -> VideoResult:
        """All frames' results at once: (T, O, H, W) bool masks and (T, O) object scores."""
        num_frames, masks, scores, tracked = len(frames), None, None, None
        for r in self.propagate_iter(frames, prompts, frame_idx, direction):
            if masks is None:
                masks = np.zeros((num_frames,) + r.masks.shape, bool)
                scores = np.full((num_frames, len(prompts)), np.nan, np.float32)
                tracked = np.zeros((num_frames,), bool)
            masks[r.frame_idx], scores[r.frame_idx], tracked[r.frame_idx] = r.masks, r.scores, True
        return VideoResult(obj_ids=list(prompts), masks=masks, scores=scores, tracked=tracked)

    def _step(self, frames, f, bank, seed, num_frames, prompt_frame, size, reverse):
        feats = self.encode_frame(read_frame(frames, f, size, "the prompt frame"))
        slots = slots_in_use(bank, f, num_frames, self._select_cfg, reverse=reverse)
        bank, seed, low_res, score = self._track(self.params, feats, bank, seed, f, num_frames, prompt_frame,
                                                 slots=slots, reverse=reverse)
        return bank, seed, self._result(f, self._to_video(low_res, size), score)

    @staticmethod
    def _result(frame_idx, logits, score) -> FrameResult:
        logits = np.asarray(logits, np.float32)
        return FrameResult(frame_idx=frame_idx, masks=logits > 0, logits=logits, scores=np.asarray(score, np.float32))


