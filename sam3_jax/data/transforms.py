"""Clip augmentation: one geometry and one colour draw shared by all frames of a clip.

Geometry (SAM2's hflip -> RandomAffine -> square resize) is composed into a single 3x3 matrix from
source pixels to the unit square, so each frame is warped straight to S x S (`warp_image`) and each
mask once (nearest) to M x M from that same matrix: masks and frames cannot drift apart, and there
is no separate resize pass at the source resolution as in SAM2. Masks stored as a map of ids
(DAVIS/MOSE palette PNGs: FrameAnnotation.label_map) are warped as that one 8-bit image and compared
with each object's id afterwards, at M x M; other masks travel as bit planes (object k is bit k % 8
of plane k // 8), so one nearest warp moves eight objects (see FrameAnnotation.bit_planes). Both
give the same masks. Boxes are recomputed from the warped masks.

Colour (SAM2: clip-level ColorJitter, grayscale, per-frame ColorJitter) is linear in RGB, so the
whole chain becomes one 3x4 matrix applied by a single PIL `convert` per frame, before or after the
warp, whichever touches fewer pixels. Contrast needs the frame's mean grey, which is propagated
through the chain; unlike torchvision, intermediate values are not clipped (only the result is).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageStat

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as PIL's and torchvision's grayscale


def resize_matrix(width: int, height: int, hflip: bool = False) -> np.ndarray:
    """Source pixels -> unit square, optionally mirrored."""
    m = np.diag([1.0 / width, 1.0 / height, 1.0])
    if hflip:
        m = np.array([[-1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    return m


def affine_matrix(width: int, height: int, degrees: float, shear: float,
                  scale: float) -> np.ndarray:
    """Rotation, x-shear and scale about the image centre, in source pixels (torchvision's
    RandomAffine parameterisation without translation)."""
    a, s = math.radians(degrees), math.tan(math.radians(shear))
    rot = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0, 0, 1]])
    shear_m = np.array([[1.0, s, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    centre = np.array([[1.0, 0.0, width / 2], [0.0, 1.0, height / 2], [0.0, 0.0, 1.0]])
    return centre @ rot @ shear_m @ np.diag([scale, scale, 1.0]) @ np.linalg.inv(centre)


def sample_geometry(cfg: Any, width: int, height: int, rng: np.random.Generator,
                    with_affine: bool) -> np.ndarray:
    """One draw of flip + affine; `with_affine=False` keeps only resize and flip."""
    m = resize_matrix(width, height, hflip=bool(rng.random() < cfg.hflip_prob))
    if with_affine:
        m = m @ affine_matrix(width, height, rng.uniform(-cfg.degrees, cfg.degrees),
                              rng.uniform(-cfg.shear, cfg.shear),
                              rng.uniform(cfg.scale_min, cfg.scale_max))
    return m


def warp_image(img: Image.Image, unit_matrix: np.ndarray, size: int,
               fill: tuple[int, int, int], exact: bool = False) -> Image.Image:
    """Warps a frame to size x size.

    exact: one bilinear pass of PIL's generic transform (about 2x the cost of a resize); big
    downscales are first box-reduced by an integer factor since that pass does not antialias.
    Otherwise (default, ~2x faster): an antialiased bilinear resize does the scaling, then a
    nearest-neighbour pass applies the remaining rotation/shear at unit scale, which shifts edges by
    at most half a pixel (the masks get the same nearest sampling). Without rotation or shear the
    second pass is an exact copy or mirror, so plain resize + flip loses nothing.
    """
    if exact:
        factor = min(img.size) // size
        if factor >= 2:
            img = img.reduce(factor)
            unit_matrix = unit_matrix @ np.diag([factor, factor, 1.0])
        return _warp(img, unit_matrix, size, Image.Resampling.BILINEAR, fill)
    scale_x, scale_y = size * np.linalg.norm(unit_matrix[:2, :2], axis=0)
    width, height = max(1, round(img.width * scale_x)), max(1, round(img.height * scale_y))
    resized = img.resize((width, height), Image.Resampling.BILINEAR)
    residual = unit_matrix @ np.diag([img.width / width, img.height / height, 1.0])
    return _warp(resized, residual, size, Image.Resampling.NEAREST, fill)


def warp_planes(planes: np.ndarray, unit_matrix: np.ndarray, size: int) -> np.ndarray:
    """uint8 [K, H, W] bit planes -> [K, size, size], nearest neighbour."""
    return np.stack([pixels(_warp(Image.fromarray(p), unit_matrix, size,
                                  Image.Resampling.NEAREST, 0)) for p in planes])


def warp_labels(labels: Image.Image, unit_matrix: np.ndarray, size: int) -> np.ndarray:
    """8-bit image of object ids (FrameAnnotation.label_map) -> uint8 [size, size], nearest
    neighbour, outside filled with 0. Nearest sampling moves ids exactly as it moves bit planes,
    so `masks_from_labels` of this equals `unpack_masks` of `warp_planes`."""
    return pixels(_warp(labels, unit_matrix, size, Image.Resampling.NEAREST, 0))


def pixels(img: Image.Image) -> np.ndarray:
    """np.asarray(img) for 8-bit modes (L, P, RGB, ...), read out in one piece.

    np.asarray goes through `Image.tobytes`, which encodes 64 KiB chunks and joins them: for a
    1008 x 1008 RGB frame that is several ms (fresh buffers, a second copy), ten times a plain
    copy. Here Pillow's raw encoder writes the whole image into one buffer; where that internal
    interface is missing or changed, this falls back to np.asarray (same values, slower).
    """
    channels = len(img.getbands())
    nbytes = img.width * img.height * channels
    if img.mode not in _PIXEL_MODES or nbytes == 0:
        return np.asarray(img)
    img.load()
    try:
        encoder = Image._getencoder(img.mode, "raw", img.mode)  # what tobytes uses
        try:
            encoder.setimage(img.im, (0, 0, *img.size))
            _, status, data = encoder.encode(nbytes + 1)
        finally:
            encoder.cleanup()
    except (AttributeError, TypeError, ValueError, OSError):
        return np.asarray(img)
    if status != 1 or len(data) != nbytes:  # 1: everything encoded
        return np.asarray(img)
    shape = (img.height, img.width) if channels == 1 else (img.height, img.width, channels)
    return np.frombuffer(data, np.uint8).reshape(shape)


_PIXEL_MODES = frozenset({"L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LA", "PA"})


def masks_from_labels(labels: np.ndarray, ids: list[int], out: np.ndarray) -> None:
    """uint8 [H, W] ids -> `out`, bool [len(ids), H, W]: one comparison per object."""
    for k, i in enumerate(ids):
        np.equal(labels, i, out=out[k])


def _warp(img: Image.Image, unit_matrix: np.ndarray, size: int, resample, fill) -> Image.Image:
    out_to_src = np.linalg.inv(np.diag([size, size, 1.0]) @ unit_matrix)
    return img.transform((size, size), Image.Transform.AFFINE, tuple(out_to_src[:2].ravel()),
                         resample=resample, fillcolor=fill)


def unpack_masks(planes: np.ndarray, out: np.ndarray) -> None:
    """uint8 [K, H, W] bit planes (FrameAnnotation.bit_planes) -> `out`, bool [n, H, W]."""
    bit = np.empty(planes.shape[1:], np.uint8)
    for k in range(len(out)):
        np.bitwise_and(planes[k // 8], 1 << (k % 8), out=bit)
        np.not_equal(bit, 0, out=out[k])


def boxes_from_masks(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bool [..., M, M] -> (float32 [..., 4] normalised cxcywh, bool [...] non-empty).

    The box spans whole pixels: [first, last + 1) / M, so mirroring the mask maps cx to 1 - cx.
    """
    size = masks.shape[-1]
    cols, rows = masks.any(axis=-2), masks.any(axis=-1)
    valid = cols.any(axis=-1)
    x0 = cols.argmax(axis=-1)
    x1 = size - cols[..., ::-1].argmax(axis=-1)
    y0 = rows.argmax(axis=-1)
    y1 = size - rows[..., ::-1].argmax(axis=-1)
    boxes = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1) / size
    return np.where(valid[..., None], boxes, 0.0).astype(np.float32), valid


