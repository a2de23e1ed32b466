"""What every reader returns: videos as lists of frame files plus lazily loaded per-frame masks.

Readers only index and decode; choosing frames/objects (sampling.py) and pixels (transforms.py)
happen elsewhere, so a new format is one small class.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from sam3_jax.data import image_io
from sam3_jax.data.errors import DataError
from sam3_jax.data.phrases import PhraseVocabulary


class FrameAnnotation(abc.ABC):
    """The object masks of one frame; decoding is deferred until objects are chosen."""

    path: str  # the file the masks come from, for error messages
    size: tuple[int, int]  # (height, width)

    @abc.abstractmethod
    def visible_ids(self) -> list[int]:
        """Ids of the objects whose mask is non-empty in this frame, sorted."""

    @abc.abstractmethod
    def masks(self, ids: Sequence[int]) -> np.ndarray:
        """bool [len(ids), H, W]; all False for an id absent from this frame."""

    def label_map(self) -> np.ndarray | None:
        """The frame's masks as one uint8 [H, W] map of object ids (0: background), when they are
        stored that way and hence disjoint; None otherwise. With it, the clip builder warps all
        objects of a frame in a single nearest-neighbour pass and never builds bit planes."""
        return None

    def bit_planes(self, ids: Sequence[int]) -> np.ndarray:
        """The masks of `ids` packed as uint8 [ceil(len(ids) / 8), H, W]: object k is bit k % 8
        of plane k // 8 (so one nearest-neighbour warp moves eight objects)."""
        masks = self.masks(ids)
        planes = np.zeros((max(1, -(-len(ids) // 8)),) + masks.shape[1:], np.uint8)
        for k, m in enumerate(masks):
            planes[k // 8] |= m.view(np.uint8) << (k % 8)
        return planes


@dataclasses.dataclass
class Video:
    """One video (or image) of a source, as the sampler sees it."""

    name: str
    frame_paths: list[str]  # annotated frames in time order
    frame_numbers: list[int]  # their frame numbers in the original video
    load_annotation: Callable[[int], FrameAnnotation]  # position in frame_paths -> masks
    object_phrases: Mapping[int, int] = dataclasses.field(default_factory=dict)
    default_phrase: int = -1  # phrase of objects missing from object_phrases (-1: none)
    phrase_candidates: Sequence[int] | None = None  # phrases worth asking (None: whole vocab)
    crowd_phrases: frozenset[int] = frozenset()  # have crowd regions: never negative or exhaustive

    def phrase_of(self, obj_id: int) -> int:
        return self.object_phrases.get(obj_id, self.default_phrase)


class Source(abc.ABC):
    """An indexed dataset of videos with a phrase vocabulary."""

    vocabulary: PhraseVocabulary
    exhaustive: bool  # are all instances of a phrase annotated?

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def video(self, index: int) -> Video:
        """Cheap: lists files and reads the index; masks load later. May raise DataError."""


class ClassAgnosticSource(Source):
    """Videos in ``<image_dir>/<video>/`` (optionally listed in ``file_list``) whose objects carry no
    class: each gets ``phrase`` (e.g. "object") for the detector, or none when it is empty."""

    def __init__(self, image_dir: str, annotation_dir: str, file_list: str = "", phrase: str = "object",
                 exhaustive: bool = False):
        self.image_dir, self.annotation_dir = image_dir, annotation_dir
        self.names = list_videos(image_dir, file_list)
        self.vocabulary = PhraseVocabulary([phrase] if phrase else [])
        self.exhaustive = exhaustive
        self._phrase = self.vocabulary.id(phrase) if phrase else -1

    def __len__(self) -> int:
        return len(self.names)


def read_frame(path: str) -> Image.Image:
    """Decodes a frame fully (so truncation is caught here) as RGB; one whose header claims more than
    ``image_io.MAX_PIXELS`` is refused before decoding."""
    try:
        with image_io.open_image(path) as img:
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, "image", f"cannot decode: {e}") from e


def read_json(path: str) -> Any:
    """Loads JSON; bytes that are not UTF-8 become lone surrogates, caught per phrase later."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return json.load(f)
    except OSError as e:
        raise DataError(path, "file", f"cannot read: {e}") from e
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno}", f"invalid JSON: {e.msg}") from e


def read_name_list(path: str) -> list[str]:
    """A video list file (one name per line, extensions dropped), as in DAVIS ImageSets."""
    try:
        with open(path, encoding="utf-8") as f:
            return [os.path.splitext(line.strip())[0] for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, "file", f"cannot read video list: {e}") from e


def list_videos(image_dir: str, file_list: str = "") -> list[str]:
    """The names in `file_list` if given, else every entry of `image_dir`, sorted."""
    if file_list:
        return read_name_list(file_list)
    try:
        return sorted(os.listdir(image_dir))
    except OSError as e:
        raise DataError(image_dir, "image_dir", f"cannot list videos: {e}") from e


def frame_number(filename: str, position: int) -> int:
    stem = os.path.splitext(os.path.basename(filename))[0]
    return int(stem) if stem.isdigit() else position
