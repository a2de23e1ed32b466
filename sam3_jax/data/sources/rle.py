"""Masks stored as COCO segmentations (RLE or polygons): SA-V, YouTube-VIS, SA-Co, COCO."""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam3_jax.data.errors import DataError
from sam3_jax.data.sources.base import FrameAnnotation


class RleAnnotation(FrameAnnotation):
    """Per-object COCO segmentations (compressed/uncompressed RLE or polygons) of one frame."""

    def __init__(self, path: str, field: str, size: tuple[int, int], segments: Mapping[int, Any]):
        self.path, self.field, self.size = path, field, tuple(size)
        self._rles = {i: self._to_rle(i, s) for i, s in segments.items()}

    def visible_ids(self) -> list[int]:
        return sorted(i for i, rle in self._rles.items() if mask_utils.area(rle) > 0)

    def masks(self, ids: Sequence[int]) -> np.ndarray:
        h, w = self.size
        out = np.zeros((len(ids), h, w), bool)
        for k, i in enumerate(ids):
            if i in self._rles:
                with warnings.catch_warnings():  # pycocotools' numpy-2 copy= notice, per call
                    warnings.simplefilter("ignore", DeprecationWarning)
                    out[k] = mask_utils.decode(self._rles[i])
        return out

    def _to_rle(self, obj_id: int, segm: Any) -> dict:
        where = f"{self.field} of object {obj_id}"
        try:
            return self._convert(segm, where)
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise DataError(self.path, where, f"bad segmentation: {e}") from e

    def _convert(self, segm: Any, where: str) -> dict:
        h, w = self.size
        if isinstance(segm, list):  # polygons
            return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
            raise DataError(self.path, where, f"not an RLE or polygon: {str(segm)[:80]}")
        if list(segm["size"]) != [h, w]:
            raise DataError(self.path, where, f"mask size {segm['size']} != frame size {[h, w]}")
        counts = segm["counts"]
        if isinstance(counts, list):
            if sum(counts) != h * w or min(counts, default=0) < 0:
                raise DataError(self.path, where, "uncompressed RLE counts do not cover the frame")
            return mask_utils.frPyObjects(segm, h, w)
        if isinstance(counts, str):
            counts = counts.encode("utf-8", errors="surrogateescape")
        if not isinstance(counts, bytes) or rle_length(counts) != h * w:
            # pycocotools trusts the string and would write past the mask: check it first.
            raise DataError(self.path, where, "bad RLE: counts do not decode to the frame size")
        return {"size": [h, w], "counts": counts}


def rle_length(counts: bytes) -> int:
    """Pixels covered by a compressed COCO RLE string, or -1 if it is malformed.

    The format (pycocotools rleFrString): each run is a little-endian number in 5-bit groups
    (char - 48; bit 0x20 = more groups follow, bit 0x10 of the last group = negative), and runs
    from the fourth on are stored as differences to the run two before.
    """
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if c.size == 0 or c.min() < 0 or c.max() > 63 or c[-1] & 0x20:
        return -1
    last = (c & 0x20) == 0  # last group of each run
    run = np.cumsum(last) - last  # run index of every char
    start = np.flatnonzero(np.r_[True, last[:-1]])
    shift = 5 * (np.arange(c.size) - start[run])
    if shift.max() > 40:  # no real run needs more than 2**45
        return -1
    x = np.bincount(run, weights=(c & 0x1F) << shift).astype(np.int64)
    negative = (c[last] & 0x10) != 0
    x[negative] -= np.int64(1) << (shift[last][negative] + 5)
    runs = x.copy()
    runs[2::2] = np.cumsum(x[2::2])
    runs[1::2] = np.cumsum(x[1::2])
    if runs.min() < 0:
        return -1
    return int(runs.sum())
