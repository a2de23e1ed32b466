"""The detect-and-track loop's settings and its host-side (numpy) heuristics, as the reference's
``Sam3VideoBase`` applies them between detection and tracking: detection NMS, association of
detections to tracks, hot-start removal of unconfirmed young objects, suppression of overlapping
tracks by recent occlusion, and the post-processing of a frame's output."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sam3_jax.nn import ops

NEVER_OCCLUDED = -1
ALWAYS_OCCLUDED = 100000  # an object removed by hot-start: later than any frame
REMOVED_SCORE = -1e4


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
    objects_per_step: int = 4  # objects a tracker call at most (``objects.in_object_chunks``)
    # Frames encoded and detected per call, sharded over gcd(detection_block, local devices) devices. The
    # default (<= 0) is one frame per local device: every device busy, each at the activation memory of a
    # one-frame call (what fits today fits), and one frame at a time on a single device. 1: one frame at a
    # time on one device; a multiple of the device count: larger batches per device, more memory.
    detection_block: int = 0


def padded_rows(n: int) -> int:
    """The static row count for ``n`` live objects: the least 2^k or 3 * 2^k >= n (1, 2, 3, 4, 6, 8, 12,
    16, 24, ...). Under a third of the rows are padding, where powers of two alone pad up to half
    (20 objects: 24 rows, not 32), for at most twice as many sizes to compile."""
    power = ops.power_of_two_at_least(n)
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


def suppress_occluded(trk_masks: np.ndarray, obj_ids: np.ndarray, last_occluded: dict, removed: set, frame_idx: int,
                      cfg: DetectTrackConfig, reverse: bool = False) -> tuple[np.ndarray, dict]:
    """``occlusion_suppression`` of this frame's tracks (N, h, w) bool -> (the tracks to suppress (N,), each
    track's last occluded frame after this one: empty or suppressed now). An object hot-start removes
    on this frame counts as occluded after every frame."""
    before = np.array([last_occluded.get(int(i), ALWAYS_OCCLUDED if int(i) in removed else NEVER_OCCLUDED)
                       for i in obj_ids])
    suppress = occlusion_suppression(trk_masks, before, cfg.occlusion_iou_thresh, reverse)
    occluded = ~trk_masks.reshape(len(trk_masks), -1).any(1) | suppress
    return suppress, {int(i): (frame_idx if occluded[k] else int(before[k])) for k, i in enumerate(obj_ids)}


def recondition_rows(assoc: Association, obj_ids: np.ndarray, trk_scores: np.ndarray, frame_idx: int,
                     cfg: DetectTrackConfig) -> dict:
    """Row -> detection index: the tracks reconditioned from a detection on this frame (every
    ``recondition_every_nth_frame``: those a high-confidence detection overlaps, if their object-score
    logit exceeds ``recondition_score_thresh``)."""
    if cfg.recondition_every_nth_frame <= 0 or frame_idx % cfg.recondition_every_nth_frame != 0:
        return {}
    rows = {}
    for trk_id, d in assoc.recondition.items():
        row = int(np.searchsorted(obj_ids, trk_id))
        if trk_scores[row] > cfg.recondition_score_thresh:
            rows[row] = d
    return rows


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


@dataclass
class DetectTrackFrame:
    frame_idx: int
    obj_ids: np.ndarray  # (K,) int64, ascending
    masks: np.ndarray  # (K, H, W) bool
    probs: np.ndarray  # (K,) the detection prob when the object was added
    boxes_xywh: np.ndarray  # (K, 4) normalised


@dataclass
class Pending:
    """One processed frame waiting out the hot-start delay."""

    frame_idx: int
    masks: dict  # id -> (H, W) bool
    tracker_probs: dict  # id -> prob
    suppressed: set


def frame_output(p: Pending, scores: dict, removed: set, size) -> DetectTrackFrame:
    """``_postprocess_output``: empty and hidden objects dropped, object-wise non-overlap; ``scores``:
    each object's detection prob when it was added."""
    ids = [i for i in sorted(p.masks) if p.masks[i].any() and i not in removed and i not in p.suppressed]
    h, w = size
    masks = np.stack([p.masks[i] for i in ids]) if ids else np.zeros((0, h, w), bool)
    boxes = boxes_xywh(masks)
    masks = object_wise_non_overlap(masks, np.array([p.tracker_probs.get(i, 0.0) for i in ids], np.float32))
    return DetectTrackFrame(frame_idx=p.frame_idx, obj_ids=np.asarray(ids, np.int64), masks=masks,
                            probs=np.array([scores[i] for i in ids], np.float32), boxes_xywh=boxes)
