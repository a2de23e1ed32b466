"""COCO box and mask AP through pycocotools' own COCOeval, so the numbers are the official ones.

Ground truth is a COCO dataset dict (or its JSON file); detections are the usual results list of
{image_id, category_id, score, bbox (xywh) and/or segmentation (RLE)} (or its JSON file).
`gt_from_arrays` / `detections_from_arrays` build both from per-image arrays in memory.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sam3_jax.data.errors import DataError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")  # order of COCOeval.stats
IOU_TYPES = ("bbox", "segm")


def load_json(path: str) -> Any:
    """A JSON file's content; a missing or malformed file is a DataError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(path, "json", f"cannot read: {e}") from e


def encode_mask(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of one (H, W) mask, counts as str so it can go into JSON."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def load_input(value, name: str):
    """(object, where): a JSON file's content and its path, or an in-memory object and ``name``
    (where = what errors name)."""
    return (load_json(value), value) if isinstance(value, str) else (value, name)


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _instances(boxes, masks, n: int):
    """(xywh boxes, RLEs or None) of one image's instances; boxes from masks when not given."""
    rles = None if masks is None else [encode_mask(m) for m in np.asarray(masks, bool)]
    if boxes is not None:
        xywh = _xyxy_to_xywh(boxes)
    elif rles is not None:
        xywh = np.asarray([mask_utils.toBbox(r) for r in rles], float).reshape(-1, 4)
    else:
        raise ValueError("need boxes or masks")
    if len(xywh) != n or (rles is not None and len(rles) != n):
        raise ValueError(f"{n} labels but {len(xywh)} boxes / {None if rles is None else len(rles)} masks")
    return xywh, rles


def gt_from_arrays(labels: Sequence[np.ndarray], boxes: Sequence[np.ndarray] | None = None,
                   masks: Sequence[np.ndarray] | None = None,
                   iscrowd: Sequence[np.ndarray] | None = None) -> dict:
    """A COCO ground-truth dict from per-image arrays: labels int (N,), boxes pixel xyxy (N, 4)
    and/or masks bool (N, H, W). Images get ids 1.. in order; an instance's area is its mask
    area when masks are given (as in COCO), else its box area."""
    images, annotations, categories = [], [], set()
    for i, lab in enumerate(labels):
        lab = np.asarray(lab, int).reshape(-1)
        m = None if masks is None else masks[i]
        xywh, rles = _instances(None if boxes is None else boxes[i], m, len(lab))
        image = {"id": i + 1}
        if m is not None:
            image["height"], image["width"] = np.asarray(m).shape[-2:]
        images.append(image)
        crowd = np.zeros(len(lab), int) if iscrowd is None else np.asarray(iscrowd[i], int)
        for k, c in enumerate(lab):
            ann = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(c),
                   "bbox": [float(v) for v in xywh[k]], "iscrowd": int(crowd[k])}
            if rles is not None:
                ann["segmentation"] = rles[k]
                ann["area"] = float(mask_utils.area(rles[k]))
            else:
                ann["area"] = float(xywh[k, 2] * xywh[k, 3])
            annotations.append(ann)
            categories.add(int(c))
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in sorted(categories)]}


def detections_from_arrays(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                           boxes: Sequence[np.ndarray] | None = None,
                           masks: Sequence[np.ndarray] | None = None) -> list[dict]:
    """A COCO results list from per-image arrays (images 1.. in the order of `gt_from_arrays`):
    scores (N,), labels (N,), boxes pixel xyxy (N, 4) and/or masks bool (N, H, W)."""
    out = []
    for i, (sc, lab) in enumerate(zip(scores, labels)):
        sc, lab = np.asarray(sc, float).reshape(-1), np.asarray(lab, int).reshape(-1)
        xywh, rles = _instances(None if boxes is None else boxes[i],
                                None if masks is None else masks[i], len(lab))
        for k in range(len(lab)):
            det = {"image_id": i + 1, "category_id": int(lab[k]), "score": float(sc[k]),
                   "bbox": [float(v) for v in xywh[k]]}
            if rles is not None:
                det["segmentation"] = rles[k]
            out.append(det)
    return out


def _check_gt(gt: Mapping, where: str) -> None:
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise DataError(where, key, "missing, or not a list, in the COCO ground truth")


def _check_detections(dets: Sequence, image_ids: set, iou_type: str, where: str) -> None:
    if not isinstance(dets, list):
        raise DataError(where, "detections", "expected a JSON list of detections")
    need = ("image_id", "category_id", "score", "segmentation" if iou_type == "segm" else "bbox")
    for n, d in enumerate(dets):
        missing = [k for k in need if not isinstance(d, dict) or k not in d]
        if iou_type == "bbox" and missing == ["bbox"] and "segmentation" in d:
            missing = []  # pycocotools derives the box from the mask
        if missing:
            raise DataError(where, f"[{n}].{missing[0]}", "missing in detection")
        if d["image_id"] not in image_ids:
            raise DataError(where, f"[{n}].image_id", f"image {d['image_id']} is not in the ground truth")


def _coco(dataset: Mapping) -> COCO:
    coco = COCO()
    coco.dataset = dict(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate(gt: Mapping | str, detections: Sequence[Mapping] | str,
             iou_type: str = "bbox") -> dict[str, float]:
    """The 12 COCO summary numbers ("AP", "AP50", ..., "ARl") for `iou_type` "bbox" or "segm";
    -1 where there is nothing to measure (e.g. no small objects), as pycocotools reports it."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    gt, gt_where = load_input(gt, "<ground truth>")
    detections, det_where = load_input(detections, "<detections>")
    if not isinstance(gt, Mapping):
        raise DataError(gt_where, "json", "expected a COCO ground-truth object")
    _check_gt(gt, gt_where)
    _check_detections(detections, {im.get("id") for im in gt["images"]}, iou_type, det_where)
    # pycocotools writes into the annotation dicts (masks, ignore flags, ids): work on copies.
    coco_gt = _coco({**gt, "annotations": [dict(a) for a in gt["annotations"]]})
    dets = [dict(d) for d in detections]
    if iou_type == "segm":
        for d in dets:  # else loadRes takes the box's area for the mask's area range
            d.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:  # loadRes cannot take an empty list; no detections simply score 0
            coco_dt = _coco({"images": gt["images"], "categories": gt["categories"], "annotations": []})
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_NAMES, (float(s) for s in ev.stats)))
