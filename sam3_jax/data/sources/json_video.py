"""Category-labelled JSON annotations: YouTube-VIS / SA-Co video and COCO instances.

Both become the same in-memory index: entries (a video, or an image as a 1-frame video), each
with its annotations ``{"id", "category_id", "segmentations": [one per frame or null],
"iscrowd"}``; category names are the noun phrases.

* YouTube-VIS / SA-Co: ``{"videos": [{"id", "file_names", ...}], "annotations": [{"video_id",
  "category_id", "segmentations", ...}], "categories": [{"id", "name"}]}``; file names are relative
  to ``image_dir``. An optional ``"video_np_pairs": [{"video_id", "category_id"}]`` (SA-Co) lists
  the phrases asked of each video, including its negatives; without it every category is a
  candidate negative.
* COCO: ``{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "category_id",
  "segmentation", "iscrowd"}], "categories": [...]}``.

Crowd annotations are not objects; their category is marked non-exhaustive in that video.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections import defaultdict
from typing import Any

from sam3_jax.data.errors import DataError
from sam3_jax.data.phrases import PhraseVocabulary
from sam3_jax.data.sources.base import Source, Video, frame_number, read_json, read_name_list
from sam3_jax.data.sources.rle import RleAnnotation

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Entry:
    id: Any
    name: str
    file_names: list[str] | None  # None: the entry has no "file_names"
    annotations: list[dict]
    np_category_ids: list[Any] | None  # SA-Co video_np_pairs of this video
    size: tuple[int, int] | None  # (height, width) when the JSON gives it


class JsonVideoSource(Source):
    """Videos indexed from one JSON file; masks are decoded only for the frames sampled."""

    def __init__(self, path: str, image_dir: str, entries: list[_Entry],
                 categories: dict[Any, str], exhaustive: bool):
        self.path, self.image_dir, self.entries = path, image_dir, entries
        self.categories = categories
        self.vocabulary = PhraseVocabulary(categories.values(), path)
        self.exhaustive = exhaustive

    def __len__(self) -> int:
        return len(self.entries)

    def video(self, index: int) -> Video:
        e = self.entries[index]
        where = f"video {e.name!r} (id {e.id})"
        if e.file_names is None:
            raise DataError(self.path, f"{where} file_names", "missing or not a list: the video has no frames")
        if not e.file_names:
            raise DataError(self.path, f"{where} file_names", "empty video")
        phrases, crowd_phrases, tracks = {}, set(), {}
        for k, ann in enumerate(e.annotations):
            ann_id = ann.get("id", k)
            field = f"{where} annotation {ann_id}"
            phrase = self._phrase(ann.get("category_id"), field)
            segs = ann.get("segmentations")
            if not isinstance(segs, list) or len(segs) != len(e.file_names):
                raise DataError(self.path, f"{field} segmentations",
                                f"expected a list of {len(e.file_names)} (one per frame)")
            if ann.get("iscrowd", 0):
                crowd_phrases.add(phrase)
            else:
                phrases[ann_id] = phrase
                tracks[ann_id] = segs
        candidates = None
        if e.np_category_ids is not None:
            candidates = [self._phrase(c, f"{where} video_np_pairs") for c in e.np_category_ids]
        return Video(
            name=e.name,
            frame_paths=[os.path.join(self.image_dir, f) for f in e.file_names],
            frame_numbers=[frame_number(f, i) for i, f in enumerate(e.file_names)],
            load_annotation=functools.partial(self._annotation, e, tracks,
                                              self._frame_size(e, tracks, where)),
            object_phrases=phrases,
            phrase_candidates=candidates,
            crowd_phrases=frozenset(crowd_phrases),
        )

    def _phrase(self, category_id: Any, field: str) -> int:
        if category_id not in self.categories:
            raise DataError(self.path, f"{field} category_id", f"unknown category {category_id!r}")
        return self.vocabulary.id(self.categories[category_id])

    def _frame_size(self, e: _Entry, tracks: dict, where: str) -> tuple[int, int]:
        """(height, width) from the entry, else from the first RLE of the video."""
        if e.size is not None:
            return e.size
        for segs in tracks.values():
            for s in segs:
                if isinstance(s, dict) and "size" in s:
                    return tuple(s["size"])
        raise DataError(self.path, f"{where} height/width", "missing, and no RLE gives the size")

    def _annotation(self, e: _Entry, tracks: dict, size: tuple[int, int],
                    position: int) -> RleAnnotation:
        segments = {i: segs[position] for i, segs in tracks.items() if segs[position] is not None}
        field = f"video {e.name!r} frame {position} segmentations"
        return RleAnnotation(self.path, field, size, segments)


def ytvis_source(image_dir: str, annotation_file: str, file_list: str = "",
                 exhaustive: bool = False, strict: bool = True) -> JsonVideoSource:
    data = _load(annotation_file, ("videos", "annotations", "categories"))
    by_video = _group(annotation_file, data["annotations"], "video_id",
                      {v.get("id") for v in data["videos"]}, strict)
    pairs = defaultdict(list)
    for p in data.get("video_np_pairs", ()):
        pairs[p.get("video_id")].append(p.get("category_id"))
    keep = set(read_name_list(file_list)) if file_list else None
    entries = []
    for v in data["videos"]:
        files = v.get("file_names") if isinstance(v.get("file_names"), list) else None
        name = os.path.dirname(files[0]) if files else str(v.get("id"))
        if keep is not None and name not in keep and files:  # a video without frames has no name to list:
            continue  # kept, so that drawing it counts a skipped sample with its reason
        entries.append(_Entry(v.get("id"), name, files, by_video.get(v.get("id"), []),
                              pairs[v.get("id")] if "video_np_pairs" in data else None,
                              _size(v)))
    return JsonVideoSource(annotation_file, image_dir, entries, _categories(data), exhaustive)


def coco_source(image_dir: str, annotation_file: str, exhaustive: bool = True,
                strict: bool = True) -> JsonVideoSource:
    data = _load(annotation_file, ("images", "annotations", "categories"))
    anns = [dict(a, segmentations=[a.get("segmentation")]) for a in data["annotations"]]
    by_image = _group(annotation_file, anns, "image_id", {i.get("id") for i in data["images"]},
                      strict)
    entries = [_Entry(i.get("id"), str(i.get("file_name")),
                      [i["file_name"]] if i.get("file_name") else [],
                      by_image.get(i.get("id"), []), None, _size(i))
               for i in data["images"]]
    return JsonVideoSource(annotation_file, image_dir, entries, _categories(data), exhaustive)


def _load(path: str, keys: tuple[str, ...]) -> dict:
    data = read_json(path)
    for key in keys:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(path, key, "missing or not a list")
    return data


def _categories(data: dict) -> dict[Any, str]:
    return {c.get("id"): str(c.get("name")) for c in data["categories"]}


def _size(record: dict) -> tuple[int, int] | None:
    if "height" in record and "width" in record:
        return int(record["height"]), int(record["width"])
    return None


def _group(path: str, annotations: list[dict], key: str, known: set, strict: bool) -> dict:
    """Annotations by video/image id; ones pointing at unknown ids are an error (strict) or
    dropped with a warning."""
    groups = defaultdict(list)
    for ann in annotations:
        owner = ann.get(key)
        if owner not in known:
            message = f"annotation {ann.get('id')} refers to unknown {key} {owner!r}"
            if strict:
                raise DataError(path, key, message)
            log.warning("%s: %s; dropped", path, message)
            continue
        groups[owner].append(ann)
    return groups
