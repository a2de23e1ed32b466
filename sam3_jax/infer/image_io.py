"""Loading user images robustly and resizing them the way the reference's Sam3Processor does.

The reference resizes a uint8 tensor with torchvision's antialiased bilinear ``Resize`` to a square
(aspect ratio not kept) and normalises with mean = std = 0.5. PIL's bilinear resize is the same
antialiased triangle filter.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000 * 40_000  # beyond this we refuse rather than exhaust memory


class ImageError(ValueError):
    """An input image cannot be used; the message names the file and the reason."""


def load_image(path: str) -> np.ndarray:
    """Any common image file -> uint8 RGB (H, W, 3), EXIF orientation applied.

    Grayscale is replicated to RGB, alpha is dropped (as ``PIL.Image.convert("RGB")``), and 16-bit
    images are scaled to 8 bits.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return to_rgb_uint8(im, path)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot be read as an image ({e})") from e


def to_rgb_uint8(im: Image.Image, name: str = "image") -> np.ndarray:
    if im.width < 1 or im.height < 1:
        raise ImageError(f"{name}: empty image ({im.width}x{im.height})")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=-1)
    if im.mode == "F":
        raise ImageError(f"{name}: floating-point images are not supported; convert to 8 or 16 bit")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3); a no-op when the image is already that size."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def normalize(image_uint8) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (mean 0.5, std 0.5), the model's input range."""
    return (np.asarray(image_uint8, np.float32) / 255.0 - 0.5) / 0.5
