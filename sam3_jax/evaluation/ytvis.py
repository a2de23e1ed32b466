"""YouTube-VIS video mask AP: COCO-style AP where an instance is a masklet over a whole video.

As the YouTube-VIS cocoapi fork (`ytvoseval.py`): the IoU of two masklets is the sum over the
video's frames of their intersections over the sum of their unions (a frame where neither has a
mask adds nothing; two masklets with no pixels at all have IoU 0); an instance's area, for the
small/medium/large ranges (0-128², 128²-256², above 256²), is the mean area over the frames where
its mask is non-empty (the ground truth's `areas` field when it has one; a prediction's are always
recomputed from its masks, as the API's loadRes does, whatever `areas` it carries); crowd ground
truth is ignored. Matching, accumulation and the 12 summary numbers are pycocotools' COCOeval
unchanged: only how instances are grouped and their IoU differ.

Ground truth: a YouTube-VIS JSON ({videos: [{id, height, width, length or file_names}],
annotations: [{video_id, category_id, segmentations: [RLE | polygons | None per frame], areas?,
iscrowd?}], categories}). Predictions: [{video_id, category_id, score, segmentations}].
"""
from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from sam3_jax.data.errors import DataError
from sam3_jax.data.sources.rle import RleAnnotation
from sam3_jax.evaluation.coco import STAT_NAMES, encode_mask, load_input

AREA_RANGES = [[0, 1e5 ** 2], [0, 128 ** 2], [128 ** 2, 256 ** 2], [256 ** 2, 1e5 ** 2]]

GT_KEYS = ("category_id", "segmentations")
Masklet = list  # per frame: a compressed RLE dict, or None where the instance has no mask


def encode_masklet(masks: np.ndarray) -> list[dict]:
    """The per-frame RLEs of a bool (T, H, W) masklet, for a predictions entry."""
    return [encode_mask(m) for m in np.asarray(masks, bool)]


