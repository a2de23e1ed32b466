"""Video files in and overlay videos out, for ``predict_video``: decoding with PyAV (its wheel bundles
FFmpeg), animated GIFs with Pillow, MP4s with PyAV."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from fractions import Fraction
from typing import Self

import av
import numpy as np
from PIL import Image

from sam3_jax import fileio
from sam3_jax.infer.video_predictor import VideoInputError

DEFAULT_FPS = Fraction(24)  # DAVIS's frame rate: for frame directories, which carry none
GIF_MAX_SIDE = 480  # GIF frames are scaled down to this: Pillow holds every frame until it writes
OVERLAY_SUFFIXES = (".gif", ".mp4")

log = logging.getLogger(__name__)


class VideoFileFrames:
    """The frames of a video file (any container and codec FFmpeg reads) as uint8 RGB (H, W, 3), decoded
    when asked for: a frame source for the predictors, ``len()`` and ``[i]``.

    Opening decodes the whole file once without converting any pixel: that counts the frames (container
    metadata is often missing or wrong), and a file that is not a video, has no frame, fails to decode
    or changes frame size fails here, before any work, with a ``VideoInputError`` naming it. Fewer frames
    than the container lists (a truncated file whose index comes first) is only a warning: an edit list
    (a cut without re-encoding) drops frames the same way.

    Access is by decoding again, in order. The predictors (both tasks) ask almost in order: the start
    frame k, then k+1 .. T-1, then k-1 .. 0 (direction "both"; k = 0 is plain order). A frame the
    decoder passes on its way to a later one (those before k) is spooled to a temporary directory, raw,
    and read back from there when asked for; asking for a frame behind the decoder that was not spooled
    restarts decoding from the first frame (``predict_video`` does so once, to write the overlay). Memory
    holds the frame asked for (and the decoder's few); disk the frames before the prompt frame
    (H x W x 3 bytes each) until ``close()``. Seeking is not used: it lands on key frames, and frame-exact seeking depends on the
    container's timestamps.
    """

    def __init__(self, path: str):
        self.path = path
        self._container = None
        self._decoder = None
        self._next = 0  # index of the frame the decoder gives next
        self._spool = None  # TemporaryDirectory, made when a frame is first passed
        self._spooled = set()
        self._count_frames()

    def _open(self):
        """(container, its first video stream); not a readable video -> VideoInputError."""
        try:
            container = av.open(self.path)
        except av.error.FFmpegError as e:
            raise VideoInputError(f"{self.path}: cannot be read as a video ({e})") from e
        if not container.streams.video:
            container.close()
            raise VideoInputError(f"{self.path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return container, stream

    def _count_frames(self):
        container, stream = self._open()
        self.size, count = None, 0  # size: (H, W)
        try:
            with container:
                rate = stream.average_rate or stream.guessed_rate
                self.fps = Fraction(rate) if rate else DEFAULT_FPS
                listed = stream.frames  # read while open: PyAV 18.1.1 refuses a closed stream's attributes
                for frame in container.decode(stream):
                    size = (frame.height, frame.width)
                    if self.size is None:
                        self.size = size
                    elif size != self.size:
                        raise VideoInputError(f"{self.path}: frame {count} is {size[1]}x{size[0]} but frame 0 is "
                                              f"{self.size[1]}x{self.size[0]}; all frames must have one size")
                    count += 1
        except av.error.FFmpegError as e:
            raise VideoInputError(f"{self.path}: cannot be read as a video, frame {count} ({e})") from e
        if not count:
            raise VideoInputError(f"{self.path}: no frames")
        if listed > count:
            log.warning("%s: %d frames decode of the %d its container lists (truncated?)", self.path, count, listed)
        self._len = count

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self._len:
            raise IndexError(f"frame {index} of {self._len}")
        if index in self._spooled:
            return np.load(self._spool_path(index))
        if index < self._next or self._decoder is None:
            self._restart()
        try:
            while True:
                frame = next(self._decoder, None)
                if frame is None:
                    raise VideoInputError(f"{self.path}: ended after {self._next} frames, {self._len} when opened")
                i = self._next
                self._next += 1
                if i == index:
                    return frame.to_ndarray(format="rgb24")
                if i not in self._spooled:
                    np.save(self._spool_path(i), frame.to_ndarray(format="rgb24"))
                    self._spooled.add(i)
        except av.error.FFmpegError as e:
            raise VideoInputError(f"{self.path}: cannot be read as a video, frame {self._next} ({e})") from e

    def _restart(self):
        self._close_decoder()
        self._container, stream = self._open()
        self._decoder = self._container.decode(stream)
        self._next = 0

    def _spool_path(self, index: int) -> str:
        if self._spool is None:
            self._spool = fileio.temporary_directory("sam3_jax-frames-")  # a killed run's: removed by the next
        return os.path.join(self._spool.name, f"{index:05d}.npy")

    def _close_decoder(self):
        if self._container is not None:
            self._container.close()
        self._container = self._decoder = None

    def close(self):
        """Closes the file and deletes the spooled frames."""
        self._close_decoder()
        if self._spool is not None:
            self._spool.cleanup()
        self._spool, self._spooled = None, set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc):
        self.close()


def blend(frame: np.ndarray, label: np.ndarray, palette: list[int], alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB (H, W, 3) with the label map's objects (ids other than 0 and 255) tinted in their
    palette colours."""
    colours = np.zeros((256, 3), np.float32)
    given = np.asarray(palette[:768], np.float32).reshape(-1, 3)
    colours[:len(given)] = given
    on = (label != 0) & (label != 255)
    out = frame.astype(np.float32)
    out[on] = (1 - alpha) * out[on] + alpha * colours[label[on]]
    return out.round().clip(0, 255).astype(np.uint8)


def write_overlay(path: str, images: Iterable[np.ndarray], fps: Fraction) -> int:
    """Writes uint8 RGB frames as ``path`` (.gif or .mp4), atomically; returns the number of frames.

    MP4: H.264 (libx264, else MPEG-4 part 2 where FFmpeg lacks it), yuv420p, frames streamed to the
    encoder; odd sizes get the last column / row repeated (yuv420p needs even ones). GIF: Pillow writes
    the file at the end, so every frame is held, as a palette image scaled to at most ``GIF_MAX_SIDE``
    pixels on its longer side (about 130 KB a 16:9 frame: prefer MP4 for long videos); Pillow merges a
    frame identical to the one before into it (its duration added).
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in OVERLAY_SUFFIXES:
        raise ValueError(f"{path}: overlay must be one of {', '.join(OVERLAY_SUFFIXES)}")
    with fileio.atomic_file(path) as tmp:
        return (_write_gif if suffix == ".gif" else _write_mp4)(tmp, iter(images), fps)


def _write_gif(path: str, images, fps: Fraction) -> int:
    count = 0

    def scaled():
        nonlocal count
        for image in images:
            im = Image.fromarray(image)
            im.thumbnail((GIF_MAX_SIDE, GIF_MAX_SIDE), Image.Resampling.BILINEAR)
            count += 1
            yield im

    frames = scaled()
    first = next(frames)
    first.save(path, format="GIF", save_all=True, append_images=frames, duration=round(1000 / fps), loop=0)
    return count


def _write_mp4(path: str, images, fps: Fraction) -> int:
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    count = 0
    with av.open(path, "w", format="mp4") as container:
        stream = None
        for image in images:
            h, w = image.shape[:2]
            image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            if stream is None:
                stream = container.add_stream(codec, rate=fps, options={"crf": "20"} if codec == "libx264" else {})
                stream.height, stream.width = image.shape[:2]
                stream.pix_fmt = "yuv420p"
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            count += 1
        if stream is not None:
            container.mux(stream.encode(None))
    return count
