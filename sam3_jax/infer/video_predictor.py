"""Promptable video object segmentation, the SAM 2 task: objects given on one frame, tracked through the video.

``VideoPredictor.propagate(frames, prompts, frame_idx, direction)`` follows the reference's
``Sam3TrackerPredictor`` (``init_state`` -> ``add_new_mask`` / ``add_new_points_or_box`` per object ->
``propagate_in_video_preflight`` -> ``propagate_in_video``, forward, backward or forward then backward
as its video predictor's ``propagation_direction="both"``), with the switches ``build_tracker`` sets:

* frames: resized to ``image_size`` square (PIL bilinear, aspect ratio not kept), scaled to [0, 1],
  stored in float16 and normalised there with mean 0.5, std 0.5, as ``io_utils`` loads a video; the
  detector's backbone gives the tracker's three feature levels (``sam2_backbone_fpn``);
* the prompt frame ``k`` (an initial conditioning frame for every object):
  - a mask prompt is bilinearly (antialiased) resized to the tracker's input mask size and used as the
    output (``_use_mask_as_output``: score +-10, the SAM heads only give the object pointer); on the
    video's grid it is binarised at 0.5 and, where mask prompts overlap, a later object's mask wins;
  - clicks / a box (two corner points, labels 2 and 3, before the clicks) in pixels of the video, scaled
    to the model's square input; with more than ``max_points`` points the first half and the last half
    are kept; multimask output for 0-1 points;
  - the memory of frame k is encoded from the objects' masks brought to the low-res grid (a mask prompt
    from its video-sized +-1024 logits), upsampled to ``image_size``, made non-overlapping (per pixel
    only the highest-scoring object stays above -10), and binarised;
* every other frame: ``track_step`` for all objects at once over the memory bank; the memory-selection
  score of a frame (SAM2Long) is, as in the reference, mean(object score) x mean(IoU) over the objects
  tracked together; memories are stored in bfloat16 as the reference stores them;
* outputs: the low-res mask logits bilinearly resized to the video's size, > 0; no non-overlap
  constraint and no hole filling (``non_overlap_masks_for_output=False``, ``fill_hole_area=0``). On the
  prompt frame the output is what ``add_new_*`` returns: the prompt mask itself, or the clicks' mask.

Bounded memory: frames are read and encoded one at a time (one jitted backbone call, one jitted tracker
step for all objects); no frame features are kept, only a fixed-size ``MemoryBank`` per object: one slot
for the prompt frame plus ``max(num_maskmem, max_obj_ptrs)`` slots for tracked frames. A new frame
replaces, in this order, an empty slot, a frame the memory selection can never pick again (score <=
``mf_threshold``; only with memory selection), the frame farthest from the current one. This keeps
exactly the frames the reference's rules can still reach. For ``direction="both"`` a second bank of
the same size keeps, during the forward pass, the forward frames nearest the prompt frame by the same
rule: they are what the reference's backward pass reaches of the forward pass (it attends across the
prompt frame to frames already tracked forward). A tracked frame attends only to the spatial memories
some object uses (``compact_memory``; one compilation per power of two up to the bank's selection), so
early frames, and frames whose memory selection drops low-scoring frames, cost less, as in the reference.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax import compiler
from sam3_jax.infer import image_io, weights
from sam3_jax.model import detector
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.memory_bank import MemoryBank, compact_memory, select_memory, slots_in_use
from sam3_jax.model.tracker.tracker import Tracker
from sam3_jax.nn import ops

DIRECTIONS = ("forward", "backward", "both")
MASK_LOGIT = 1024.0  # the reference's -NO_OBJ_SCORE: a mask prompt as video-sized logits
_BIG = 1 << 29  # slot priorities (int32): larger than any frame distance


class VideoInputError(ValueError):
    """Frames or prompts cannot be used; the message says which and why."""


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


class FrameSource(Protocol):
    """What ``propagate`` reads: len() frames, each uint8 RGB (H, W, 3), read when needed."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


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