def masklet_ious(dts: Sequence[Masklet], gts: Sequence[Masklet]) -> np.ndarray:
    """Video IoU (D, G) between masklets of equal length: sum_t |d_t & g_t| / sum_t |d_t | g_t|,
    0 where the sum of unions is 0. Frames where a masklet is None count as empty."""
    if not dts or not gts:
        return np.zeros((len(dts), len(gts)))
    n_frames = {len(m) for m in list(dts) + list(gts)}
    if len(n_frames) != 1:
        raise ValueError(f"masklets of different lengths {sorted(n_frames)}")
    inter = np.zeros((len(dts), len(gts)))
    area_d, area_g = np.zeros(len(dts)), np.zeros(len(gts))
    for t in range(n_frames.pop()):
        di = [k for k, m in enumerate(dts) if m[t] is not None]
        gi = [k for k, m in enumerate(gts) if m[t] is not None]
        ad = mask_utils.area([dts[k][t] for k in di]) if di else np.zeros(0)
        ag = mask_utils.area([gts[k][t] for k in gi]) if gi else np.zeros(0)
        area_d[di] += ad
        area_g[gi] += ag
        if di and gi:
            # With every gt flagged crowd, pycocotools' iou is |d & g| / |d|: times |d| is the
            # intersection (rounded: it is a pixel count), for all pairs of the frame in one call.
            ratio = mask_utils.iou([dts[k][t] for k in di], [gts[k][t] for k in gi], [1] * len(gi))
            inter[np.ix_(di, gi)] += np.rint(np.asarray(ratio).reshape(len(di), len(gi)) * ad[:, None])
    union = area_d[:, None] + area_g[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


class VideoEval(COCOeval):
    """COCOeval with videos in place of images and masklets in place of masks.

    `instances` are dicts with image_id (the video id), category_id, id (> 0), area (mean
    non-empty frame area), iscrowd, masklet and, for predictions, score.
    """

    def __init__(self, gts: Sequence[dict], dts: Sequence[dict], video_ids, category_ids):
        super().__init__(iouType="segm")
        self.params.imgIds = sorted(video_ids)
        self.params.catIds = sorted(category_ids)
        self.params.areaRng = [list(r) for r in AREA_RANGES]
        self._all_gts, self._all_dts = gts, dts

    def _prepare(self):
        p = self.params
        videos, cats = set(p.imgIds), set(p.catIds)
        self._gts, self._dts = defaultdict(list), defaultdict(list)
        for gt in self._all_gts:
            gt["ignore"] = int(bool(gt["iscrowd"]))
        for out, items in ((self._gts, self._all_gts), (self._dts, self._all_dts)):
            for a in items:
                if a["image_id"] in videos and a["category_id"] in cats:
                    out[a["image_id"], a["category_id"]].append(a)
        self.evalImgs = defaultdict(list)
        self.eval = {}

    def computeIoU(self, imgId, catId):  # COCOeval's name
        gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        if not gt and not dt:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")  # as COCOeval orders them
        dt = [dt[i] for i in order][: self.params.maxDets[-1]]
        return masklet_ious([d["masklet"] for d in dt], [g["masklet"] for g in gt])


def _instance(ann: Mapping, video: Mapping, where: str, key: str, uid: int,
              required: tuple[str, ...], ground_truth: bool) -> dict:
    """One masklet as compressed RLEs of the video's size, checked by the project's RLE reader.
    Ground truth keeps its `areas` field when it has one (as ytvoseval); a prediction's areas are
    its masks' pixel counts and it is never crowd, as the API's loadRes makes them."""
    for name in required:
        if name not in ann:
            raise DataError(where, f"{key}.{name}", "missing")
    segs = ann["segmentations"]
    if not isinstance(segs, list):
        raise DataError(where, f"{key}.segmentations", "not a list of per-frame masks")
    if len(segs) != video["_length"]:
        raise DataError(where, f"{key}.segmentations",
                        f"{len(segs)} frames, but video {video['id']} has {video['_length']}")
    size = (video["height"], video["width"])
    masklet = []
    for t, s in enumerate(segs):
        # RleAnnotation validates and converts (polygons, uncompressed RLE) one frame's masks.
        frame = RleAnnotation(where, f"{key}.segmentations[{t}]", size, {} if s is None else {uid: s})
        masklet.append(frame._rles.get(uid))
    areas = ann.get("areas") if ground_truth else None
    if not isinstance(areas, list):
        present = [m for m in masklet if m is not None]
        areas = list(mask_utils.area(present)) if present else []
    nonzero = [a for a in areas if a]
    return {"id": uid, "image_id": ann["video_id"], "category_id": ann["category_id"],
            "iscrowd": int(ann.get("iscrowd", 0)) if ground_truth else 0,
            "area": float(np.mean(nonzero)) if nonzero else 0.0,
            "score": float(ann.get("score", 1.0)), "masklet": masklet}


def _videos(gt: Mapping, where: str) -> dict[Any, dict]:
    out = {}
    for n, v in enumerate(gt["videos"]):
        field = f"videos[{n}]"
        missing = [k for k in ("id", "height", "width") if not isinstance(v, dict) or k not in v]
        if missing:
            raise DataError(where, f"{field}.{missing[0]}", "missing")
        length = v.get("length", len(v.get("file_names", [])))
        if not length:
            raise DataError(where, f"{field}.length", "missing: need length or file_names")
        out[v["id"]] = {**v, "_length": int(length)}
    return out


def _masklets(items: Sequence, videos: Mapping, where: str, field: str,
              required: tuple[str, ...], ground_truth: bool) -> list[dict]:
    out = []
    for n, ann in enumerate(items):
        key = f"{field}[{n}]"
        if not isinstance(ann, dict) or "video_id" not in ann:
            raise DataError(where, f"{key}.video_id", "missing")
        if ann["video_id"] not in videos:
            raise DataError(where, f"{key}.video_id", f"video {ann['video_id']} is not in the ground truth")
        out.append(_instance(ann, videos[ann["video_id"]], where, key, n + 1, required, ground_truth))
    return out


def evaluate(gt: Mapping | str, predictions: Sequence[Mapping] | str) -> dict[str, float]:
    """The 12 summary numbers ("AP", "AP50", ..., "ARl") of YouTube-VIS video mask AP; -1 where
    there is nothing to measure, as pycocotools reports it."""
    gt, gt_where = load_input(gt, "<ground truth>")
    predictions, pred_where = load_input(predictions, "<predictions>")
    if not isinstance(gt, Mapping):
        raise DataError(gt_where, "json", "expected a YouTube-VIS ground-truth object")
    for key in ("videos", "annotations"):
        if not isinstance(gt.get(key), list):
            raise DataError(gt_where, key, "missing, or not a list, in the YouTube-VIS ground truth")
    if not isinstance(predictions, list):
        raise DataError(pred_where, "predictions", "expected a JSON list of predictions")
    videos = _videos(gt, gt_where)
    gts = _masklets(gt["annotations"], videos, gt_where, "annotations", GT_KEYS, ground_truth=True)
    dts = _masklets(predictions, videos, pred_where, "", GT_KEYS + ("score",), ground_truth=False)
    if isinstance(gt.get("categories"), list):
        cats = [c.get("id") if isinstance(c, dict) else None for c in gt["categories"]]
        if None in cats:
            raise DataError(gt_where, f"categories[{cats.index(None)}].id", "missing")
    else:  # the YouTube-VIS files have them; a hand-made one may not
        cats = sorted({g["category_id"] for g in gts})
    ev = VideoEval(gts, dts, videos.keys(), cats)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_NAMES, (float(s) for s in ev.stats)))
