"""Which frames, objects and noun phrases make a training clip.

Frames (SAM3 `VideoGroundingDataset`): a stride drawn uniformly in [stride_min, stride_max], lowered
to the largest that fits when the video is short, a uniform start, then time reversal with
`reverse_prob`. A video with fewer frames than T gives all its frames, and the clip is padded at
the end (schema: ``frame_valid``). Positions index the video's annotated frames.

Objects (SAM2 `RandomUniformSampler`): up to N drawn at random among those visible in the clip's
first frame (`first_frame_objects`, so the tracker can be prompted there; a few windows are tried
before giving up), otherwise among those visible in any frame of the clip.

Phrases (SAM3 detection queries): the phrases of the chosen objects, then negatives to fill P —
phrases of the video's candidate list (or the whole vocabulary) with no instance anywhere in the
clip and no crowd region in the video. A query (frame, phrase) is exhaustive when the source is,
the phrase has no crowd region, and every instance visible in that frame was kept among the N
objects.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sam3_jax.data.errors import DataError
from sam3_jax.data.sources.base import FrameAnnotation, Video


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    positions: list[int]  # into video.frame_paths, in clip order (<= T)
    annotations: list[FrameAnnotation]  # one per position
    object_ids: list[int]  # <= N
    phrase_ids: list[int]  # <= P, vocabulary ids; positives first
    positives: np.ndarray  # bool [len(positions), len(phrase_ids), len(object_ids)]
    exhaustive: np.ndarray  # bool [len(positions), len(phrase_ids)]


def sample_positions(num_available: int, num_frames: int, stride_min: int, stride_max: int,
                     reverse_prob: float, rng: np.random.Generator) -> list[int]:
    if num_available <= num_frames:
        positions = list(range(num_available))
    else:
        stride = int(rng.integers(stride_min, stride_max + 1))
        if num_frames > 1:
            stride = min(stride, (num_available - 1) // (num_frames - 1))
        start = int(rng.integers(0, num_available - (num_frames - 1) * stride))
        positions = list(range(start, start + (num_frames - 1) * stride + 1, stride))
    if rng.random() < reverse_prob:
        positions.reverse()
    return positions


def plan_clip(video: Video, cfg: Any, num_frames: int, max_objects: int, max_phrases: int,
              vocabulary_size: int, exhaustive: bool, rng: np.random.Generator) -> ClipPlan:
    """Draws a clip; raises DataError when the video offers no object to train on."""
    tries = cfg.window_tries if cfg.first_frame_objects else 1
    for _ in range(tries):
        positions = sample_positions(len(video.frame_paths), num_frames, cfg.stride_min,
                                     cfg.stride_max, cfg.reverse_prob, rng)
        first = video.load_annotation(positions[0])
        if first.visible_ids() or not cfg.first_frame_objects:
            break
    else:
        raise DataError(first.path, "objects",
                        f"no object visible in the first frame of {tries} sampled windows")
    annotations = [first] + [video.load_annotation(p) for p in positions[1:]]
    visible = [set(a.visible_ids()) for a in annotations]
    candidates = sorted(visible[0] if cfg.first_frame_objects else set().union(*visible))
    if not candidates:
        raise DataError(first.path, "objects", "no object visible in the sampled frames")
    picked = rng.permutation(len(candidates))[:max_objects]
    object_ids = [candidates[i] for i in sorted(picked)]

    positive = list(dict.fromkeys(p for p in map(video.phrase_of, object_ids) if p >= 0))
    rng.shuffle(positive)
    phrase_ids = positive[:max_phrases]
    in_clip = {video.phrase_of(i) for v in visible for i in v}
    pool = (range(vocabulary_size) if video.phrase_candidates is None
            else dict.fromkeys(video.phrase_candidates))
    negatives = [p for p in pool if p not in in_clip and p not in video.crowd_phrases]
    room = min(max_phrases - len(phrase_ids), len(negatives))
    phrase_ids += [negatives[i] for i in sorted(rng.choice(len(negatives), room, replace=False))]

    obj_phrase = np.array([video.phrase_of(i) for i in object_ids], np.int64).reshape(-1)
    obj_visible = np.array([[i in v for i in object_ids] for v in visible], bool)
    obj_visible = obj_visible.reshape(len(positions), len(object_ids))
    phrases = np.array(phrase_ids, np.int64).reshape(-1)
    positives = (obj_phrase[None, None, :] == phrases[None, :, None]) & obj_visible[:, None, :]
    kept = set(object_ids)
    complete = np.array([[all(i in kept for i in v if video.phrase_of(i) == p) for p in phrase_ids]
                         for v in visible], bool).reshape(len(positions), len(phrase_ids))
    usable = np.array([p not in video.crowd_phrases for p in phrase_ids], bool)
    return ClipPlan(positions, annotations, object_ids, phrase_ids, positives,
                    complete & usable[None, :] & exhaustive)
