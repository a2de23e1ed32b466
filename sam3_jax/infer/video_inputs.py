"""What both video predictors read: a converted video checkpoint, frames (an array or a folder of
images), checked and brought to the model's square input, and the error that names a bad input."""
from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from sam3_jax.checkpoint import weights
from sam3_jax.data import image_io
from sam3_jax.nn import ops

DIRECTIONS = ("forward", "backward", "both")


class VideoInputError(ValueError):
    """Frames or prompts cannot be used; the message says which and why."""


class FrameSource(Protocol):
    """What ``propagate`` reads: len() frames, each uint8 RGB (H, W, 3), read when needed."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


class ImageFolderFrames:
    """The JPEG / PNG frames of a directory, in frame-number order (numeric stems, else by name).

    Every header is read up front: no frame, a file that is not an image, or a frame whose size
    differs from the first raise ``VideoInputError`` naming the file. Pixels are decoded on access.
    """

    SUFFIXES = (".jpg", ".jpeg", ".png")

    def __init__(self, directory: str):
        from PIL import Image, UnidentifiedImageError

        if not os.path.isdir(directory):
            raise VideoInputError(f"not a directory of frames: {directory}")
        names = [n for n in os.listdir(directory) if n.lower().endswith(self.SUFFIXES)
                 and os.path.isfile(os.path.join(directory, n))]
        if not names:
            raise VideoInputError(f"{directory}: no frames (expected {', '.join(self.SUFFIXES)} files)")
        stems = [os.path.splitext(n)[0] for n in names]
        if all(s.isdigit() for s in stems):
            names = [n for _, n in sorted(zip((int(s) for s in stems), names))]
        else:
            names.sort()
        self.paths = [os.path.join(directory, n) for n in names]
        self.size = None  # (H, W)
        for path in self.paths:
            try:
                with Image.open(path) as im:
                    size = (im.height, im.width)
            except (UnidentifiedImageError, OSError) as e:
                raise VideoInputError(f"{path}: cannot be read as an image ({e})") from e
            if self.size is None:
                self.size = size
            elif size != self.size:
                raise VideoInputError(f"{path}: frame is {size[1]}x{size[0]} but {self.paths[0]} is "
                                      f"{self.size[1]}x{self.size[0]}; all frames must have one size")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.paths[index]
        try:
            frame = image_io.load_image(path)
        except (OSError, ValueError) as e:
            raise VideoInputError(str(e) if path in str(e) else f"{path}: {e}") from e
        if frame.shape[:2] != self.size:
            raise VideoInputError(f"{path}: decoded as {frame.shape[1]}x{frame.shape[0]} (EXIF orientation?) but "
                                  f"frames are {self.size[1]}x{self.size[0]}")
        return frame


def read_frame(frames: FrameSource | np.ndarray, index: int, size=None, first: str = "") -> np.ndarray:
    """Frame ``index``, checked to be uint8 (H, W, 3) and, given ``size``, of that (H, W), the size of
    the frame ``first`` names."""
    frame = np.asarray(frames[index])
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise VideoInputError(f"frame {index}: expected uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
    if size is not None and frame.shape[:2] != tuple(size):
        raise VideoInputError(f"frame {index} is {frame.shape[1]}x{frame.shape[0]} but {first} is "
                              f"{size[1]}x{size[0]}; all frames must have one size")
    return frame


def preprocess(frame: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (image_size, image_size, 3): as the reference loads a video, resized
    with PIL and normalised in float16."""
    return ops.normalize_pixels(image_io.resize_square(np.asarray(frame, np.uint8), image_size), np.float16)


def read_video_checkpoint(checkpoint_dir: str, task: str) -> weights.Weights:
    """The weights of a video model (a converted video checkpoint or a training run), every stack
    scanned (`weights.read`); one without a tracker is refused, naming the directory and ``task``
    (what needed the tracker)."""
    read = weights.read(checkpoint_dir, tracker=True)
    if read.tracker_cfg is None:
        raise VideoInputError(f"{checkpoint_dir}: the converted checkpoint has no tracker (converted from an "
                              f"image-model file?); {task} needs the video model's sam3.pt")
    return read
