"""What ``predict_video`` writes: the palette PNGs of ids (also what the trainer's whole-video evaluation
scores), the YouTube-VIS results file (the masklets as compressed RLEs) and the overlay video, which is
written last, from the finished output directory."""
import json
import os

import numpy as np

RESULTS = "results.json"


class Masklets:
    """Per object a YouTube-VIS segmentation per frame: compressed RLE where it has pixels, else None.
    Held until the end (an RLE is small: about its outline's length in bytes)."""

    def __init__(self, num_frames: int):
        self.num_frames = num_frames
        self.rles: dict[int, list] = {}

    def add(self, frame_idx: int, obj_id: int, mask: np.ndarray) -> None:
        from sam3_jax.evaluation.coco import encode_mask

        if mask.any():
            self.rles.setdefault(obj_id, [None] * self.num_frames)[frame_idx] = encode_mask(mask)

    def results(self, objects: list[dict], video_id: int, category_id: int) -> list[dict]:
        """``objects``: {"id", "label", "score"} each, in the order to list them."""
        return [{"video_id": video_id, "category_id": category_id, "score": o["score"],
                 "segmentations": self.rles.get(o["id"], [None] * self.num_frames), "obj_id": o["id"],
                 "label": o["label"]} for o in objects]


def label_map(result, obj_ids: list[int]) -> np.ndarray:
    """A tracked frame's PNG: per pixel the id of the object with the highest logit among those whose
    mask is on, else 0."""
    logits = np.where(result.masks, result.logits, -np.inf)
    best = np.argmax(logits, axis=0)
    ids = np.asarray(obj_ids, np.uint8)[best]
    return np.where(result.masks.any(axis=0), ids, 0).astype(np.uint8)


def save_label(directory: str, stem: str, label: np.ndarray, palette: list[int]) -> None:
    from PIL import Image

    im = Image.fromarray(label)
    im.putpalette(palette)  # mode L -> P, the ids kept as palette indices
    im.save(os.path.join(directory, stem + ".png"))


def write_results(directory: str, results: list[dict]) -> None:
    with open(os.path.join(directory, RESULTS), "w") as f:
        json.dump(results, f)


def write_overlay(output: str, frames, stems: list[str], done: list[int], palette: list[int], fps,
                  overlay: str | None) -> None:
    """The overlay of the ``done`` frames from their PNGs in the finished ``output``; it is written after
    ``output`` is in place, so a failure here loses no mask (the error says so)."""
    from PIL import Image

    from sam3_jax.infer import video_io

    if not overlay:
        return

    def tinted():
        for i in sorted(done):
            with Image.open(os.path.join(output, stems[i] + ".png")) as im:
                label = np.asarray(im)
            yield video_io.blend(np.asarray(frames[i]), label, palette)

    try:
        video_io.write_overlay(overlay, tinted(), fps)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e}; the masks and {RESULTS} in {output} are complete, only the "
                      "overlay is missing", e.filename or overlay) from e
