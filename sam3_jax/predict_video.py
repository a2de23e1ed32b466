"""Segment objects through a video and write DAVIS-style masks: the objects of a mask on one frame
(the SAM 2 task), or every instance of a text prompt (SAM 3's detect-and-track).

  python -m sam3_jax.predict_video --checkpoint=DIR --video=FRAMES_DIR --init_mask=00000.png \
      --init_frame=0 --output=OUT_DIR [--direction=both|forward|backward] [--overwrite]
  python -m sam3_jax.predict_video --checkpoint=DIR --video=FRAMES_DIR --prompt="a dog" --output=OUT_DIR

``--video`` is a directory of JPEG / PNG frames (DAVIS's JPEGImages/<video>), in frame-number order.
``--init_mask`` is a palette (or grayscale) PNG of object ids on frame ``--init_frame`` (0 background,
255 void), e.g. DAVIS's first annotation; it must have the frames' size. Every id becomes one object.
``--output`` receives one palette PNG of ids per frame the direction reaches, named like the frame
(``00000.jpg`` -> ``00000.png``), with the init mask's palette; where masks overlap, the object with the
higher mask logit wins. The directory is written under a temporary name and renamed when complete:
on any error nothing is left behind. Video files (MP4, ...) are not read: no video decoder is a
dependency; extract the frames with ffmpeg first (the error message gives the command).

With ``--prompt`` (instead of ``--init_mask``) objects are found by the detector on every frame and
tracked forward from frame 0 (``infer/detect_track.py``); the PNGs hold palette index
``(object id % 254) + 1`` (0 background, 255 never used), and ``objects.json`` lists every object shown,
with its palette index, its detection score and the frames it appears on.
"""
import os
import sys

import numpy as np
from absl import app, flags, logging

from sam3_jax import fileio

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory with a tracker (convert_torch_ckpt.py).")
flags.DEFINE_string("video", None, "Directory of the video's JPEG / PNG frames.")
flags.DEFINE_string("init_mask", None, "Palette PNG of object ids on --init_frame (DAVIS annotation).")
flags.DEFINE_string("prompt", None, "Text prompt: find and track every instance (instead of --init_mask).")
flags.DEFINE_integer("init_frame", 0, "Index (in frame order, from 0) of the frame --init_mask annotates.")
flags.DEFINE_string("output", None, "Directory to create with one palette PNG per tracked frame.")
flags.DEFINE_enum("direction", "both", ["forward", "backward", "both"],
                  "Track after the init frame, before it, or both (forward first, as the reference).")
flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
VOID_ID = 255


class InputError(ValueError):
    """Bad command-line input: reported as one line, without a traceback."""


def voc_palette() -> list[int]:
    """The PASCAL VOC / DAVIS colour map (id bits spread over the high bits of R, G, B)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def read_init_mask(path: str):
    """-> (ids (H, W) uint8, palette list or None)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise InputError(f"init mask not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L", "1"):
                raise InputError(f"{path}: expected a palette (or grayscale) PNG of object ids, got mode {im.mode}")
            palette = im.getpalette() if im.mode == "P" else None
            return np.asarray(im.convert("L") if im.mode == "1" else im, np.uint8), palette
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"{path}: cannot be read as an image ({e})") from e


def open_frames(path: str):
    from sam3_jax.infer.video_predictor import ImageFolderFrames

    if os.path.isfile(path):
        if path.lower().endswith(VIDEO_SUFFIXES):
            raise InputError(
                f"{path}: video files are not read (no video decoder is installed with sam3-jax); extract the "
                f"frames first, e.g. `mkdir frames && ffmpeg -i {path} -q:v 2 -start_number 0 frames/%05d.jpg`, "
                "and pass --video=frames")
        raise InputError(f"{path}: --video must be a directory of frames")
    if not os.path.exists(path):
        raise InputError(f"video not found: {path}")
    return ImageFolderFrames(path)


def label_map(result, obj_ids: list[int]) -> np.ndarray:
    """Per pixel the id of the object with the highest logit among those whose mask is on, else 0."""
    logits = np.where(result.masks, result.logits, -np.inf)
    best = np.argmax(logits, axis=0)
    ids = np.asarray(obj_ids, np.uint8)[best]
    return np.where(result.masks.any(axis=0), ids, 0).astype(np.uint8)