class ImageFolderFrames:
    """The JPEG / PNG frames of a directory, in frame-number order (numeric stems, else by name).

    Every header is read up front: no frame, a file that is not an image, or a frame whose size
    differs from the first raise ``VideoInputError`` naming the file. Pixels are decoded on access.
    """

    SUFFIXES = (".jpg", ".jpeg", ".png")

    def __init__(self, directory: str):
        from PIL import Image, UnidentifiedImageError

        if not os.path.isdir(directory):
            raise VideoInputError(f"not a directory of frames: {directory}")
        names = [n for n in os.listdir(directory) if n.lower().endswith(self.SUFFIXES)
                 and os.path.isfile(os.path.join(directory, n))]
        if not names:
            raise VideoInputError(f"{directory}: no frames (expected {', '.join(self.SUFFIXES)} files)")
        stems = [os.path.splitext(n)[0] for n in names]
        if all(s.isdigit() for s in stems):
            names = [n for _, n in sorted(zip((int(s) for s in stems), names))]
        else:
            names.sort()
        self.paths = [os.path.join(directory, n) for n in names]
        self.size = None  # (H, W)
        for path in self.paths:
            try:
                with Image.open(path) as im:
                    size = (im.height, im.width)
            except (UnidentifiedImageError, OSError) as e:
                raise VideoInputError(f"{path}: cannot be read as an image ({e})") from e
            if self.size is None:
                self.size = size
            elif size != self.size:
                raise VideoInputError(f"{path}: frame is {size[1]}x{size[0]} but {self.paths[0]} is "
                                      f"{self.size[1]}x{self.size[0]}; all frames must have one size")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.paths[index]
        try:
            frame = image_io.load_image(path)
        except (OSError, ValueError) as e:
            raise VideoInputError(str(e) if path in str(e) else f"{path}: {e}") from e
        if frame.shape[:2] != self.size:
            raise VideoInputError(f"{path}: decoded as {frame.shape[1]}x{frame.shape[0]} (EXIF orientation?) but "
                                  f"frames are {self.size[1]}x{self.size[0]}")
        return frame


