"""Clip augmentation: one geometry and one colour draw shared by all frames of a clip.

Geometry (SAM2's hflip -> RandomAffine -> square resize) is composed into a single 3x3 matrix from
source pixels to the unit square, so each frame is warped straight to S x S (`warp_image`) and each
mask once (nearest) to M x M from that same matrix: masks and frames cannot drift apart, and there
is no separate resize pass at the source resolution as in SAM2. Masks stored as a map of ids
(DAVIS/MOSE palette PNGs: FrameAnnotation.label_map) are warped as that one 8-bit image and compared
with each object's id afterwards, at M x M; other masks travel as bit planes (object k is bit k % 8
of plane k // 8), so one nearest warp moves eight objects (see FrameAnnotation.bit_planes). Both
give the same masks. Boxes are recomputed from the warped masks.

PIL decodes; OpenCV warps (SIMD, one pass, straight into the example's arrays) and applies the
colour matrix in place.

Colour (SAM2: clip-level ColorJitter, grayscale, per-frame ColorJitter) is linear in RGB, so the
whole chain becomes one 3x4 matrix applied in place to the warped frame by a single OpenCV
`transform`. Contrast needs the frame's mean grey, which is propagated
through the chain; unlike torchvision, intermediate values are not clipped (only the result is).
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from PIL import Image

# The loader parallelises over worker processes; OpenCV's own thread pool would oversubscribe the
# cores (and the per-core throughput is what the data benchmark holds us to).
cv2.setNumThreads(1)
# Pillow returns every freed image's memory to the OS by default, so each frame's decode faults in
# fresh pages; keeping a few freed blocks lets the next frame reuse them (benchmarks/README.md).
Image.core.set_blocks_max(max(Image.core.get_blocks_max(), 16))

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


def warp_image(img: Image.Image, unit_matrix: np.ndarray, out: np.ndarray,
               fill: tuple[int, int, int]) -> np.ndarray:
    """Warps an RGB frame into `out`, uint8 [S, S, 3] (a slot of the example, so no fresh
    frame-sized buffer is allocated and faulted in per frame), in one bilinear resampling.

    Bilinear sampling does not antialias, so a downscale is low-passed first, per source axis
    (`f` source pixels per output pixel along it): an integer box reduction by floor(f) (PIL),
    then for the fractional rest f' a Gaussian of variance (f'^2 - 1) / 6, which with the
    interpolation's own triangle (variance 1/6) gives the variance of the triangle of PIL's
    antialiased resize, f'^2 / 6 (SAM2 resizes with it, after a bilinear affine pass: two
    resamplings where this does one).
    """
    width, height = img.size
    per_out = 1.0 / (out.shape[0] * np.linalg.norm(unit_matrix[:2, :2], axis=0))  # (f_x, f_y)
    factor = np.maximum(1, np.floor(per_out)).astype(int)
    if factor.max() > 1:
        img = img.reduce(tuple(int(f) for f in factor))
    src = pixels(img)
    sigma = np.sqrt(np.maximum(0.0, (per_out / factor) ** 2 - 1) / 6)
    if sigma.max() > 0.1:  # below that the kernel is a delta at 8 bits
        sx, sy = np.maximum(sigma, 1e-3)  # OpenCV reads a zero sigmaY as "same as sigmaX"
        src = cv2.GaussianBlur(src, (0, 0), sigmaX=float(sx), sigmaY=float(sy))
    scaled = unit_matrix @ np.diag([width / src.shape[1], height / src.shape[0], 1.0])
    return _warp(src, scaled, out, cv2.INTER_LINEAR, fill)


def warp_planes(planes: np.ndarray, unit_matrix: np.ndarray, size: int) -> np.ndarray:
    """uint8 [K, H, W] bit planes -> [K, size, size], nearest neighbour."""
    out = np.empty((len(planes), size, size), np.uint8)
    for p, o in zip(planes, out):
        _warp(p, unit_matrix, o, cv2.INTER_NEAREST, 0)
    return out


def warp_labels(labels: np.ndarray, unit_matrix: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W] object ids (FrameAnnotation.label_map) -> uint8 [size, size], nearest
    neighbour, outside filled with 0. Nearest sampling moves ids exactly as it moves bit planes,
    so `masks_from_labels` of this equals `masks_from_planes` of `warp_planes`."""
    return _warp(labels, unit_matrix, np.empty((size, size), np.uint8), cv2.INTER_NEAREST, 0)


def _warp(src: np.ndarray, unit_matrix: np.ndarray, out: np.ndarray, interpolation,
          fill) -> np.ndarray:
    """OpenCV affine warp of `src` into `out` by `unit_matrix` (src pixels -> unit square).

    Our matrices treat pixel (i, j) as the square [j, j+1) x [i, i+1); OpenCV puts pixel centres
    on the integers, hence the half-pixel shifts on both sides.
    """
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    size = np.diag([out.shape[1], out.shape[0], 1.0])
    m = np.linalg.inv(half) @ size @ unit_matrix @ half
    fill = tuple(fill) if isinstance(fill, (tuple, list)) else (fill,) * 3
    cv2.warpAffine(src, m[:2], (out.shape[1], out.shape[0]), dst=out, flags=interpolation,
                   borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    return out


def pixels(img: Image.Image) -> np.ndarray:
    """np.asarray(img) for 8-bit modes (L, P, RGB, ...), read out in one piece.

    np.asarray goes through `Image.tobytes`, which encodes 64 KiB chunks and joins them (fresh
    buffers, a second copy; benchmarks/README.md). Here Pillow's raw encoder writes the whole image
    into one buffer; where that internal interface is missing or changed, this falls back to
    np.asarray (same values, slower).
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


def masks_from_planes(planes: np.ndarray, out: np.ndarray) -> None:
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


def apply_colour(frame: np.ndarray, ops: list[tuple[str, float]]) -> None:
    """Applies colour ops to a uint8 [H, W, 3] frame in place: one 3x4 matrix per pixel
    (OpenCV, rounded and clipped to uint8 once at the end)."""
    if not ops:
        return
    mean = np.zeros(3)
    if any(name == "contrast" for name, _ in ops):  # a 1/16 x 1/16 grid estimates it closely
        mean = frame[::16, ::16].reshape(-1, 3).mean(axis=0)
    cv2.transform(frame, colour_matrix(ops, mean)[:3].astype(np.float32), dst=frame)
