"""DAVIS 2017 semi-supervised J&F of videos in DAVIS layout, with davis2017-evaluation's conventions.

A video's objects are the ids 1..N, N the highest id of its first ground-truth frame (an id absent
from it still counts, J = F = 1 where neither side has it); only frames 1..T-2 are scored, so
predictions for the first and last frames may be absent (they are not read); a predicted id above N
(255 included) in a scored frame is refused; void pixels (255) in the ground truth count as
background. Predictions are maps of object ids per frame, read from palette-PNG folders
(`PngFolders`, what ``evaluate --metric=jf`` scores) or held in memory (`LabelMaps`, what the
trainer's whole-video evaluation tracks): both are scored by this one code.
"""
from __future__ import annotations

import os
import sys
from typing import Protocol

import numpy as np

from sam3_jax.data.errors import DataError
from sam3_jax.data.sources.base import read_name_list
from sam3_jax.data.sources.davis import LabelMapAnnotation
from sam3_jax.evaluation import jf


class Predictions(Protocol):
    """Per video and ground-truth frame file (``00003.png``), the predicted map of object ids."""

    def check_video(self, name: str) -> None:
        """Raises `DataError` when there are no predictions for video ``name``."""

    def frame(self, name: str, frame: str) -> tuple[np.ndarray | None, str]:
        """(ids (H, W) uint8, or None when missing; where they come from, for messages)."""


class PngFolders:
    """Palette PNGs of ids, ``root/<video>/<frame>.png``, as ``predict_video`` writes them."""

    def __init__(self, root: str):
        self.root = root

    def check_video(self, name: str) -> None:
        if not os.path.isdir(os.path.join(self.root, name)):
            raise DataError(os.path.join(self.root, name), "video", "missing prediction folder")

    def frame(self, name: str, frame: str) -> tuple[np.ndarray | None, str]:
        path = os.path.join(self.root, name, frame)
        return (LabelMapAnnotation(path).label_map() if os.path.isfile(path) else None), path


class LabelMaps:
    """Predictions in memory: ``{video: {frame file: ids (H, W) uint8}}``."""

    def __init__(self, videos: dict[str, dict[str, np.ndarray]]):
        self.videos = videos

    def check_video(self, name: str) -> None:
        if name not in self.videos:
            raise DataError(name, "video", "no prediction for this video")

    def frame(self, name: str, frame: str) -> tuple[np.ndarray | None, str]:
        return self.videos[name].get(frame), f"{name}/{frame} (predicted)"


def annotation_dir(root: str) -> str:
    """The directory of per-video folders: a DAVIS root's Annotations/480p (or Annotations), or
    `root` itself."""
    for sub in (("Annotations", "480p"), ("Annotations",)):
        if os.path.isdir(os.path.join(root, *sub)):
            return os.path.join(root, *sub)
    return root


