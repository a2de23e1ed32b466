"""Text-prompted video segmentation: detect on every frame, track what was found (SAM 3's video model).

``DetectTrackPredictor.propagate_iter(frames, prompt, start_frame, direction)`` follows the reference's
``Sam3VideoInference`` detect-and-track loop (``Sam3VideoBase._det_track_one_frame``) with the heuristics
of ``build_sam3_video_model`` (temporal disambiguation on); every threshold is a field of
``DetectTrackConfig`` with the reference's default. Directions, as its video predictor's
``propagation_direction``:

* forward: ``propagate_in_video(start_frame)``, frames ``start_frame`` .. T-1 (the default, from 0);
* both: that forward pass, then ``propagate_in_video(start_frame, reverse=True)``, frames
  ``start_frame - 1`` .. 0, on the same state: every object, memory and heuristic record of the forward
  pass goes on (the start frame is not revisited); only the hot-start output buffer is per pass;
* backward: the start frame as ``add_prompt`` runs it (a forward pass of one frame, given at once), then
  that reverse pass.

In a reverse pass the tracker attends to the frames after the current one (``select_memory(reverse=True)``:
conditioning frames nearest first, the following frames, pointer distances counted backward), hot-start
counts an object as young while it was added less than ``hotstart_delay`` frames *after* the current
one and keeps, of duplicates, the one added last, and occlusion suppression compares the frames the
objects were last occluded with the reference's reversed comparison. Per frame:

1. detect: the detector with the cached text features; mask NMS; keep prob > threshold. The tracker's
   three feature levels are rounded to bfloat16 as the reference's detector hands them over. Detection
   does not depend on the tracking state, so it runs ahead of the loop a block of frames at a time
   (``detection_block``), the frames sharded over the local devices as the reference's multi-GPU
   predictor shards its frames; the loop then takes the block's frames one by one;
2. propagate: one ``track_step`` for every live object over its memory bank (only the spatial
   memories some object uses, ``compact_memory``; no memory encoding yet); small holes and
   sprinkles of the low-res masks filled (``fill_holes``);
3. plan (host-side numpy): associate detections to tracks by mask IoU, pick new objects, hot-start
   removal (unmatched / duplicated young objects), periodic reconditioning of matched tracks from
   their detection, suppression of overlapping tracks by recent occlusion; then memory encoding of the
   tracked masks (pixel-wise non-overlap, masks that shrink too much suppressed, score +-10 from area);
4. execute: new objects start from their detection mask (mask used as output, memory encoded on a
   conditioning frame, objects added on one frame forming one group as the reference's tracker state);
   removed objects are dropped;
5. output: tracked masks, or the hole-filled detection mask for a new object, at the video's size;
   delayed by ``hotstart_delay`` frames so that objects removed by hot-start are hidden retroactively;
   empty masks dropped; object-wise non-overlap by tracker score; score = detection score when added.

Static shapes: live objects occupy the first rows of arrays padded to a capacity, the least 2^k or 3 * 2^k
that holds them (`padded_rows`; grown as objects come, shrunk as they go; each size compiles once), kept in ascending id
order as the reference orders them; a validity mask marks the live rows. Each
object's ``MemoryBank`` has ``max_cond_frames_in_attn`` conditioning slots (the conditioning frames
nearest the current one in the direction of travel, which is what tracking selects) and the
tracked-frame slots the reference's rules can still reach (``video_predictor.bank_capacity``). For
``direction="both"`` (from a frame > 0) a second bank of the same size keeps, during the forward pass,
each object's conditioning and tracked frames nearest the start frame by the same rules: what the
reference's backward pass reaches of the forward pass (``video_predictor``'s seed bank, for the
objects of the detect-and-track loop). Nothing else is kept per frame but the
outputs waiting out the hot-start delay, and one block of detections: its tracker features on the
tracking device (the first of the mesh) and its detection probs and mask logits on the host. Memory is
thus bounded by the block size, not the video's length; each device of the mesh encodes (and holds the
activations of) ``detection_block / mesh size`` frames per call. The last block is padded with blank
frames (never read), so it reuses the compiled call.

Not implemented (all off in the reference's configuration): Hungarian association
(``o2o_matching_masklets_enable``), boundary suppression of detections, masklet confirmation, the
bbox-IoU reconditioning trigger, decreasing keep-alive for empty masklets, geometric (box) prompts and
interactive refinement; nor ``propagate_in_video``'s ``max_frame_num_to_track`` (a pass runs to the
video's first or last frame). The reference's predictor API also runs the prompt
frame once in ``add_prompt`` and again at the start of a forward propagation; here every frame is
processed once, as ``Sam3VideoInference.propagate_in_video`` does from the start frame (for "backward"
the one pass over the start frame is ``add_prompt``'s). Conditioning frames beyond the
``max_cond_frames_in_attn`` nearest are not kept (with memory selection off, the reference may still
attend to one among its last frames as an ordinary memory).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sam3_jax import compiler
from sam3_jax.infer.video_predictor import (
    _BIG,
    DIRECTIONS,
    FrameSource,
    VideoInputError,
    _resize,
    _slot_priority,
    bank_capacity,
    encode_memories,
    in_object_chunks,
    preprocess,
    read_video_checkpoint,
    weakest_slot,
)
from sam3_jax.model import detector
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.memory_bank import MemoryBank, compact_memory, select_memory, slots_in_use
from sam3_jax.model.tracker.tracker import NO_OBJ_SCORE, Tracker

NEVER_OCCLUDED = -1
ALWAYS_OCCLUDED = 100000  # an object removed by hot-start: later than any frame
REMOVED_SCORE = -1e4
NO_OBJ_LOGIT = -10.0


@dataclass(frozen=True)
class DetectTrackConfig:
    """The reference's ``build_sam3_video_model`` settings (``apply_temporal_disambiguation=True``)."""

    score_threshold_detection: float = 0.5  # detections kept: prob > this
    det_nms_thresh: float = 0.1  # mask NMS IoU (0 = off)
    assoc_iou_thresh: float = 0.1  # a detection overlapping a track this much is not new
    trk_assoc_iou_thresh: float = 0.5  # a track is matched if a detection overlaps it this much
    new_det_thresh: float = 0.7  # prob needed to start a new object (while tracks exist)
    hotstart_delay: int = 15  # outputs held back this many frames (0 = off)
    hotstart_unmatch_thresh: int = 8  # young objects unmatched on this many frames are removed
    hotstart_dup_thresh: int = 8  # young objects sharing a detection with an older one this often are removed
    suppress_unmatched_only_within_hotstart: bool = True
    init_trk_keep_alive: int = 30
    max_trk_keep_alive: int = 30
    min_trk_keep_alive: int = -1
    occlusion_iou_thresh: float = 0.7  # suppress_overlapping_based_on_recent_occlusion_threshold (0 = off)
    fill_hole_area: int = 16  # holes / sprinkles up to this area are filled / removed (0 = off)
    recondition_every_nth_frame: int = 16  # (<= 0: never)
    high_conf_thresh: float = 0.8  # detection prob for a reconditioning pair
    high_iou_thresh: float = 0.8  # detection-track IoU for a reconditioning pair
    recondition_score_thresh: float = 0.8  # tracker object-score logit needed to be reconditioned
    shrink_thresh: float = 0.3  # memory masks keeping less than this share after non-overlap are suppressed
    max_num_objects: int = -1  # (<= 0: no limit, the reference's 10000)
    # Least padded object count: the live objects are padded to `padded_rows` of their count, at least this.
    # Each size compiles the tracker's calls once; a higher floor trades work per frame for fewer compiles.
    capacity: int = 1
    objects_per_step: int = 4  # objects a tracker call at most (``video_predictor.in_object_chunks``)
    # Frames encoded and detected per call, sharded over gcd(detection_block, local devices) devices. The
    # default (<= 0) is one frame per local device: every device busy, each at the activation memory of a
    # one-frame call (what fits today fits), and one frame at a time on a single device. 1: one frame at a
    # time on one device; a multiple of the device count: larger batches per device, more memory.
    detection_block: int = 0