def sample_jitter(rng: np.random.Generator, brightness: float, contrast: float,
                  saturation: float) -> list[tuple[str, float]]:
    """ColorJitter factors in a random order, as torchvision draws them."""
    ops = [("brightness", brightness), ("contrast", contrast), ("saturation", saturation)]
    return [(name, rng.uniform(max(0.0, 1 - amount), 1 + amount))
            for name, amount in (ops[i] for i in rng.permutation(3)) if amount > 0]


def colour_matrix(ops: list[tuple[str, float]], mean_rgb: np.ndarray) -> np.ndarray:
    """Composes colour ops (brightness, contrast, saturation, grayscale) into one 4x4 affine map
    of homogeneous RGB; `mean_rgb` is the frame's mean, needed by contrast."""
    m = np.eye(4)
    grey = np.zeros((4, 4))
    grey[:3, :3] = np.outer(np.ones(3), LUMA)
    grey[3, 3] = 1.0
    for name, f in ops:
        if name == "brightness":
            op = np.diag([f, f, f, 1.0])
        elif name == "contrast":
            mean_grey = LUMA @ (m @ np.append(mean_rgb, 1.0))[:3]
            op = np.diag([f, f, f, 1.0])
            op[:3, 3] = (1 - f) * mean_grey
        elif name == "saturation":
            op = f * np.eye(4) + (1 - f) * grey
            op[3, 3] = 1.0
        elif name == "grayscale":
            op = grey
        else:
            raise ValueError(f"unknown colour op {name!r}")
        m = op @ m
    return m


def apply_colour(img: Image.Image, ops: list[tuple[str, float]]) -> Image.Image:
    if not ops:
        return img
    mean = np.zeros(3)
    if any(name == "contrast" for name, _ in ops):  # a 64x64 sample estimates the mean closely
        mean = np.array(ImageStat.Stat(img.resize((64, 64), Image.Resampling.NEAREST)).mean)
    return img.convert("RGB", tuple(colour_matrix(ops, mean)[:3].ravel()))