def pngs(folder: str) -> list[str]:
    """The PNG files of ``folder``, sorted: a video's frames."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))


def video_names(gt_dir: str, videos: str | None) -> list[str]:
    """The videos to score: every folder of PNG frames under gt_dir, or those `videos` names (a
    comma-separated list or a file of one name per line); an unknown name is a DataError."""
    names = sorted(n for n in os.listdir(gt_dir)
                   if os.path.isdir(os.path.join(gt_dir, n)) and pngs(os.path.join(gt_dir, n)))
    if not names:
        raise DataError(gt_dir, "videos", "no video folders of PNG frames")
    if videos is None:
        return names
    if os.path.isfile(videos):
        wanted = read_name_list(videos)
    elif os.sep in videos or videos.endswith(".txt"):
        raise DataError(videos, "--videos", "no such file of video names")
    else:
        wanted = [v.strip() for v in videos.split(",") if v.strip()]
    if not wanted:
        raise DataError(videos or "''", "--videos", "no video names given")
    unknown = [v for v in wanted if v not in names]
    if unknown:
        raise DataError(gt_dir, "--videos", f"unknown video(s) {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}: not a folder of ground-truth PNGs here")
    return list(dict.fromkeys(wanted))


def load_video(predictions: Predictions, gt_dir: str, name: str):
    """(pred, gt) bool (T-2, O, H, W) of the scored frames 1..T-2 and the object ids 1..N of one
    video, or None when its first ground-truth frame has no objects."""
    frames = pngs(os.path.join(gt_dir, name))
    if len(frames) < 3:
        raise DataError(os.path.join(gt_dir, name), "frames",
                        f"{len(frames)} frame(s); J&F drops the first and last, so needs 3 or more")
    first_path = os.path.join(gt_dir, name, frames[0])
    first = LabelMapAnnotation(first_path)
    ids = list(range(1, max(first.visible_ids(), default=0) + 1))
    if not ids:
        return None
    scored = frames[1:-1]
    pred = np.zeros((len(scored), len(ids)) + first.size, bool)
    gt = np.zeros_like(pred)
    id_planes = np.asarray(ids, np.uint8).reshape(-1, 1, 1)
    for t, frame in enumerate(scored):
        gt_path = os.path.join(gt_dir, name, frame)
        g = LabelMapAnnotation(gt_path)
        if g.size != first.size:
            raise DataError(gt_path, "size", f"{g.size} differs from the video's first frame {first.size}")
        labels, where = predictions.frame(name, frame)
        if labels is None:
            raise DataError(where, "frame", f"missing prediction for ground-truth frame {gt_path}")
        if labels.shape != g.size:
            raise DataError(where, "size", f"prediction {labels.shape} != ground truth {g.size} ({gt_path})")
        top = int(labels.max())
        if top > ids[-1]:
            raise DataError(where, "id", f"object id {top} is above {ids[-1]}, the highest id of the "
                            f"first ground-truth frame {first_path} (the DAVIS evaluation refuses it)")
        gt[t], pred[t] = g.masks(ids), labels[None] == id_planes
    return pred, gt, ids


def score_videos(predictions: Predictions, gt_dir: str, videos: str | None = None
                 ) -> dict[str, tuple[jf.VideoScores, list[int]]]:
    """Per video of gt_dir (all, or those `videos` names) with objects in its first frame, its
    per-frame J and F against ``predictions`` and its object ids; the others are skipped, saying so."""
    if not os.path.isdir(gt_dir):
        raise DataError(gt_dir, "directory", "ground truth directory does not exist")
    scored = {}
    for name in video_names(gt_dir, videos):
        predictions.check_video(name)
        loaded = load_video(predictions, gt_dir, name)
        if loaded is None:
            print(f"warning: {name}: no objects in the first ground-truth frame, skipped", file=sys.stderr)
            continue
        pred, gt, ids = loaded
        scored[name] = jf.evaluate_video(pred, gt, skip_first_last=False), ids  # load_video kept 1..T-2
    if not scored:
        raise DataError(gt_dir, "objects", "no video to score has objects in its first ground-truth frame")
    return scored


def score(predictions: Predictions, gt_root: str, videos: str | None = None) -> dict:
    """J&F of the videos under gt_root (a DAVIS root or a folder of annotation folders; all its
    videos, or those `videos` names) against ``predictions``: the DAVIS table plus per-video and
    per-object values."""
    scored = score_videos(predictions, annotation_dir(gt_root), videos)
    per_video = {}
    for name, (scores, ids) in scored.items():
        per = jf.per_object(scores)
        objects = {str(i): {k.replace("-Mean", ""): float(v[n]) for k, v in per.items()}
                   for n, i in enumerate(ids)}
        j, f = float(np.mean(per["J-Mean"])), float(np.mean(per["F-Mean"]))
        per_video[name] = {"J": j, "F": f, "J&F": (j + f) / 2, "objects": objects}
    table = jf.summarize([s for s, _ in scored.values()])
    return {"J": table["J-Mean"], "F": table["F-Mean"], "J&F": table["J&F-Mean"],
            **{k: table[k] for k in ("J-Recall", "J-Decay", "F-Recall", "F-Decay")},
            "videos": per_video}
