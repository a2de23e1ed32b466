"""A generated dataset: coloured shapes that move, occlude each other, enter and leave the frame.

The same videos are written in DAVIS layout (palette PNGs) and YouTube-VIS layout (RLE JSON with
phrases such as "red circle" as categories), so the real readers are what the demo and the tests
exercise. Deterministic by seed; written to a temporary directory and renamed into place.

    python -m sam3_jax.data.synthetic --output_dir=DIR --num_videos=N --num_frames=T \
        --size=S --seed=K

writes ``DIR/davis/{JPEGImages,Annotations}/<video>/<t>.jpg|png``, ``DIR/davis/ImageSets/{train,
val}.txt`` (the split, usable by every reader as `file_list`), ``DIR/ytvis/JPEGImages/<video>/``
(hard links to the same JPEGs), ``DIR/ytvis/annotations.json`` and ``DIR/synthetic.json`` (the
parameters). Frames are ``S`` wide and ``3S/4`` high. Object ids are 1..K per video in the PNGs and
globally unique in the JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
           "yellow": (235, 210, 40), "purple": (150, 60, 200), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle")
PHRASES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
MANIFEST = "synthetic.json"
VAL_FRACTION = 0.25


def frame_size(size: int) -> tuple[int, int]:
    """(height, width) of the generated frames."""
    return (size * 3 // 4) // 2 * 2, size


def render_video(rng: np.random.Generator, num_frames: int, size: int
                 ) -> tuple[list[Image.Image], list[np.ndarray], list[str]]:
    """Frames (RGB), label maps (uint8 object id, 0 background) and each object's phrase."""
    height, width = frame_size(size)
    field = Image.fromarray(rng.integers(15, 110, (3, 4, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (height, width, 3))
    background = Image.fromarray(np.clip(np.asarray(field) + noise, 0, 255).astype(np.uint8))
    num_objects = int(rng.integers(2, 5))
    phrases, paths = [], []
    for k in range(num_objects):
        reuse = k > 0 and rng.random() < 0.3  # a second instance of a phrase already used
        phrases.append(phrases[rng.integers(k)] if reuse else PHRASES[rng.integers(len(PHRASES))])
        paths.append(_path(rng, k, width, height))
    frames, labels = [], []
    for t in range(num_frames):
        frame, label = background.copy(), Image.new("L", (width, height))
        draw_f, draw_l = ImageDraw.Draw(frame), ImageDraw.Draw(label)
        u = t / max(1, num_frames - 1)
        for k, (phrase, (a, b, radius, spin)) in enumerate(zip(phrases, paths)):
            colour, shape = phrase.split(" ")
            points = _outline(shape, a + (b - a) * u, radius, spin * u)
            draw_f.polygon(points, fill=COLOURS[colour])  # later objects occlude earlier ones
            draw_l.polygon(points, fill=k + 1)
        frames.append(frame)
        labels.append(np.asarray(label))
    return frames, labels, phrases


def _path(rng: np.random.Generator, k: int, width: int, height: int):
    """Start/end centre, radius, rotation: object 0 stays inside (something to track from the
    first frame); others may also enter or leave through the side edges."""
    radius = rng.uniform(0.08, 0.16) * min(width, height)

    def point(outside: bool) -> np.ndarray:
        y = rng.uniform(radius, height - radius)
        if outside:
            return np.array([rng.choice([-1.5 * radius, width + 1.5 * radius]), y])
        return np.array([rng.uniform(radius, width - radius), y])

    kind = "inside" if k == 0 else rng.choice(["inside", "entering", "leaving"], p=[.5, .25, .25])
    a, b = point(kind == "entering"), point(kind == "leaving")
    return a, b, radius, rng.uniform(-np.pi, np.pi)


def _outline(shape: str, centre: np.ndarray, radius: float, angle: float) -> list[tuple]:
    corners = {"circle": 32, "square": 4, "triangle": 3}[shape]
    theta = angle + np.pi / 4 + 2 * np.pi * np.arange(corners) / corners
    return [tuple(p) for p in centre + radius * np.stack([np.cos(theta), np.sin(theta)], -1)]


def _palette() -> list[int]:
    rng = np.random.default_rng(0)
    return [0, 0, 0] + rng.integers(40, 256, 255 * 3).tolist()


def generate(output_dir: str, num_videos: int, num_frames: int, size: int, seed: int) -> None:
    """Writes the dataset to `output_dir`, which must not exist yet (atomic rename)."""
    output_dir = os.path.abspath(output_dir)
    tmp = f"{output_dir}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, num_videos, num_frames, size, seed)
        os.rename(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(root: str, num_videos: int, num_frames: int, size: int, seed: int) -> None:
    davis, ytvis = os.path.join(root, "davis"), os.path.join(root, "ytvis")
    height, width = frame_size(size)
    names = [f"synth_{i:04d}" for i in range(num_videos)]
    videos, annotations = [], []
    palette = _palette()
    for vid, name in enumerate(names, start=1):
        frames, labels, phrases = render_video(np.random.default_rng([seed, vid]), num_frames, size)
        for sub in ("davis/JPEGImages", "davis/Annotations", "ytvis/JPEGImages"):
            os.makedirs(os.path.join(root, sub, name))
        files = []
        for t, (frame, label) in enumerate(zip(frames, labels)):
            jpg = os.path.join(davis, "JPEGImages", name, f"{t:05d}.jpg")
            frame.save(jpg, quality=90)
            os.link(jpg, os.path.join(ytvis, "JPEGImages", name, f"{t:05d}.jpg"))
            png = Image.fromarray(label, "L").convert("P")
            png.putpalette(palette)
            png.save(os.path.join(davis, "Annotations", name, f"{t:05d}.png"))
            files.append(f"{name}/{t:05d}.jpg")
        videos.append({"id": vid, "file_names": files, "height": height, "width": width,
                       "length": num_frames})
        for k, phrase in enumerate(phrases, start=1):
            rles = [mask_utils.encode(np.asfortranarray((label == k).astype(np.uint8)))
                    for label in labels]
            rles = [r if mask_utils.area(r) else None for r in rles]
            annotations.append({
                "id": len(annotations) + 1, "video_id": vid, "iscrowd": 0,
                "category_id": PHRASES.index(phrase) + 1,
                "segmentations": [r and {"size": r["size"], "counts": r["counts"].decode()}
                                  for r in rles],
                "areas": [r and float(mask_utils.area(r)) for r in rles],
                "bboxes": [r and mask_utils.toBbox(r).tolist() for r in rles],
            })
    categories = [{"id": i + 1, "name": p} for i, p in enumerate(PHRASES)]
    with open(os.path.join(ytvis, "annotations.json"), "w") as f:
        json.dump({"videos": videos, "annotations": annotations, "categories": categories}, f)
    num_val = int(round(num_videos * VAL_FRACTION)) if num_videos > 1 else 0
    os.makedirs(os.path.join(davis, "ImageSets"))
    for split, subset in (("train", names[:num_videos - num_val]),
                          ("val", names[num_videos - num_val:])):
        with open(os.path.join(davis, "ImageSets", f"{split}.txt"), "w") as f:
            f.writelines(n + "\n" for n in subset)
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(_params(num_videos, num_frames, size, seed), f)


def _params(num_videos: int, num_frames: int, size: int, seed: int) -> dict:
    return {"num_videos": num_videos, "num_frames": num_frames, "size": size, "seed": seed}


def ensure(output_dir: str, num_videos: int, num_frames: int, size: int, seed: int) -> None:
    """Generates the dataset unless `output_dir` already holds it with these parameters; safe
    when several processes race (the loser of the rename keeps the winner's copy)."""
    want = _params(num_videos, num_frames, size, seed)
    manifest = os.path.join(output_dir, MANIFEST)
    if not os.path.exists(manifest):
        os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
        try:
            generate(output_dir, num_videos, num_frames, size, seed)
        except OSError:
            if not os.path.exists(manifest):  # not a lost race: a real failure
                raise
    with open(manifest) as f:
        have = json.load(f)
    if have != want:
        raise ValueError(f"{output_dir} holds a generated dataset with {have}, not {want}; "
                         "delete it or choose another output_dir")


def main(argv) -> None:
    del argv
    from absl import flags

    f = flags.FLAGS
    if f.overwrite and os.path.exists(f.output_dir):
        shutil.rmtree(f.output_dir)
    ensure(f.output_dir, f.num_videos, f.num_frames, f.size, f.seed)
    print(f"synthetic dataset in {os.path.abspath(f.output_dir)}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("output_dir", None, "where to write davis/ and ytvis/", required=True)
    flags.DEFINE_integer("num_videos", 24, "number of videos")
    flags.DEFINE_integer("num_frames", 16, "frames per video")
    flags.DEFINE_integer("size", 160, "frame width (height is 3/4 of it)")
    flags.DEFINE_integer("seed", 0, "random seed")
    flags.DEFINE_boolean("overwrite", False, "replace output_dir if it exists")
    app.run(main)
