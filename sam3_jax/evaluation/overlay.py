"""Drawing predicted masks and boxes over an image (for the predict CLI and training logs)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)
CAPTION_HEIGHT = 13  # pixels a line of `caption` takes: PIL's default font reaches 12 below its origin
CAPTION_BACKGROUND = (20, 20, 20)
CAPTION_TEXT = (255, 255, 255)


def draw(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray | None = None,
         scores: np.ndarray | None = None, alpha: float = 0.5, ids=None, width: int = 2) -> np.ndarray:
    """uint8 (H, W, 3) image, (N, H, W) bool masks, optional (N, 4) xyxy pixel boxes -> uint8 image.

    Instance i is drawn in palette colour ``ids[i]`` (default i), so that a caller drawing a subset
    of its instances keeps each one's colour; ``width`` is the boxes' outline width.
    """
    ids = range(len(masks)) if ids is None else ids
    out = image.astype(np.float32).copy()
    for k, mask in zip(ids, masks):
        colour = PALETTE[k % len(PALETTE)].astype(np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if boxes is not None:
        canvas = ImageDraw.Draw(pil)
        for i, (k, box) in enumerate(zip(ids, boxes)):
            colour = tuple(int(c) for c in PALETTE[k % len(PALETTE)])
            canvas.rectangle([float(v) for v in box], outline=colour, width=width)
            if scores is not None:
                canvas.text((float(box[0]) + 2, float(box[1]) + 2), f"{scores[i]:.2f}", fill=colour)
    return np.asarray(pil)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool masks -> (N, 4) xyxy pixel boxes around each mask's pixels (an empty mask
    gets the degenerate box (0, 0, 0, 0))."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if xs.size:
            boxes[i] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return boxes


def caption(image: np.ndarray, text: str) -> np.ndarray:
    """The uint8 (H, W, 3) image under a band holding ``text``, wrapped at spaces into as many lines of
    ``CAPTION_HEIGHT`` pixels as the image's width needs (a word wider than the image is cut):
    (H + lines * CAPTION_HEIGHT, W, 3)."""
    width = image.shape[1]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [""]
    for word in text.split(" "):
        joined = f"{lines[-1]} {word}" if lines[-1] else word
        if lines[-1] and measure.textlength(joined) > width - 2:
            lines.append(word)
        else:
            lines[-1] = joined
    band = Image.new("RGB", (width, len(lines) * CAPTION_HEIGHT), CAPTION_BACKGROUND)
    canvas = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        canvas.text((2, i * CAPTION_HEIGHT), line, fill=CAPTION_TEXT)
    return np.concatenate([np.asarray(band), image], axis=0)
