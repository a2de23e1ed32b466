"""Segment objects through a video and write DAVIS-style masks: objects given on one frame by a mask,
boxes or clicks (the SAM 2 task), or every instance of a text prompt (SAM 3's detect-and-track).

  python -m sam3_jax.predict_video --checkpoint=DIR --video=FRAMES_DIR_OR_FILE --init_mask=00000.png \
      --init_frame=0 --output=OUT_DIR [--direction=both|forward|backward] [--overlay=OUT.mp4|OUT.gif] [--overwrite]
  python -m sam3_jax.predict_video --checkpoint=DIR --video=FRAMES_DIR_OR_FILE --box=1:10,20,80,90 \
      --points="2:40,50,1;45,60,0" --init_frame=0 --output=OUT_DIR
  python -m sam3_jax.predict_video --checkpoint=DIR --video=FRAMES_DIR_OR_FILE --prompt="a dog" --output=OUT_DIR \
      [--init_frame=0] [--direction=both|forward|backward]

``--video`` is a directory of JPEG / PNG frames (DAVIS's JPEGImages/<video>), in frame-number order, or a
video file (MP4, MOV, WebM, ... whatever FFmpeg reads; ``infer/video_io.py`` says how it is decoded)
whose frames are named ``00000``, ``00001``, ...
``--init_mask`` is a palette (or grayscale) PNG of object ids on frame ``--init_frame`` (0 background,
255 void), e.g. DAVIS's first annotation; it must have the frames' size. Every id becomes one object.
``--box=ID:x0,y0,x1,y1`` and ``--points=ID:x,y,label[;x,y,label...]`` (label 1 positive, 0 negative), each
repeatable, give object ID (1..254) a box or clicks on that frame in its pixels, instead of or besides
``--init_mask``; one object may have a box and clicks, not a mask and either.
``--output`` receives one palette PNG of ids per frame the direction reaches, named like the frame
(``00000.jpg`` -> ``00000.png``), with the init mask's palette (else DAVIS's); where masks overlap, the object
with the higher mask logit wins. The directory is written under a temporary name and renamed when complete:
on any error nothing is left behind.

With ``--prompt`` (instead of ``--init_mask``) objects are found by the detector on every frame and
tracked from ``--init_frame`` (``infer/detect_track.py``) as the reference's video predictor propagates:
forward to the last frame, backward to frame 0 (the start frame first), or both (forward, then backward
with what the forward pass found); with the defaults (frame 0, both) that is forward through the video.
The PNGs hold palette index ``(object id % 254) + 1`` (0 background, 255 never used), one per frame
reached, and ``objects.json`` lists every object shown, with its palette index, its detection score and
the frames it appears on (ascending).

Both tasks also write ``results.json``, a YouTube-VIS results file (``evaluate --metric=ytvis`` reads it):
per object ``{"video_id", "category_id", "score", "segmentations", "obj_id", "label"}`` with, for every
frame of the video, the compressed RLE of the object's pixels in the PNGs, or null where it has none
(and on frames not tracked); ``label`` is its palette index in the PNGs. ``score``: with ``--prompt`` the detection
score (as objects.json); else the mean over the tracked frames of the object score
(sigmoid of the tracker's object score logit). ``--overlay`` writes the tracked frames, in order, with
the objects tinted in the PNGs' palette colours, as an MP4 or a GIF (``video_io.write_overlay``), also
under a temporary name.
"""
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Collection, Sequence

import numpy as np
from absl import app, flags, logging

from sam3_jax import fileio
from sam3_jax.checkpoint import finite
from sam3_jax.infer import video_outputs
from sam3_jax.infer.video_outputs import label_map

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A converted video checkpoint (convert_torch_ckpt.py) or a training run's "
                    "workdir (its newest step), WORKDIR/checkpoints_best or WORKDIR/checkpoints/STEP.")
flags.DEFINE_string("video", None, "Directory of the video's JPEG / PNG frames, or a video file.")
flags.DEFINE_string("init_mask", None, "Palette PNG of object ids on --init_frame (DAVIS annotation).")
flags.DEFINE_multi_string("box", [], "ID:x0,y0,x1,y1: a box prompt for object ID on --init_frame, in pixels.")
flags.DEFINE_multi_string("points", [], "ID:x,y,label[;x,y,label...]: clicks (label 1 positive, 0 negative) for "
                          "object ID on --init_frame, in pixels.")
flags.DEFINE_string("prompt", None, "Text prompt: find and track every instance (instead of objects on a frame).")
flags.DEFINE_integer("init_frame", 0, "Index (in frame order, from 0) of the frame --init_mask / --box / --points "
                     "annotate, or where --prompt's detect-and-track starts.")