def run(checkpoint: str, video: str, init_mask: str, init_frame: int, output: str, direction: str,
        overwrite: bool = False) -> int:
    """Does the work of the CLI; returns the number of frames written."""
    from PIL import Image

    from sam3_jax.infer.video_predictor import VideoPredictor

    output = os.path.abspath(output)
    if os.path.exists(output) and not overwrite:
        raise InputError(f"output exists (pass --overwrite to replace it): {output}")
    frames = open_frames(video)
    if not 0 <= init_frame < len(frames):
        raise InputError(f"--init_frame={init_frame} is outside the video's {len(frames)} frames")
    ids_map, palette = read_init_mask(init_mask)
    if ids_map.shape != frames.size:
        raise InputError(f"{init_mask} is {ids_map.shape[1]}x{ids_map.shape[0]} but the frames are "
                         f"{frames.size[1]}x{frames.size[0]}")
    obj_ids = [int(i) for i in np.unique(ids_map) if i not in (0, VOID_ID)]
    if not obj_ids:
        raise InputError(f"{init_mask}: no object (every pixel is 0 or {VOID_ID})")
    palette = palette or voc_palette()
    predictor = VideoPredictor.from_checkpoint(checkpoint)
    prompts = {i: ids_map == i for i in obj_ids}

    with fileio.atomic_directory(output) as tmp:
        written = 0
        for result in predictor.propagate_iter(frames, prompts, init_frame, direction):
            name = os.path.splitext(os.path.basename(frames.paths[result.frame_idx]))[0] + ".png"
            im = Image.fromarray(label_map(result, obj_ids))
            im.putpalette(palette)  # mode L -> P, the ids kept as palette indices
            im.save(os.path.join(tmp, name))
            written += 1
            if written % 25 == 0:
                logging.info("%d frames tracked", written)
    return written


def text_label_map(frame) -> np.ndarray:
    """A detect-and-track frame's (already non-overlapping) masks as palette indices (id % 254) + 1."""
    label = np.zeros(frame.masks.shape[1:], np.uint8)
    for obj_id, mask in zip(frame.obj_ids, frame.masks):
        label[mask] = int(obj_id) % (VOID_ID - 1) + 1
    return label


def run_text(checkpoint: str, video: str, prompt: str, output: str, overwrite: bool = False) -> int:
    """The CLI with ``--prompt``: returns the number of frames written."""
    import json

    from PIL import Image

    from sam3_jax.infer.detect_track import DetectTrackPredictor

    output = os.path.abspath(output)
    if os.path.exists(output) and not overwrite:
        raise InputError(f"output exists (pass --overwrite to replace it): {output}")
    if not prompt or not prompt.strip():
        raise InputError("--prompt is empty")
    frames = open_frames(video)
    predictor = DetectTrackPredictor.from_checkpoint(checkpoint)
    objects: dict[int, dict] = {}
    with fileio.atomic_directory(output) as tmp:
        written = 0
        for result in predictor.propagate_iter(frames, prompt):
            name = os.path.splitext(os.path.basename(frames.paths[result.frame_idx]))[0] + ".png"
            im = Image.fromarray(text_label_map(result))
            im.putpalette(voc_palette())
            im.save(os.path.join(tmp, name))
            for obj_id, prob, mask in zip(result.obj_ids, result.probs, result.masks):
                if mask.any():
                    entry = objects.setdefault(int(obj_id), {"id": int(obj_id), "label": int(obj_id) % (VOID_ID - 1) + 1,
                                                             "score": float(prob), "frames": []})
                    entry["frames"].append(result.frame_idx)
            written += 1
            if written % 25 == 0:
                logging.info("%d frames processed", written)
        with open(os.path.join(tmp, "objects.json"), "w") as f:
            json.dump({"prompt": prompt, "objects": [objects[i] for i in sorted(objects)]}, f, indent=1)
    return written


def main(argv):
    del argv
    from sam3_jax.data.errors import DataError
    from sam3_jax.infer.video_predictor import VideoInputError

    try:
        if (FLAGS.prompt is None) == (FLAGS.init_mask is None):
            raise InputError("give exactly one of --init_mask (objects on one frame) and --prompt (text)")
        if FLAGS.prompt is not None:
            written = run_text(FLAGS.checkpoint, FLAGS.video, FLAGS.prompt, FLAGS.output, FLAGS.overwrite)
        else:
            written = run(FLAGS.checkpoint, FLAGS.video, FLAGS.init_mask, FLAGS.init_frame, FLAGS.output,
                          FLAGS.direction, FLAGS.overwrite)
    except (InputError, VideoInputError, DataError, OSError) as e:  # bad input: one line naming it, no traceback
        print(f"predict_video: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {written} frame(s) to {os.path.abspath(FLAGS.output)}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "video", "output"])
    app.run(main)
