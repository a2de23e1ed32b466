"""DAVIS J&F: region similarity J (mask IoU) and boundary measure F, as in the DAVIS 2017
semi-supervised evaluation (davis2017-evaluation: `db_eval_iou`, `db_eval_boundary`,
`db_statistics`), so numbers compare with published tables.

Differences from that code, none of which changes a DAVIS result: boundary matching uses a
Euclidean distance transform instead of dilating with a disk (the same pixels match, for the
integer radius the default threshold always gives), and the decay bins use int64 indices where
the original's uint8 wraps around for sequences longer than 256 frames.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

BOUND_TH = 0.008  # boundary tolerance as a fraction of the image diagonal (DAVIS default)
RECALL_TH = 0.5  # a frame "recalls" an object when its measure exceeds this
DECAY_BINS = 4
STAT_NAMES = ("Mean", "Recall", "Decay")


@dataclasses.dataclass(frozen=True)
class VideoScores:
    """Per-frame measures of one video's objects: float arrays (O, T') where T' is the number of
    frames evaluated (the clip's frames less the first and last ones by default)."""

    j: np.ndarray
    f: np.ndarray


def region_similarity(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """J: IoU over the last two (H, W) axes; 1 where both masks are empty (nothing to miss).

    `void` pixels (e.g. DAVIS's label 255) count for neither intersection nor union.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} shapes differ")
    keep = True if void is None else ~np.asarray(void, bool)
    inter = np.sum(pred & gt & keep, axis=(-2, -1))
    union = np.sum((pred | gt) & keep, axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = inter / union
    return np.where(union == 0, 1.0, j)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of a 2-D binary mask (DAVIS's `seg2bmap`).

    A pixel is on the boundary when it differs from its right, lower or lower-right neighbour, so
    the boundary sits half a pixel towards the origin: the last row and column of the object
    inside it, the row and column before its first ones outside it. On the image's last row and
    column only the neighbour still inside the image is compared; the bottom-right pixel never is.
    """
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"boundary_map expects a 2-D mask, got shape {m.shape}")
    right = np.zeros_like(m)
    below = np.zeros_like(m)
    diag = np.zeros_like(m)
    right[:, :-1] = m[:, 1:]
    below[:-1, :] = m[1:, :]
    diag[:-1, :-1] = m[1:, 1:]
    b = (m ^ right) | (m ^ below) | (m ^ diag)
    b[-1, :] = m[-1, :] ^ right[-1, :]
    b[:, -1] = m[:, -1] ^ below[:, -1]
    b[-1, -1] = False
    return b


def boundary_radius(shape: tuple[int, int], bound_th: float = BOUND_TH) -> float:
    """Matching tolerance in pixels: `bound_th` itself when >= 1, else that fraction of the
    diagonal rounded up (DAVIS 480p: 8 pixels)."""
    if bound_th >= 1:
        return float(bound_th)
    return float(math.ceil(bound_th * math.hypot(*shape)))


def _matched(points: np.ndarray, targets: np.ndarray, radius: float) -> int:
    """How many `points` pixels lie within `radius` (Euclidean) of some `targets` pixel: the same
    count as `points & dilate(targets, disk(radius))` for an integer radius."""
    dist = ndimage.distance_transform_edt(~targets)
    return int(np.count_nonzero(dist[points] <= radius))


def boundary_f(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
               bound_th: float = BOUND_TH) -> float:
    """F: harmonic mean of boundary precision and recall for one (H, W) frame (DAVIS `f_measure`).

    Edge cases as DAVIS: no predicted boundary and no gt boundary -> 1; only one of them empty ->
    precision/recall of (1, 0) or (0, 1), hence F = 0.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"boundary_f expects two (H, W) masks, got {pred.shape} and {gt.shape}")
    if void is not None:
        keep = ~np.asarray(void, bool)
        pred, gt = pred & keep, gt & keep
    radius = boundary_radius(pred.shape, bound_th)
    pb, gb = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = np.count_nonzero(pb), np.count_nonzero(gb)
    if n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    elif n_pred == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = _matched(pb, gb, radius) / n_pred
        recall = _matched(gb, pb, radius) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def evaluate_video(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
                   skip_first_last: bool = True, bound_th: float = BOUND_TH) -> VideoScores:
    """Per-frame J and F of every object of one video.

    pred, gt: bool (T, O, H, W), object o of pred scored against object o of gt. void: optional
    bool (T, H, W) or (T, O, H, W) of pixels to ignore. skip_first_last drops frame 0 (given to
    the tracker in the semi-supervised task) and the last frame, as the DAVIS benchmark does.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.ndim != 4 or pred.shape != gt.shape:
        raise ValueError(f"expected pred and gt of the same shape (T, O, H, W); got {pred.shape} "
                         f"and {gt.shape}")
    if void is not None:
        void = np.asarray(void, bool)
        if void.ndim == 3:
            void = void[:, None]
        void = np.broadcast_to(void, pred.shape)
    if skip_first_last:
        if pred.shape[0] < 3:
            raise ValueError(f"skip_first_last needs at least 3 frames, got {pred.shape[0]}")
        pred, gt = pred[1:-1], gt[1:-1]
        void = None if void is None else void[1:-1]
    t, o = pred.shape[:2]
    j = region_similarity(pred, gt, void)
    f = np.zeros((t, o))
    for ti in range(t):
        for oi in range(o):
            v = None if void is None else void[ti, oi]
            f[ti, oi] = boundary_f(pred[ti, oi], gt[ti, oi], v, bound_th)
    return VideoScores(j=np.asarray(j, float).T, f=f.T)


def statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame measures (DAVIS `db_statistics`).

    Recall: fraction of frames above 0.5. Decay: mean of the first quarter of the frames minus
    mean of the last quarter, with the quarters' bounds rounded half up and shared by
    neighbouring bins, exactly as DAVIS cuts them.
    """
    values = np.asarray(values, float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"statistics expects a non-empty 1-D array, got shape {values.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, as DAVIS
        mean = float(np.nanmean(values))
        recall = float(np.mean(values > RECALL_TH))
        edges = (np.round(np.linspace(1, values.size, DECAY_BINS + 1) + 1e-10) - 1).astype(np.int64)
        bins = [values[edges[i]:edges[i + 1] + 1] for i in range(DECAY_BINS)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[-1]))
    return mean, recall, decay


def per_object(scores: VideoScores) -> dict[str, np.ndarray]:
    """"J-Mean", "J-Recall", ..., "F-Decay" -> float array (O,) for the objects of one video."""
    out = {}
    for name, values in (("J", scores.j), ("F", scores.f)):
        stats = np.array([statistics(v) for v in values]).reshape(-1, 3)
        for k, stat in enumerate(STAT_NAMES):
            out[f"{name}-{stat}"] = stats[:, k]
    return out


def summarize(scores: VideoScores | Sequence[VideoScores]) -> dict[str, float]:
    """The DAVIS semi-supervised table over all objects of all videos (each object weighs the
    same, whatever its video): "J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean",
    "F-Recall", "F-Decay"; "J&F-Mean" = (J-Mean + F-Mean) / 2."""
    if isinstance(scores, VideoScores):
        scores = [scores]
    objects = [per_object(s) for s in scores]
    pooled = {k: np.concatenate([o[k] for o in objects]) for k in objects[0]} if objects else {}
    if not pooled or pooled["J-Mean"].size == 0:
        raise ValueError("no objects to summarize")
    table = {k: float(np.mean(v)) for k, v in pooled.items()}
    return {"J&F-Mean": (table["J-Mean"] + table["F-Mean"]) / 2, **table}