flags.DEFINE_string("output", None, "Directory to create with one palette PNG per tracked frame.")
flags.DEFINE_enum("direction", "both", ["forward", "backward", "both"],
                  "Track after the init frame, before it, or both (forward first, as the reference).")
flags.DEFINE_string("overlay", None, "Optional .mp4 or .gif to write: the frames with the masks drawn in.")
flags.DEFINE_integer("video_id", 1, "video_id of every masklet in results.json (the ground truth's, to evaluate).")
flags.DEFINE_integer("category_id", 1, "category_id of every masklet in results.json.")
flags.DEFINE_bool("overwrite", False, "Replace --output (and --overlay) if it exists.")

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
    from PIL import UnidentifiedImageError

    from sam3_jax.data import image_io

    if not os.path.isfile(path):
        raise InputError(f"init mask not found: {path}")
    try:
        with image_io.open_image(path) as im:
            im.load()
            if im.mode not in ("P", "L", "1"):
                raise InputError(f"{path}: expected a palette (or grayscale) PNG of object ids, got mode {im.mode}")
            palette = im.getpalette() if im.mode == "P" else None
            return np.asarray(im.convert("L") if im.mode == "1" else im, np.uint8), palette
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"{path}: cannot be read as an image ({e})") from e
    except image_io.ImageError as e:
        raise InputError(str(e)) from e


def _parse_flag(flag: str, value: str, form: str, count: int):
    """``ID:n,...[;n,...]`` -> (the flag as given, ID, groups of ``count`` finite numbers)."""
    text = f"--{flag}={value}"
    try:
        head, body = value.split(":", 1)
        obj_id = int(head)
        groups = [[float(v) for v in group.split(",")] for group in body.split(";")]
    except ValueError:
        raise InputError(f"{text}: expected {form}") from None
    if any(len(g) != count for g in groups) or not np.isfinite(groups).all():
        raise InputError(f"{text}: expected {form}")
    if not 0 < obj_id < VOID_ID:
        raise InputError(f"{text}: object id {obj_id} is outside 1..{VOID_ID - 1}")
    return text, obj_id, groups


def parse_clicks(boxes: Sequence[str], points: Sequence[str]) -> list:
    """The --box and --points values as (the flag as given, object id, Box or Clicks); checked before the
    video is read, except against the frame size (``click_prompts``)."""
    from sam3_jax.infer.video_predictor import Box, Clicks

    parsed, seen = [], set()
    for flag, values, form, count in (("box", boxes, "ID:x0,y0,x1,y1", 4),
                                      ("points", points, "ID:x,y,label[;x,y,label...]", 3)):
        for value in values:
            text, obj_id, groups = _parse_flag(flag, value, form, count)
            if (flag, obj_id) in seen:
                raise InputError(f"{text}: object {obj_id} has another --{flag}")
            seen.add((flag, obj_id))
            if flag == "box":
                if len(groups) != 1:
                    raise InputError(f"{text}: expected {form}")
                prompt = Box(*groups[0])
                if prompt.x1 <= prompt.x0 or prompt.y1 <= prompt.y0:
                    raise InputError(f"{text}: a box needs x1 > x0 and y1 > y0")
            else:
                if any(g[2] not in (0, 1) for g in groups):
                    raise InputError(f"{text}: a label must be 1 (positive) or 0 (negative)")
                prompt = Clicks([tuple(g[:2]) for g in groups], [int(g[2]) for g in groups])
            parsed.append((text, obj_id, prompt))
    return parsed


def click_prompts(parsed: list, size: tuple[int, int], mask_ids: Collection[int]) -> dict:
    """``parse_clicks``'s prompts checked against the (H, W) frame and the mask's ids, by object id; an
    object with a box and clicks gets one ``Clicks`` holding both."""
    from sam3_jax.infer.video_predictor import Box

    boxes, clicks = {}, {}
    for text, obj_id, prompt in parsed:
        if obj_id in mask_ids:
            raise InputError(f"{text}: object {obj_id} also has a mask in --init_mask; give it one or the other")
        is_box = isinstance(prompt, Box)
        xy = np.array([(prompt.x0, prompt.y0), (prompt.x1, prompt.y1)] if is_box else prompt.points)
        if (xy < 0).any() or (xy > (size[1], size[0])).any():
            raise InputError(f"{text}: outside the {size[1]}x{size[0]} frame")
        (boxes if is_box else clicks)[obj_id] = prompt
    return boxes | {i: dataclasses.replace(c, box=boxes.get(i)) for i, c in clicks.items()}