# ------------------------------------------------------------------------------- host-side heuristics
def padded_rows(n: int) -> int:
    """The static row count for ``n`` live objects: the least 2^k or 3 * 2^k >= n (1, 2, 3, 4, 6, 8, 12,
    16, 24, ...). Under a third of the rows are padding, where powers of two alone pad up to half
    (20 objects: 24 rows, not 32), for at most twice as many sizes to compile."""
    power = compiler.power_of_two_at_least(n)
    three_quarters = 3 * power // 4
    return three_quarters if power >= 4 and three_quarters >= n else power


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, h, w) and (M, h, w) bool -> (N, M) IoU; an empty union counts as 0."""
    a = a.reshape(len(a), -1).astype(np.float32)
    b = b.reshape(len(b), -1).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / np.maximum(union, 1.0)


def nms_keep(probs: np.ndarray, mask_logits: np.ndarray, prob_thresh: float, iou_thresh: float) -> np.ndarray:
    """Greedy mask NMS over the detections above ``prob_thresh`` (highest prob first; a detection is
    dropped if its IoU with a kept one exceeds ``iou_thresh``) -> keep (Q,) bool."""
    valid = np.flatnonzero(probs > prob_thresh)
    keep = np.zeros(len(probs), bool)
    if not len(valid):
        return keep
    ious = mask_iou(mask_logits[valid] > 0, mask_logits[valid] > 0)
    order = np.argsort(probs[valid], kind="stable")[::-1]
    while order.size:
        i = order[0]
        keep[valid[i]] = True
        order = order[1:][ious[i, order[1:]] <= iou_thresh]
    return keep


@dataclass
class Association:
    new_det: np.ndarray  # detection indices that start new objects
    unmatched_ids: np.ndarray  # non-empty tracks no detection matches
    empty_ids: np.ndarray  # tracks with an empty mask
    det_to_trk: dict  # detection index -> track ids it overlaps (>= assoc_iou_thresh)
    recondition: dict  # track id -> the high-confidence detection that overlaps it most


def associate(det_masks: np.ndarray, det_scores: np.ndarray, trk_masks: np.ndarray, trk_ids: np.ndarray,
              cfg: DetectTrackConfig) -> Association:
    """Matches detections (D, h, w) bool to tracks (M, h, w) bool by mask IoU (``_associate_det_trk``).

    With no track every detection is new (whatever its score, as the reference); otherwise a detection
    is new when its prob >= ``new_det_thresh`` and it overlaps no track by ``assoc_iou_thresh``.
    """
    none = np.zeros(0, np.int64)
    trk_ids = np.asarray(trk_ids, np.int64)
    if len(trk_masks) == 0:
        return Association(np.arange(len(det_masks)), none, none, {}, {})
    nonempty = trk_masks.reshape(len(trk_masks), -1).any(1)
    if len(det_masks) == 0:
        return Association(none, trk_ids[nonempty], trk_ids[~nonempty], {}, {})
    ious = mask_iou(det_masks, trk_masks)
    matched = (ious >= cfg.trk_assoc_iou_thresh).any(0)
    is_new = (det_scores >= cfg.new_det_thresh) & ~(ious >= cfg.assoc_iou_thresh).any(1)
    high = (det_scores >= cfg.high_conf_thresh) & ~is_new & (ious.max(1) >= cfg.high_iou_thresh)
    best = np.argmax(ious, axis=1)
    det_to_trk, recondition = {}, {}
    for d in range(len(det_masks)):
        det_to_trk[d] = trk_ids[ious[d] >= cfg.assoc_iou_thresh]
        if high[d]:
            recondition[int(trk_ids[best[d]])] = d
    return Association(np.flatnonzero(is_new), trk_ids[nonempty & ~matched], trk_ids[~nonempty], det_to_trk,
                       recondition)


@dataclass
class Hotstart:
    """Removal of young objects that detections do not confirm (``_process_hotstart``). Young: added less
    than ``hotstart_delay`` frames before the current one in the direction of travel (``reverse``: frames
    after it); of tracks sharing a detection, the one added first in that direction is kept."""

    cfg: DetectTrackConfig
    first_frame: dict = field(default_factory=dict)  # id -> frame it was added
    unmatched: dict = field(default_factory=lambda: defaultdict(list))  # id -> frames unmatched
    keep_alive: dict = field(default_factory=lambda: defaultdict(int))
    overlaps: dict = field(default_factory=lambda: defaultdict(list))  # (older id, id) -> frames sharing a detection
    removed: set = field(default_factory=set)
    suppressed: dict = field(default_factory=lambda: defaultdict(set))  # frame -> ids hidden on it

    def update(self, frame_idx: int, assoc: Association, new_ids: Sequence[int], reverse: bool = False) -> set:
        """Records this frame; returns the ids to remove now."""
        cfg = self.cfg
        newly = set()
        limit = frame_idx + cfg.hotstart_delay if reverse else frame_idx - cfg.hotstart_delay

        def young(i):  # first seen after ``limit`` (reverse: before it): still in hot-start
            return self.first_frame[i] < limit if reverse else self.first_frame[i] > limit
        for i in new_ids:
            self.first_frame.setdefault(int(i), frame_idx)
            self.keep_alive[int(i)] = cfg.init_trk_keep_alive
        matched = set()
        for ids in assoc.det_to_trk.values():
            matched.update(int(i) for i in ids)
        for i in matched:
            self.keep_alive[i] = min(cfg.max_trk_keep_alive, self.keep_alive[i] + 1)
        for i in assoc.unmatched_ids:
            self.unmatched[int(i)].append(frame_idx)
            self.keep_alive[int(i)] = max(cfg.min_trk_keep_alive, self.keep_alive[int(i)] - 1)
        for i, frames in self.unmatched.items():
            if i in self.removed or i in newly:
                continue
            if len(frames) >= cfg.hotstart_unmatch_thresh and young(i):
                newly.add(i)
            if self.keep_alive[i] <= 0 and not cfg.suppress_unmatched_only_within_hotstart and i not in newly:
                self.suppressed[frame_idx].add(i)
        for ids in assoc.det_to_trk.values():
            if len(ids) < 2:
                continue
            ids = [int(i) for i in ids]
            first = (max if reverse else min)(ids, key=lambda i: self.first_frame[i])
            for i in ids:
                if i != first:
                    self.overlaps[(first, i)].append(frame_idx)
        for (_, i), frames in self.overlaps.items():
            if i in self.removed or i in newly:
                continue
            if young(i) and len(frames) >= cfg.hotstart_dup_thresh:
                newly.add(i)
        self.removed |= newly
        return newly


def occlusion_suppression(masks: np.ndarray, last_occluded: np.ndarray, iou_thresh: float,
                          reverse: bool = False) -> np.ndarray:
    """Of two tracks overlapping by IoU >= ``iou_thresh``, the one occluded more recently is suppressed,
    provided the other was occluded at some point (``_get_objects_to_suppress_based_on_most_recently_occluded``).
    ``reverse``: "more recently" is the lower frame index, compared as the reference compares it (a
    never-occluded track, -1, counts as the more recent). masks (N, h, w) bool, last_occluded (N,) frame
    or -1 -> (N,) bool."""
    n = len(masks)
    if n <= 1:
        return np.zeros(n, bool)
    pairs = np.triu(mask_iou(masks, masks) >= iou_thresh, k=1)
    li, lj = last_occluded[:, None], last_occluded[None, :]
    later = np.less if reverse else np.greater
    sup_i = pairs & later(li, lj) & (lj > NEVER_OCCLUDED)
    sup_j = pairs & later(lj, li) & (li > NEVER_OCCLUDED)
    return sup_i.any(1) | sup_j.any(0)


def object_wise_non_overlap(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Where masks overlap only the object with the highest score keeps the pixel (first on ties); an
    object whose score is not positive keeps nothing (``_apply_object_wise_non_overlapping_constraints``
    with background 0). masks (N, H, W) bool, scores (N,)."""
    if len(masks) <= 1:
        return masks
    per_pixel = np.where(masks, scores[:, None, None], 0.0)
    winner = np.argmax(per_pixel, axis=0)
    own = winner[None] == np.arange(len(masks))[:, None, None]
    return masks & own & (per_pixel > 0)


