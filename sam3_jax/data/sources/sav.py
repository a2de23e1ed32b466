"""SA-V layout: extracted frames <image_dir>/<video>/<number>.jpg and one
<annotation_dir>/<video>_manual.json per video whose "masklet" list holds, for every annotated
frame, one RLE (or null) per object. Annotated frame k is frame number k * annotation_stride
(SA-V: frames at 24 fps, masks at 6 fps, stride 4); only annotated frames are used."""
from __future__ import annotations

import functools
import os

from sam3_jax.data.errors import DataError
from sam3_jax.data.sources.base import ClassAgnosticSource, Video, read_json
from sam3_jax.data.sources.davis import JPEG_SUFFIXES
from sam3_jax.data.sources.rle import RleAnnotation


class SavSource(ClassAgnosticSource):
    """Class-agnostic like DAVIS: objects get `phrase` or none."""

    def __init__(self, image_dir: str, annotation_dir: str, file_list: str = "",
                 annotation_stride: int = 4, phrase: str = "object", exhaustive: bool = False):
        super().__init__(image_dir, annotation_dir, file_list, phrase, exhaustive)
        self.stride = annotation_stride

    def video(self, index: int) -> Video:
        name = self.names[index]
        path = os.path.join(self.annotation_dir, f"{name}_manual.json")
        data = read_json(path)
        header = data if isinstance(data, dict) else {}  # SAM2 also accepts a bare list
        masklets = header.get("masklet", header.get("masks")) if header else data
        if not isinstance(masklets, list):
            raise DataError(path, "masklet", "missing or not a list")
        num_objects = len(masklets[0]) if masklets else 0
        for k, frame in enumerate(masklets):
            if not isinstance(frame, list) or len(frame) != num_objects:
                raise DataError(path, f"masklet[{k}]", f"expected a list of {num_objects} masks")
        ids = list(header.get("masklet_id") or range(num_objects))
        if len(ids) != num_objects:
            raise DataError(path, "masklet_id", f"{len(ids)} ids for {num_objects} masklets")
        frame_dir = os.path.join(self.image_dir, name)
        try:
            on_disk = {int(os.path.splitext(f)[0]): f for f in os.listdir(frame_dir)
                       if f.lower().endswith(JPEG_SUFFIXES) and f.split(".")[0].isdigit()}
        except OSError as e:
            raise DataError(frame_dir, "frames", f"cannot list frames: {e}") from e
        annotated = [k for k in range(len(masklets)) if k * self.stride in on_disk]
        if not annotated:
            raise DataError(path, "masklet", "empty video: no annotated frame has a JPEG")
        return Video(
            name=name,
            frame_paths=[os.path.join(frame_dir, on_disk[k * self.stride]) for k in annotated],
            frame_numbers=[k * self.stride for k in annotated],
            load_annotation=functools.partial(self._annotation, path, masklets, ids, annotated,
                                              _video_size(path, header, masklets)),
            default_phrase=self._phrase,
        )

    @staticmethod
    def _annotation(path, masklets, ids, annotated, size, position) -> RleAnnotation:
        k = annotated[position]
        segments = {int(i): m for i, m in zip(ids, masklets[k]) if m is not None}
        return RleAnnotation(path, f"masklet[{k}]", size, segments)


def _video_size(path: str, header: dict, masklets: list) -> tuple[int, int]:
    """(height, width) from the JSON header, else from the first mask."""
    if "video_height" in header and "video_width" in header:
        return int(header["video_height"]), int(header["video_width"])
    for frame in masklets:
        for m in frame:
            if isinstance(m, dict) and "size" in m:
                return tuple(m["size"])
    raise DataError(path, "masklet", "no mask and no video_height/video_width: size unknown")