@contextlib.contextmanager
def open_frames(path: str):
    """Yields (frames, stems, fps): the frame source, each frame's output name without ``.png`` and the
    frame rate the overlay plays at (a directory of frames has none: ``video_io.DEFAULT_FPS``)."""
    from sam3_jax.infer import video_io
    from sam3_jax.infer.video_predictor import ImageFolderFrames

    if os.path.isdir(path):
        from PIL import Image

        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # headers only: check_frames applies ours
        try:
            frames = ImageFolderFrames(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        yield frames, [os.path.splitext(os.path.basename(p))[0] for p in frames.paths], video_io.DEFAULT_FPS
    elif os.path.isfile(path):
        with video_io.VideoFileFrames(path) as frames:
            yield frames, [f"{i:05d}" for i in range(len(frames))], frames.fps
    else:
        raise InputError(f"video not found: {path}")


def check_outputs(output: str, overlay: str | None, overwrite: bool) -> str:
    """Refuses, before any work, outputs that exist (unless ``overwrite``, which replaces a directory by
    a directory and a file by a file only) or that cannot be written (their folder is probed); returns
    ``output`` made absolute."""
    from sam3_jax.infer import video_io

    output = os.path.abspath(output)
    for path in [output] + ([overlay] if overlay else []):
        if os.path.exists(path) and not overwrite:
            raise InputError(f"output exists (pass --overwrite to replace it): {os.path.abspath(path)}")
    if overlay:
        if not overlay.lower().endswith(video_io.OVERLAY_SUFFIXES):
            raise InputError(f"--overlay={overlay}: must end with {' or '.join(video_io.OVERLAY_SUFFIXES)}")
        if os.path.abspath(overlay).startswith(output + os.sep):
            raise InputError(f"--overlay={overlay}: must be outside --output (that directory is replaced whole)")
        fileio.check_output(overlay, overwrite, directory=False)
    fileio.check_output(output, overwrite, directory=True)
    return output


def check_frames(frames, video: str, init_frame: int) -> None:
    """``init_frame`` is a frame of the video, and its frames (all of the first one's size) are within
    ``image_io.MAX_PIXELS``: refused from the headers, before any frame is decoded."""
    from sam3_jax.data import image_io

    if not 0 <= init_frame < len(frames):
        raise InputError(f"--init_frame={init_frame} is outside the video's {len(frames)} frames")
    try:
        image_io.check_pixels(frames.size[1], frames.size[0], getattr(frames, "paths", [video])[0])
    except image_io.ImageError as e:
        raise InputError(str(e)) from e


def check_finite(outputs: dict, frame: str) -> None:
    """The predictor's outputs on a frame hold no NaN or Inf, else an error that says so (rather than
    reporting no object)."""
    finite.check_finite(outputs, f"frame {frame}: the predictor's outputs")


def run(checkpoint: str, video: str, init_mask: str | None, init_frame: int, output: str, direction: str,
        overwrite: bool = False, overlay: str | None = None, video_id: int = 1, category_id: int = 1,
        boxes: Sequence[str] = (), points: Sequence[str] = ()) -> int:
    """Does the work of the CLI (``boxes`` / ``points``: the --box / --points values); returns the number of
    frames written."""
    from sam3_jax.infer.video_predictor import VideoPredictor

    output = check_outputs(output, overlay, overwrite)
    clicks = parse_clicks(boxes, points)
    with open_frames(video) as (frames, stems, fps):
        check_frames(frames, video, init_frame)
        masks, palette = {}, None
        if init_mask is not None:
            ids_map, palette = read_init_mask(init_mask)
            if ids_map.shape != frames.size:
                raise InputError(f"{init_mask} is {ids_map.shape[1]}x{ids_map.shape[0]} but the frames are "
                                 f"{frames.size[1]}x{frames.size[0]}")
            masks = {int(i): ids_map == i for i in np.unique(ids_map) if i not in (0, VOID_ID)}
            if not masks:
                raise InputError(f"{init_mask}: no object (every pixel is 0 or {VOID_ID})")
        prompts = dict(sorted((masks | click_prompts(clicks, frames.size, masks)).items()))
        obj_ids = list(prompts)
        palette = palette or voc_palette()
        predictor = VideoPredictor.from_checkpoint(checkpoint)
        masklets, done = video_outputs.Masklets(len(frames)), []
        presence = np.zeros(len(obj_ids))  # sum over tracked frames of sigmoid(object score logit)

        with fileio.atomic_directory(output) as tmp:
            for result in predictor.propagate_iter(frames, prompts, init_frame, direction):
                check_finite({"scores": result.scores, "logits": result.logits}, stems[result.frame_idx])
                label = label_map(result, obj_ids)
                video_outputs.save_label(tmp, stems[result.frame_idx], label, palette)
                for i in obj_ids:
                    masklets.add(result.frame_idx, i, label == i)
                presence += 0.5 + 0.5 * np.tanh(result.scores.astype(np.float64) / 2)  # sigmoid, no overflow
                done.append(result.frame_idx)
                if len(done) % 25 == 0:
                    logging.info("%d frames tracked", len(done))
            objects = [{"id": i, "label": i, "score": float(p / len(done))} for i, p in zip(obj_ids, presence)]
            video_outputs.write_results(tmp, masklets.results(objects, video_id, category_id))
        video_outputs.write_overlay(output, frames, stems, done, palette, fps, overlay)
    return len(done)


def text_label_map(frame) -> np.ndarray:
    """A detect-and-track frame's (already non-overlapping) masks as palette indices (id % 254) + 1."""
    label = np.zeros(frame.masks.shape[1:], np.uint8)
    for obj_id, mask in zip(frame.obj_ids, frame.masks):
        label[mask] = int(obj_id) % (VOID_ID - 1) + 1
    return label


def run_text(checkpoint: str, video: str, prompt: str, output: str, overwrite: bool = False,
             overlay: str | None = None, video_id: int = 1, category_id: int = 1, init_frame: int = 0,
             direction: str = "forward") -> int:
    """The CLI with ``--prompt``: detect-and-track from ``init_frame`` in ``direction``; returns the number
    of frames written."""
    from sam3_jax.infer.detect_track import DetectTrackPredictor

    output = check_outputs(output, overlay, overwrite)
    if not prompt or not prompt.strip():
        raise InputError("--prompt is empty")
    with open_frames(video) as (frames, stems, fps):
        check_frames(frames, video, init_frame)
        predictor = DetectTrackPredictor.from_checkpoint(checkpoint)
        objects: dict[int, dict] = {}
        masklets, done, palette = video_outputs.Masklets(len(frames)), [], voc_palette()
        with fileio.atomic_directory(output) as tmp:
            for result in predictor.propagate_iter(frames, prompt, start_frame=init_frame, direction=direction):
                check_finite({"probs": result.probs, "boxes": result.boxes_xywh}, stems[result.frame_idx])
                video_outputs.save_label(tmp, stems[result.frame_idx], text_label_map(result), palette)
                for obj_id, prob, mask in zip(result.obj_ids, result.probs, result.masks):
                    if mask.any():
                        label = int(obj_id) % (VOID_ID - 1) + 1
                        entry = objects.setdefault(int(obj_id), {"id": int(obj_id), "label": label,
                                                                 "score": float(prob), "frames": []})
                        entry["frames"].append(result.frame_idx)
                    masklets.add(result.frame_idx, int(obj_id), mask)
                done.append(result.frame_idx)
                if len(done) % 25 == 0:
                    logging.info("%d frames processed", len(done))
            shown = [objects[i] | {"frames": sorted(objects[i]["frames"])} for i in sorted(objects)]
            with open(os.path.join(tmp, "objects.json"), "w") as f:
                json.dump({"prompt": prompt, "objects": shown}, f, indent=1)
            video_outputs.write_results(tmp, masklets.results(shown, video_id, category_id))
        video_outputs.write_overlay(output, frames, stems, done, palette, fps, overlay)
    return len(done)


def main(argv):
    del argv
    from sam3_jax.checkpoint.finite import NonFiniteError
    from sam3_jax.data.errors import DataError
    from sam3_jax.data.image_io import ImageError
    from sam3_jax.infer.video_predictor import VideoInputError

    try:
        on_frame = FLAGS.init_mask is not None or FLAGS.box or FLAGS.points
        if FLAGS.prompt is None and not on_frame:
            raise InputError("no prompt: give --init_mask, --box or --points (objects on one frame) or --prompt")
        if FLAGS.prompt is not None and on_frame:
            raise InputError("give exactly one of --prompt (text) and objects on one frame (--init_mask, --box, "
                             "--points)")
        outputs = {"overwrite": FLAGS.overwrite, "overlay": FLAGS.overlay, "video_id": FLAGS.video_id,
                   "category_id": FLAGS.category_id}
        if FLAGS.prompt is not None:
            written = run_text(FLAGS.checkpoint, FLAGS.video, FLAGS.prompt, FLAGS.output,
                               init_frame=FLAGS.init_frame, direction=FLAGS.direction, **outputs)
        else:
            written = run(FLAGS.checkpoint, FLAGS.video, FLAGS.init_mask, FLAGS.init_frame, FLAGS.output,
                          FLAGS.direction, boxes=FLAGS.box, points=FLAGS.points, **outputs)
    except (InputError, VideoInputError, DataError, ImageError, NonFiniteError) as e:  # one message, no traceback
        print(f"predict_video: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # missing or unwritable paths, disk full
        print(f"predict_video: error: {fileio.describe_os_error(e)}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {written} frame(s) to {os.path.abspath(FLAGS.output)}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "video", "output"])
    app.run(main)
