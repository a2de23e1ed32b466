"""Drawing predicted masks and boxes over an image (for the predict CLI and training logs)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)


def draw(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray | None = None,
         scores: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) image, (N, H, W) bool masks, optional (N, 4) xyxy pixel boxes -> uint8 image."""
    out = image.astype(np.float32).copy()
    for i, mask in enumerate(masks):
        colour = PALETTE[i % len(PALETTE)].astype(np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if boxes is not None:
        canvas = ImageDraw.Draw(pil)
        for i, box in enumerate(boxes):
            colour = tuple(int(c) for c in PALETTE[i % len(PALETTE)])
            canvas.rectangle([float(v) for v in box], outline=colour, width=2)
            if scores is not None:
                canvas.text((float(box[0]) + 2, float(box[1]) + 2), f"{scores[i]:.2f}", fill=colour)
    return np.asarray(pil)