def preprocess(frame: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (image_size, image_size, 3): ``io_utils`` resizes with PIL, keeps the
    [0, 1] frame in float16 and normalises it there (mean 0.5, std 0.5)."""
    x = image_io.resize_square(np.asarray(frame, np.uint8), image_size).astype(np.float32) / np.float32(255.0)
    half = np.float16(0.5)
    return ((x.astype(np.float16) - half) / half).astype(np.float32)


def bank_capacity(cfg: TrackerConfig) -> int:
    """Slots per object: the prompt frame, the ``max(num_maskmem - 1, max_obj_ptrs - 1)`` tracked frames the
    rules reach, and one more, the previous frame that memory selection always takes."""
    return 1 + max(cfg.num_maskmem - 1, cfg.max_obj_ptrs - 1) + 1


def select_config(cfg: TrackerConfig) -> TrackerConfig:
    """With one prompt frame, ``select_memory`` needs one conditioning slot (the same choice, less padding)."""
    return cfg.replace(max_cond_frames_in_attn=1)


def _slot_priority(frame, score, anchor, cfg: TrackerConfig):
    """Larger = keep: nearer to ``anchor``; with memory selection frames it can never pick come last."""
    far = jnp.abs(frame - anchor)
    if cfg.use_memory_selection:
        return jnp.where(score <= cfg.mf_threshold, -_BIG - far, -far)
    return -far


def weakest_slot(bank: MemoryBank, cfg: TrackerConfig, anchor, exclude):
    """Per row: (the tracked-frame slot of least ``_slot_priority`` around ``anchor``, empty slots
    first and ``exclude``d ones never; its priority), the slot a tracked frame replaces."""
    prio = _slot_priority(bank.frame, bank.score, anchor, cfg)
    prio = jnp.where(exclude, 2 * _BIG, jnp.where(bank.frame < 0, -2 * _BIG, prio))
    slot = jnp.argmin(prio, axis=1)
    return slot, jnp.take_along_axis(prio, slot[:, None], axis=1)[:, 0]


def store(bank: MemoryBank, cfg: TrackerConfig, frame_idx, feats, ptr, score, anchor, force: bool) -> MemoryBank:
    """Writes a tracked (non-conditioning) frame into the slot of least priority (``_slot_priority``
    around ``anchor``; empty slots first, conditioning slots never). Unless ``force``, only where the new
    frame has a higher priority than what it replaces. score (B,) is the frame's memory-selection score."""
    b = bank.frame.shape[0]
    rows = jnp.arange(b)
    slot, weakest = weakest_slot(bank, cfg, anchor, bank.is_cond)
    new = _slot_priority(jnp.broadcast_to(frame_idx, (b,)), score, anchor, cfg)
    write = jnp.ones((b,), bool) if force else new > weakest

    def pick(value, old):
        return jnp.where(write.reshape((b,) + (1,) * (old.ndim - 1)), value.astype(old.dtype), old)

    return bank.write(slot, pick(jnp.broadcast_to(frame_idx, (b,)), bank.frame[rows, slot]),
                      pick(feats, bank.feats[rows, slot]), pick(ptr, bank.ptrs[rows, slot]),
                      pick(jnp.zeros((b,), bool), bank.is_cond[rows, slot]), pick(score, bank.score[rows, slot]))


def in_object_chunks(fn, per_object, chunk: int):
    """``fn(per_object)`` for a pytree of arrays with a leading object axis, at most ``chunk`` objects a
    call (a ``lax.map`` over whole chunks, then the remainder), so that the tracker's activations stop
    growing with the number of objects (a tracked frame's are about 0.5 GiB an object at 1008 in
    float32: each object's memory projected to keys and values in every memory-attention layer).
    ``fn`` must treat objects independently and return arrays with the same leading axis."""
    n = jax.tree.leaves(per_object)[0].shape[0]
    if n <= chunk:
        return fn(per_object)
    full = n - n % chunk
    stacked = jax.tree.map(lambda x: x[:full].reshape((full // chunk, chunk) + x.shape[1:]), per_object)
    out = jax.tree.map(lambda x: x.reshape((full,) + x.shape[2:]), jax.lax.map(fn, stacked))
    if full == n:
        return out
    rest = fn(jax.tree.map(lambda x: x[full:], per_object))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)


def encode_memories(apply, params, pix, masks, binarize, score, chunk: int):
    """The spatial memories of n objects from their masks at the memory encoder's input size
    (``mask_for_memory``, then ``encode_memory``), ``chunk`` objects a call. apply(params, *args, method=...) runs the tracker; pix
    (1, h, w, C) is the frame's raw features; masks (n, S, S), binarize (n,), score (n,) logits."""
    def encode(x):
        m, binarize, score = x
        mem = apply(params, m, binarize, method=Tracker.mask_for_memory)
        return apply(params, jnp.broadcast_to(pix, (m.shape[0],) + pix.shape[1:]), mem, score[:, None],
                     method=Tracker.encode_memory)

    return in_object_chunks(encode, (masks, binarize, score), chunk)


def _resize(x, size, antialias: bool):
    """(B, h, w) -> (B, *size) float32, bilinear (``F.interpolate(align_corners=False)``)."""
    if tuple(x.shape[1:]) == tuple(size):
        return x.astype(jnp.float32)
    return ops.resize_bilinear(x[..., None].astype(jnp.float32), tuple(size), antialias=antialias)[..., 0]


def read_video_checkpoint(checkpoint_dir: str, task: str) -> tuple[dict, ModelConfig, TrackerConfig]:
    """(params, detector config, tracker config) of a converted video-model checkpoint, every stack
    scanned (`weights.read`); one without a tracker is refused, naming the directory and ``task``
    (what needed the tracker)."""
    params, cfg, tracker_cfg = weights.read(checkpoint_dir, tracker=True)
    if tracker_cfg is None:
        raise VideoInputError(f"{checkpoint_dir}: the converted checkpoint has no tracker (converted from an "
                              f"image-model file?); {task} needs the video model's sam3.pt")
    return params, cfg, tracker_cfg


class VideoPredictor:
    """Tracks objects prompted on one frame through a video (see the module docstring).

    params: a converted checkpoint's ``{"detector": ..., "tracker": ...}``. ``objects_per_step``: objects
    tracked together in one call at most (``in_object_chunks``); more objects are tracked chunk by chunk.
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
        return cls(*read_video_checkpoint(checkpoint_dir, "video tracking"), objects_per_step=objects_per_step)

    # ----------------------------------------------------------------------------------- jitted parts
    def _apply(self, params, *args, method, **kwargs):
        return self.tracker.apply({"params": params}, *args, method=method, **kwargs)

    def _encode_fn(self, params, image):
        """image (1, S, S, 3) -> the tracker's raw 1x level (1, g, g, C) and projected 4x / 2x levels."""
        fpn = self.detector.apply({"params": params["detector"]}, image,
                                  method=detector.Sam3Detector.encode_image)["sam2_backbone_fpn"]
        high_res = self._apply(params["tracker"], fpn[0], fpn[1], method=Tracker.project_high_res)
        return fpn[2], high_res

    @staticmethod
    def _objects(feats, n):
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:]), feats)

    def _prompt_fn(self, params, feats, coords, labels, valid, mask_inputs, has_mask):
        """The prompt frame without memory encoding (``add_new_*``): low-res logits, pointer, score."""
        def prompt(x):
            coords, labels, valid, mask_inputs, has_mask = x
            b = coords.shape[0]
            return self._apply(params["tracker"], *self._objects(feats, b), None, jnp.ones((b,), bool), coords,
                               labels, valid, mask_inputs, has_mask, run_mem_encoder=False, method=Tracker.track_step)

        out = in_object_chunks(prompt, (coords, labels, valid, mask_inputs, has_mask), self.objects_per_step)
        return out["pred_masks"], out["obj_ptr"], out["object_score_logits"][:, 0]

    def _prompt_memory_fn(self, params, feats, low_res, video_logits, has_mask, score):
        """``_consolidate_temp_output_across_obj(run_mem_encoder=True)``: the prompt frame's memory."""
        cfg, n = self.cfg, low_res.shape[0]
        from_mask = _resize(video_logits, low_res.shape[1:], antialias=True)
        low_res = jnp.where(has_mask[:, None, None], from_mask, low_res)
        high = _resize(low_res, (cfg.image_size, cfg.image_size), antialias=False)
        if n > 1:  # _apply_non_overlapping_constraints
            keep = jnp.argmax(high, axis=0)[None] == jnp.arange(n)[:, None, None]
            high = jnp.where(keep, high, jnp.minimum(high, -10.0))
        return encode_memories(self._apply, params["tracker"], feats[0], high, jnp.ones((n,), bool), score,
                               self.objects_per_step)

    def _track_fn(self, params, feats, bank, seed, frame_idx, num_frames, prompt_frame, *, slots: int,
                  reverse: bool):
        """One tracked frame for every object, attending over ``slots`` spatial memories; returns (bank,
        seed, low-res logits, scores). The seed bank (kept in forward passes for a backward pass to
        follow) is a few small writes: always kept."""
        n = bank.frame.shape[0]
        memory = compact_memory(select_memory(bank, frame_idx, num_frames, self._select_cfg, reverse=reverse),
                                slots)

        def track(memory):
            b = memory.valid.shape[0]
            pix, high_res = self._objects(feats, b)
            return self._apply(params["tracker"], pix, high_res, memory, jnp.zeros((b,), bool), jnp.zeros((b, 1, 2)),
                               jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1), bool), method=Tracker.track_step)

        out = in_object_chunks(track, memory, self.objects_per_step)
        score = out["object_score_logits"][:, 0]
        # cal_mem_score on the objects tracked together: (B, 1) * (B,) broadcasts, so the reference's
        # mean is mean(object score) * mean(IoU), the same for every object.
        present = jnp.where(score > 0, 2.0 * jax.nn.sigmoid(score) - 1.0, 0.0)
        eff = jnp.broadcast_to(jnp.mean(present) * jnp.mean(out["iou_score"]), (n,))
        feats_mem, ptr = out["maskmem_features"], out["obj_ptr"]
        bank = store(bank, self.cfg, frame_idx, feats_mem, ptr, eff, frame_idx, force=True)
        if not reverse:
            seed = store(seed, self.cfg, frame_idx, feats_mem, ptr, eff, prompt_frame, force=False)
        return bank, seed, out["pred_masks"], score

    @staticmethod
    def _to_video_fn(low_res, size):
        return _resize(low_res, size, antialias=False)

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
            mask_inputs[i] = np.asarray(_resize(jnp.asarray(mask)[None], (m, m), antialias=True)[0])
            on_video = mask if mask.shape == (height, width) else np.asarray(
                _resize(jnp.asarray(mask)[None], (height, width), antialias=True)[0])
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
        first = self._frame(frames, frame_idx, None)
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

    def _frame(self, frames, index: int, size):
        frame = np.asarray(frames[index])
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise VideoInputError(f"frame {index}: expected uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
        if size is not None and frame.shape[:2] != tuple(size):
            raise VideoInputError(f"frame {index} is {frame.shape[1]}x{frame.shape[0]} but the prompt frame is "
                                  f"{size[1]}x{size[0]}; all frames must have one size")
        return frame

    def _step(self, frames, f, bank, seed, num_frames, prompt_frame, size, reverse):
        feats = self.encode_frame(self._frame(frames, f, size))
        slots = slots_in_use(bank, f, num_frames, self._select_cfg, reverse=reverse)
        bank, seed, low_res, score = self._track(self.params, feats, bank, seed, f, num_frames, prompt_frame,
                                                 slots=slots, reverse=reverse)
        return bank, seed, self._result(f, self._to_video(low_res, size), score)

    @staticmethod
    def _result(frame_idx, logits, score) -> FrameResult:
        logits = np.asarray(logits, np.float32)
        return FrameResult(frame_idx=frame_idx, masks=logits > 0, logits=logits, scores=np.asarray(score, np.float32))