def boxes_xywh(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) normalised x, y, w, h of the pixels' extent (max - min, as masks_to_boxes)."""
    n, h, w = masks.shape
    out = np.zeros((n, 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            out[i] = [xs.min() / w, ys.min() / h, (xs.max() - xs.min()) / w, (ys.max() - ys.min()) / h]
    return out


# -------------------------------------------------------------------------------- device-side pieces
def component_areas(mask):
    """(N, h, w) bool -> (N, h, w) int32: the area of each pixel's 8-connected component (0 off the mask).
    Labels spread as the minimum pixel index over 3x3 neighbourhoods until they settle."""
    n, h, w = mask.shape
    none = h * w
    labels = jnp.where(mask, jnp.arange(h * w, dtype=jnp.int32).reshape(1, h, w), none)

    def spread(state):
        lab, _ = state
        p = jnp.pad(lab, ((0, 0), (1, 1), (1, 1)), constant_values=none)
        m = lab
        for dy in range(3):
            for dx in range(3):
                m = jnp.minimum(m, p[:, dy:dy + h, dx:dx + w])
        m = jnp.where(mask, m, none)
        return m, jnp.any(m != lab)

    labels, _ = jax.lax.while_loop(lambda s: s[1], spread, spread((labels, True)))
    seg = (labels + jnp.arange(n, dtype=jnp.int32)[:, None, None] * (none + 1)).reshape(-1)
    counts = jax.ops.segment_sum(jnp.ones_like(seg), seg, num_segments=n * (none + 1))
    return jnp.where(mask, counts[seg].reshape(n, h, w), 0)


def fill_holes(logits, max_area: int):
    """``fill_holes_in_mask_scores``: background components up to ``max_area`` become 0.1, then foreground
    components up to min(max_area, half the mask's area) become -0.1. logits (N, h, w)."""
    if max_area <= 0:
        return logits
    bg = logits <= 0
    logits = jnp.where(bg & (component_areas(bg) <= max_area), 0.1, logits)
    fg = logits > 0
    limit = jnp.minimum(jnp.sum(fg, axis=(1, 2), keepdims=True) // 2, max_area)
    return jnp.where(fg & (component_areas(fg) <= limit), -0.1, logits)


def non_overlap(masks, valid):
    """Pixel-wise: only the highest-scoring valid object keeps its logit, the others are clamped to <= -10
    (``_apply_non_overlapping_constraints``; first object on ties). masks (N, H, W), valid (N,)."""
    ranked = jnp.where(valid[:, None, None], masks, -jnp.inf)
    keep = jnp.argmax(ranked, axis=0)[None] == jnp.arange(masks.shape[0])[:, None, None]
    return jnp.where(keep, masks, jnp.minimum(masks, NO_OBJ_LOGIT))


def group_mean(values, group, valid):
    """Per object, the mean of ``values`` over the valid objects of its group."""
    same = (group[:, None] == group[None, :]) & valid[None, :]
    return jnp.sum(jnp.where(same, values[None, :], 0.0), axis=1) / jnp.maximum(jnp.sum(same, axis=1), 1)


@jax.jit
def _take_rows(bank, order):
    return jax.tree.map(lambda x: x[order], bank)


@dataclass
class DetectTrackFrame:
    frame_idx: int
    obj_ids: np.ndarray  # (K,) int64, ascending
    masks: np.ndarray  # (K, H, W) bool
    probs: np.ndarray  # (K,) the detection prob when the object was added
    boxes_xywh: np.ndarray  # (K, 4) normalised


@dataclass
class _Pending:
    """One processed frame waiting out the hot-start delay."""

    frame_idx: int
    masks: dict  # id -> (H, W) bool
    tracker_probs: dict  # id -> prob
    suppressed: set


@dataclass
class _State:
    """What one propagation keeps from frame to frame, and from its forward pass to its backward pass
    (the reference's tracker states and metadata)."""

    hot: Hotstart
    bank: MemoryBank  # per live object (rows in id order), padded to the capacity
    seed: MemoryBank | None = None  # "both": what the backward pass will reach of the forward pass
    obj_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # live objects, ascending
    group: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # the frame each was added on
    last_occluded: dict = field(default_factory=dict)
    first_score: dict = field(default_factory=dict)
    max_id: int = -1
    size: tuple | None = None  # the frames' (H, W)
    size_frame: int = 0  # the frame it was read from

    def commit(self, predictor, feats, ptr, eff, frame_idx, is_cond, write, reset, anchor):
        """Stores frame ``frame_idx`` in the bank (around the current frame), and in the seed bank where it
        is among the frames nearest the pass's first frame ``anchor``."""
        self.bank = predictor._commit(self.bank, feats, ptr, eff, frame_idx, is_cond, write, reset, frame_idx,
                                      nearer_only=False)
        if self.seed is not None:
            self.seed = predictor._commit(self.seed, feats, ptr, eff, frame_idx, is_cond, write, reset, anchor,
                                          nearer_only=True)


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
        self._commit = jax.jit(self._commit_fn, static_argnames=("nearer_only",))
        self._fill = jax.jit(fill_holes, static_argnums=1)
        self._to_video = jax.jit(lambda x, size: _resize(x, size, antialias=False) > 0, static_argnums=1)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str, cfg: DetectTrackConfig | None = None) -> DetectTrackPredictor:
        from sam3_jax.convert import checkpoint
        from sam3_jax.model.tokenizer import SimpleTokenizer

        params, model_cfg, tracker_cfg = read_video_checkpoint(checkpoint_dir, "text-prompted video")
        model_cfg = model_cfg.replace(joint_box_scores=True)  # the video detector's scores
        return cls(params, model_cfg, tracker_cfg, cfg, SimpleTokenizer(f"{checkpoint_dir}/{checkpoint.VOCAB}"))

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
        text, text_mask = jax.tree.map(lambda x: jnp.broadcast_to(x, (b,) + x.shape[1:]), (text, text_mask))
        out = self.detector.apply({"params": p}, feats, text, text_mask, jnp.zeros((b, 1, 4)), jnp.ones((b, 1), bool),
                                  jnp.zeros((b, 1), jnp.int32), method=detector.Sam3Detector.ground)
        # The reference casts the tracker levels to bfloat16 when its detector hands them over.
        fpn = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in feats["sam2_backbone_fpn"]]
        high_res = self._trk(params, fpn[0], fpn[1], method=Tracker.project_high_res)
        probs = jax.nn.sigmoid(out["pred_logits"][..., 0].astype(jnp.float32))
        return probs, out["pred_masks"].astype(jnp.float32), (fpn[2], high_res)

    @staticmethod
    def _objects(pix, high_res, n):
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:]), (pix, high_res))

    def _track_fn(self, params, pix, high_res, bank, valid, group, frame_idx, num_frames, *, slots: int,
                  reverse: bool):
        """Propagation without memory encoding: hole-filled low-res logits, score logits, pointers and the
        memory-selection score (mean over each group, as the reference's per-state batch). ``reverse``:
        the memories of the frames after this one (tracking backward in time). ``slots``: the spatial
        memories attended to (``slots_in_use``)."""
        memory = compact_memory(select_memory(bank, frame_idx, num_frames, self.tcfg, reverse=reverse), slots)

        def track(memory):
            b = memory.valid.shape[0]
            return self._trk(params, *self._objects(pix, high_res, b), memory, jnp.zeros((b,), bool),
                             jnp.zeros((b, 1, 2)), jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1), bool),
                             run_mem_encoder=False, method=Tracker.track_step)

        out = in_object_chunks(track, memory, self.cfg.objects_per_step)
        score = out["object_score_logits"][:, 0]
        present = jnp.where(score > 0, 2.0 * jax.nn.sigmoid(score) - 1.0, 0.0)
        eff = group_mean(present, group, valid) * group_mean(out["iou_score"], group, valid)
        low = jnp.where(valid[:, None, None], out["pred_masks"], NO_OBJ_LOGIT)
        return fill_holes(low, self.cfg.fill_hole_area), score, out["obj_ptr"], eff

    def _mask_prompt_fn(self, params, pix, high_res, det_logits):
        """``add_new_mask`` with a detection: its low-res logits, upsampled to the mask-input size and
        binarised, used as the output; -> low-res logits, pointer, score (+-10)."""
        m = self.tcfg.input_mask_size

        def prompt(mask):
            b = mask.shape[0]
            return self._trk(params, *self._objects(pix, high_res, b), None, jnp.ones((b,), bool),
                             jnp.zeros((b, 1, 2)), jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1), bool), mask,
                             jnp.ones((b,), bool), run_mem_encoder=False, method=Tracker.track_step)

        out = in_object_chunks(prompt, (_resize(det_logits, (m, m), antialias=False) > 0).astype(jnp.float32),
                               self.cfg.objects_per_step)
        return out["pred_masks"], out["obj_ptr"], out["object_score_logits"][:, 0]

    def _new_objects_fn(self, params, pix, high_res, det_logits, fresh, size):
        """New objects (``_tracker_add_new_objects``): the pointer and score of ``add_new_mask`` and the
        memory of their conditioning frame as ``propagate_in_video_preflight`` encodes it: from the mask
        prompt at the video's size (antialiased, > 0.5; where the group's masks overlap the later object
        wins), brought to the low-res grid, then to the image size, non-overlapping, binarised."""
        n, cfg = det_logits.shape[0], self.tcfg
        _, ptr, score = self._mask_prompt_fn(params, pix, high_res, det_logits)
        m = cfg.input_mask_size
        mask = (_resize(det_logits, (m, m), antialias=False) > 0).astype(jnp.float32)
        video = (_resize(mask, size, antialias=True) > 0.5) & fresh[:, None, None]
        later = jnp.flip(jnp.cumsum(jnp.flip(video.astype(jnp.int32), 0), 0), 0) - video
        video = video & (later == 0)
        r, s = cfg.low_res_mask_size, cfg.image_size
        low = _resize(jnp.where(video, -NO_OBJ_SCORE, NO_OBJ_SCORE), (r, r), antialias=True)
        high = non_overlap(_resize(low, (s, s), antialias=False), fresh)
        return ptr, encode_memories(self._trk, params, pix, high, jnp.ones((n,), bool), score,
                                    self.cfg.objects_per_step)

    def _update_memory_fn(self, params, pix, low_res, valid):
        """``_tracker_update_memories``: tracked masks at the memory encoder's size; a mask that loses more
        than ``1 - shrink_thresh`` of its area to pixel-wise non-overlap is suppressed; score +-10 by area."""
        n, s = low_res.shape[0], self.tcfg.mask_interpol_size
        high = _resize(low_res, (s, s), antialias=False)
        before = jnp.sum(high > 0, axis=(1, 2))
        after = jnp.sum(non_overlap(high, valid) > 0, axis=(1, 2))
        keep = after / jnp.maximum(before, 1) >= self.cfg.shrink_thresh
        high = jnp.where(keep[:, None, None], high, jnp.minimum(high, NO_OBJ_LOGIT))
        score = jnp.where(jnp.any(high > 0, axis=(1, 2)), 10.0, -10.0)
        return encode_memories(self._trk, params, pix, high, jnp.zeros((n,), bool), score, self.cfg.objects_per_step)

    def _commit_fn(self, bank, feats, ptr, eff, frame_idx, is_cond, write, reset, anchor=None, *,
                   nearer_only: bool = False):
        """Stores frame ``frame_idx`` for the rows in ``write``: a conditioning frame in the free or farthest
        from ``anchor`` of the conditioning slots (with the current frame as anchor: the oldest in the
        direction of travel; the nearest are the ones ``select_memory`` picks), a tracked frame in the
        tracked-frame slot of least priority around ``anchor`` (``video_predictor.store``'s rule). Rows in
        ``reset`` are emptied first (new objects). ``nearer_only``: only where the frame has a higher
        priority than what it replaces (``store(force=False)``: the seed bank of a forward pass that a
        backward pass follows, anchored at the start frame). ``anchor`` defaults to ``frame_idx``."""
        anchor = frame_idx if anchor is None else anchor
        k = bank.frame.shape[1]
        bank = bank.replace(frame=jnp.where(reset[:, None], -1, bank.frame),
                            is_cond=jnp.where(reset[:, None], False, bank.is_cond))
        in_cond = jnp.arange(k)[None, :] < self.num_cond
        far = jnp.abs(bank.frame - anchor)
        cond_prio = jnp.where(in_cond, jnp.where(bank.frame < 0, -2 * _BIG, -far), 3 * _BIG)
        cond_slot = jnp.argmin(cond_prio, axis=1)
        free_slot, free_prio = weakest_slot(bank, self.tcfg, anchor, in_cond)
        slot = jnp.where(is_cond, cond_slot, free_slot)
        rows = jnp.arange(bank.frame.shape[0])
        if nearer_only:
            n = rows.shape[0]
            new_cond = -jnp.abs(frame_idx - anchor)
            new_trk = _slot_priority(jnp.full((n,), frame_idx, jnp.int32), eff, anchor, self.tcfg)
            old = jnp.where(is_cond, cond_prio[rows, cond_slot], free_prio)
            write = write & (jnp.where(is_cond, new_cond, new_trk) > old)

        def pick(new, old):
            return jnp.where(write.reshape((-1,) + (1,) * (old.ndim - 1)), new.astype(old.dtype), old)

        n = rows.shape[0]
        return bank.write(slot, pick(jnp.full((n,), frame_idx, jnp.int32), bank.frame[rows, slot]),
                          pick(feats, bank.feats[rows, slot]), pick(ptr, bank.ptrs[rows, slot]),
                          pick(is_cond, bank.is_cond[rows, slot]), pick(eff, bank.score[rows, slot]))

    # ---------------------------------------------------------------------------------------- the loop
    def _fit(self, st: _State, needed: int):
        """Pads the object rows of the banks to ``padded_rows(needed)`` (at least ``cfg.capacity``),
        growing or shrinking them: the tracker's work follows the live count, and each size compiles
        once. Rows past the live ones are padding (new objects reset theirs)."""
        cap = max(self.cfg.capacity, padded_rows(needed))
        if cap == self.capacity:
            return
        extra = MemoryBank.empty(self.tcfg, max(cap - self.capacity, 0), self.slots, dtype=jnp.bfloat16)

        def resize(bank):
            return jax.tree.map(lambda a, b: jnp.concatenate([a[:cap], b]), bank, extra)

        st.bank = resize(st.bank)
        st.seed = None if st.seed is None else resize(st.seed)
        self.capacity = cap

    def _pad(self, x: np.ndarray, fill=0.0):
        out = np.full((self.capacity,) + x.shape[1:], fill, x.dtype)
        out[:len(x)] = x
        return out

    def _detections(self, frames: FrameSource | np.ndarray, order: Sequence[int], text, text_mask,
                    st: _State) -> Iterator[tuple]:
        """Per frame of ``order``: (index, (H, W), probs (Q,), mask logits (Q, h, w), tracker features on
        the tracking device). Frames are read, encoded and detected ``self.block`` at a time, sharded over
        the mesh; one block is held at a time. Every frame must have the size of the first one read
        (``st.size``, set here)."""
        s = self.tcfg.image_size
        for start in range(0, len(order), self.block):
            chunk = order[start:start + self.block]
            images = np.zeros((self.block, s, s, 3), np.float32)  # the last block's padding: never read
            for j, f in enumerate(chunk):
                frame = np.asarray(frames[f])
                if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                    raise VideoInputError(f"frame {f}: expected uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
                if st.size is None:
                    st.size, st.size_frame = frame.shape[:2], f
                elif frame.shape[:2] != tuple(st.size):
                    h, w = st.size
                    raise VideoInputError(f"frame {f} is {frame.shape[1]}x{frame.shape[0]} but frame {st.size_frame} "
                                          f"is {w}x{h}; all frames must have one size")
                images[j] = preprocess(frame, s)
            images = jax.device_put(images, NamedSharding(self.mesh, P("frame")))
            probs, det_all, feats = self._detect(self._mesh_params, images, text, text_mask)
            probs, det_all = np.asarray(probs), np.asarray(det_all)
            feats = jax.device_put(feats, self._device)
            for j, f in enumerate(chunk):  # a copy: a view would keep the whole block alive
                yield f, st.size, probs[j], det_all[j].copy(), self._frame(feats, j)
            del probs, det_all, feats  # before the next block is made

    def propagate_iter(self, frames: FrameSource | np.ndarray, prompt: str, start_frame: int = 0,
                       direction: str = "forward") -> Iterator[DetectTrackFrame]:
        """Yields every frame's result, each pass in its processing order, delayed within the pass by
        ``hotstart_delay`` frames: forward, frames ``start_frame`` .. T-1; backward, ``start_frame`` (the
        prompt frame's pass of the reference's ``add_prompt``), then ``start_frame - 1`` .. 0 tracking
        backward in time; both, the forward pass, then the backward pass from ``start_frame - 1`` with
        every object, memory and heuristic state the forward pass left (the reference's video predictor
        with ``propagation_direction``). Each frame is yielded once."""
        cfg, tcfg = self.cfg, self.tcfg
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
        self.capacity = max(1, cfg.capacity)
        st = _State(hot=Hotstart(cfg), bank=MemoryBank.empty(tcfg, self.capacity, self.slots, dtype=jnp.bfloat16))
        # The backward pass of "both" starts from what the forward pass reached nearest the start frame: a
        # second bank keeps it. After a one-frame forward pass ("backward") the bank itself is that.
        if direction == "both" and start_frame > 0:
            st.seed = st.bank
        end = num_frames - 1 if direction in ("forward", "both") else start_frame
        yield from self._pass(st, frames, range(start_frame, end + 1), text, text_mask, reverse=False)
        if direction != "forward" and start_frame > 0:
            if st.seed is not None:
                st.bank, st.seed = st.seed, None
            yield from self._pass(st, frames, range(start_frame - 1, -1, -1), text, text_mask, reverse=True)

    def _pass(self, st: _State, frames, order: range, text, text_mask, reverse: bool) -> Iterator[DetectTrackFrame]:
        """``propagate_in_video`` over ``order`` (one direction): the per-frame loop, its outputs held
        ``hotstart_delay`` frames and all given at the pass's last frame."""
        cfg = self.cfg
        num_frames, anchor = len(frames), order[0]
        max_objects = cfg.max_num_objects if cfg.max_num_objects > 0 else 10000
        pending: list[_Pending] = []
        for f, size, probs, det_all, (pix, high_res) in self._detections(frames, order, text, text_mask, st):
            keep = probs > cfg.score_threshold_detection
            if cfg.det_nms_thresh > 0:
                keep &= nms_keep(probs, det_all, cfg.score_threshold_detection, cfg.det_nms_thresh)
            det_idx = np.flatnonzero(keep)
            det_logits, det_scores = det_all[det_idx], probs[det_idx]

            # 2. propagate the live objects.
            obj_ids, group = st.obj_ids, st.group
            n, prev_ids = len(obj_ids), obj_ids.copy()
            valid = np.arange(self.capacity) < n
            trk_low = np.zeros((0,) + det_all.shape[1:], np.float32)
            if n:
                slots = slots_in_use(st.bank, f, num_frames, self.tcfg, reverse=reverse)
                low, trk_score, ptr, eff = self._track(self.params, pix, high_res, st.bank, jnp.asarray(valid),
                                                       jnp.asarray(self._pad(group, -1)), f, num_frames,
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
            recond = np.zeros(self.capacity, bool)
            if (cfg.recondition_every_nth_frame > 0 and f % cfg.recondition_every_nth_frame == 0
                    and assoc.recondition):
                recond_masks = np.zeros((self.capacity,) + det_all.shape[1:], np.float32)
                for trk_id, d in assoc.recondition.items():
                    row = int(np.searchsorted(obj_ids, trk_id))
                    if trk_score[row] > cfg.recondition_score_thresh:
                        recond[row], recond_masks[row] = True, det_logits[d]
                if recond.any():
                    _, new_ptr, _ = self._mask_prompt(self.params, pix, high_res, jnp.asarray(recond_masks))
                    ptr = jnp.where(jnp.asarray(recond)[:, None], new_ptr, ptr)
            if n and cfg.occlusion_iou_thresh > 0:
                before = np.array([st.last_occluded.get(int(i), ALWAYS_OCCLUDED if int(i) in removed else
                                                        NEVER_OCCLUDED) for i in obj_ids])
                suppress = occlusion_suppression(trk_low > 0, before, cfg.occlusion_iou_thresh, reverse)
                occluded = ~(trk_low > 0).reshape(n, -1).any(1) | suppress
                st.last_occluded = {int(i): (f if occluded[k] else int(before[k])) for k, i in enumerate(obj_ids)}
                trk_low[suppress] = NO_OBJ_LOGIT
            if n:
                feats = self._update_memory(self.params, pix, jnp.asarray(self._pad(trk_low, NO_OBJ_LOGIT)),
                                            jnp.asarray(valid))
                # A reconditioned object's whole group gets this frame as a conditioning frame.
                cond = jnp.asarray(valid & np.isin(self._pad(group, -1), group[recond[:n]]))
                st.commit(self, feats, ptr, eff, f, cond, jnp.asarray(valid), jnp.zeros(self.capacity, bool), anchor)

            # 4. execute: new objects, then removals.
            if len(new_det):
                self._fit(st, n + len(new_det))
                rows = np.arange(self.capacity)
                fresh = jnp.asarray((rows >= n) & (rows < n + len(new_det)))
                new_masks = np.zeros((self.capacity,) + det_all.shape[1:], np.float32)
                new_masks[n:n + len(new_det)] = det_logits[new_det]
                new_ptr, feats = self._new_objects(self.params, pix, high_res, jnp.asarray(new_masks), fresh,
                                                   tuple(size))
                st.commit(self, feats, new_ptr, jnp.zeros(self.capacity), f, fresh, fresh, fresh, anchor)
                st.obj_ids = obj_ids = np.concatenate([obj_ids, new_ids])
                st.group = group = np.concatenate([group, np.full(len(new_det), f, np.int32)])
                st.max_id = int(new_ids[-1])
                for i, d in zip(new_ids, new_det):
                    st.first_score[int(i)] = float(det_scores[d])
            if removed:
                stay = ~np.isin(obj_ids, list(removed))
                order_rows = jnp.asarray(np.concatenate([np.flatnonzero(stay), np.flatnonzero(~stay),
                                                         np.arange(len(obj_ids), self.capacity)]))
                st.bank = _take_rows(st.bank, order_rows)
                if st.seed is not None:
                    st.seed = _take_rows(st.seed, order_rows)
                st.obj_ids, st.group = obj_ids[stay], group[stay]
                for i in removed:
                    st.first_score[i] = REMOVED_SCORE
                    st.last_occluded.pop(i, None)

            # 5. outputs: the tracked masks of the objects live before this frame's changes, the
            # hole-filled detection masks of the new ones.
            masks, tprobs = {}, {}
            if n:
                video = np.asarray(self._to_video(jnp.asarray(self._pad(trk_low, NO_OBJ_LOGIT)), tuple(size)))
                sig = 1.0 / (1.0 + np.exp(-trk_score.astype(np.float64)))
                for k, i in enumerate(prev_ids):
                    masks[int(i)], tprobs[int(i)] = video[k], float(sig[k])
            if len(new_det):
                # Padded to the capacity (static shapes): rows n.. hold the new objects.
                filled = self._fill(jnp.asarray(new_masks), cfg.fill_hole_area)
                video = np.asarray(self._to_video(filled, tuple(size)))[n:]
                for k, (i, d) in enumerate(zip(new_ids, new_det)):
                    masks[int(i)], tprobs[int(i)] = video[k], float(det_scores[d])
            pending.append(_Pending(f, masks, tprobs, set(st.hot.suppressed.get(f, set()))))
            self._fit(st, len(st.obj_ids))  # after removals: fewer rows for the next frame
            if f == order[-1]:
                ready, pending = pending, []
            elif cfg.hotstart_delay <= 0 or len(pending) >= cfg.hotstart_delay:
                ready, pending = pending[:1], pending[1:]
            else:
                ready = []
            for p in ready:
                yield self._output(p, st.first_score, st.hot.removed, size)

    def _output(self, p: _Pending, scores: dict, removed: set, size) -> DetectTrackFrame:
        """``_postprocess_output``: empty and hidden objects dropped, object-wise non-overlap."""
        ids = [i for i in sorted(p.masks) if p.masks[i].any() and i not in removed and i not in p.suppressed]
        h, w = size
        masks = np.stack([p.masks[i] for i in ids]) if ids else np.zeros((0, h, w), bool)
        boxes = boxes_xywh(masks)
        masks = object_wise_non_overlap(masks, np.array([p.tracker_probs.get(i, 0.0) for i in ids], np.float32))
        return DetectTrackFrame(frame_idx=p.frame_idx, obj_ids=np.asarray(ids, np.int64), masks=masks,
                                probs=np.array([scores[i] for i in ids], np.float32), boxes_xywh=boxes)
