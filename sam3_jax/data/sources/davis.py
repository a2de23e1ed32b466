"""DAVIS / MOSE layout: JPEGImages/<video>/<frame>.jpg and Annotations/<video>/<frame>.png,
where each PNG is a palette image of object ids (0 background, 255 void)."""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

from sam3_jax.data import image_io
from sam3_jax.data.errors import DataError
from sam3_jax.data.sources.base import ClassAgnosticSource, FrameAnnotation, Video, frame_number
from sam3_jax.data.transforms import pixels

JPEG_SUFFIXES = (".jpg", ".jpeg")
VOID_ID = 255  # palette index that DAVIS-style datasets use for "ignore", never an object


class DavisSource(ClassAgnosticSource):
    """Class-agnostic: every object gets `phrase` (e.g. "object"), or none when it is empty."""

    def video(self, index: int) -> Video:
        name = self.names[index]
        frame_dir = os.path.join(self.image_dir, name)
        try:
            files = sorted(f for f in os.listdir(frame_dir) if f.lower().endswith(JPEG_SUFFIXES))
        except OSError as e:
            raise DataError(frame_dir, "frames", f"cannot list frames: {e}") from e
        if not files:
            raise DataError(frame_dir, "frames", "empty video: no JPEG frames")
        stems = [os.path.splitext(f)[0] for f in files]
        return Video(
            name=name,
            frame_paths=[os.path.join(frame_dir, f) for f in files],
            frame_numbers=[frame_number(f, i) for i, f in enumerate(files)],
            load_annotation=functools.partial(self._annotation, name, stems),
            default_phrase=self._phrase,
        )

    def _annotation(self, name: str, stems: list[str], position: int) -> LabelMapAnnotation:
        path = os.path.join(self.annotation_dir, name, stems[position] + ".png")
        if not os.path.exists(path):
            raise DataError(path, "annotation", "missing annotation for frame")
        return LabelMapAnnotation(path)


class LabelMapAnnotation(FrameAnnotation):
    """One integer image of object ids (0 = background), e.g. a DAVIS palette PNG."""

    def __init__(self, path: str):
        self.path = path
        try:
            with image_io.open_image(path) as img:
                if img.mode not in ("P", "L"):
                    raise DataError(path, "mode", f"expected a palette PNG of ids, got {img.mode}")
                img.load()
                self.label = img  # P: the palette indices are the ids (PIL ops keep indices)
        except (OSError, SyntaxError, ValueError) as e:  # PIL reports broken PNGs all three ways
            raise DataError(path, "annotation", f"unreadable: {e}") from e
        self.size = self.label.height, self.label.width

    def visible_ids(self) -> list[int]:
        counts = self.label.histogram()
        return [i for i, c in enumerate(counts) if c and i not in (0, VOID_ID)]

    def masks(self, ids: Sequence[int]) -> np.ndarray:
        label = pixels(self.label)
        return label[None] == np.asarray(ids, np.uint8).reshape(-1, 1, 1)

    def label_map(self) -> np.ndarray:
        return pixels(self.label)

    def bit_planes(self, ids: Sequence[int]) -> np.ndarray:
        """Fast path: one lookup table per 8 objects, applied by PIL."""
        planes = []
        for start in range(0, max(1, len(ids)), 8):
            lut = [0] * 256
            for k, i in enumerate(ids[start:start + 8]):
                lut[i] = 1 << k
            planes.append(np.asarray(self.label.point(lut)))
        return np.stack(planes)
