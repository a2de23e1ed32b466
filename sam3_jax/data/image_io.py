"""Loading user images robustly and resizing them the way the reference's Sam3Processor does.

The reference resizes a uint8 tensor with torchvision's antialiased bilinear ``Resize`` to a square
(aspect ratio not kept) and normalises with mean = std = 0.5. PIL's bilinear resize is the same
antialiased triangle filter.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Images (and video frames, masks) beyond this many pixels are refused from their header, before any
# decoding: 2^27, e.g. 16384 x 8192, 0.4 GB as RGB and a few times that while decoding. A header can
# claim any size over a file of a few bytes (a PNG of one colour compresses 1000:1).
MAX_PIXELS = 1 << 27


class ImageError(ValueError):
    """An input image cannot be used; the message names the file and the reason."""


def check_pixels(width: int, height: int, name: str) -> None:
    """Raises ImageError when a ``width`` x ``height`` image is beyond ``MAX_PIXELS``."""
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {width}x{height} pixels is beyond the limit of {MAX_PIXELS} "
                         f"({MAX_PIXELS / 1e6:.0f} megapixels); refused before decoding")


@contextlib.contextmanager
def open_image(path: str):
    """``PIL.Image.open`` with the header's size checked against ``MAX_PIXELS`` (ImageError) before
    anything is decoded. Other failures raise as PIL raises them (OSError, ValueError, SyntaxError)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check, and say so, ourselves
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:  # beyond twice PIL's own limit
            raise ImageError(f"{path}: beyond the limit of {MAX_PIXELS} pixels; refused before decoding ({e})") from e
    with im:
        check_pixels(im.width, im.height, path)
        yield im


def load_image(path: str) -> np.ndarray:
    """Any common image file -> uint8 RGB (H, W, 3), EXIF orientation applied.

    Grayscale is replicated to RGB, alpha is dropped (as ``PIL.Image.convert("RGB")``), and 16-bit
    images are scaled to 8 bits. Images beyond ``MAX_PIXELS`` are refused before decoding.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with open_image(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return to_rgb_uint8(im, path)
    except (UnidentifiedImageError, OSError) as e:
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
