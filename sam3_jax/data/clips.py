"""One training example: a sampled clip from a source, augmented and written into the schema."""
from __future__ import annotations

import logging
import types
from typing import Any

import numpy as np

from sam3_jax.data import sampling, schema, transforms
from sam3_jax.data.errors import DataError
from sam3_jax.data.sources.base import Source, read_frame

log = logging.getLogger(__name__)


class ClipBuilder:
    """Grain `random_map` callable: (video index, rng) -> example dict (schema.FIELDS).

    Bad input raises `DataError`; with ``on_error="skip"`` the builder logs it, draws another video
    with the same rng (so the stream stays deterministic) and counts it in ``skipped``. After
    ``max_retries`` consecutive failures it raises, so a broken dataset stops the run instead of
    spinning forever.
    """

    def __init__(self, source: Source, data_cfg: Any, dataset_index: int, name: str = ""):
        self.source, self.dataset_index, self.name = source, dataset_index, name
        self.dims = schema.Dims.from_config(data_cfg)
        # Plain namespaces: cheap attribute access in workers, no ConfigDict locking semantics.
        self.sampling = types.SimpleNamespace(**data_cfg.sampling.to_dict())
        self.augment = types.SimpleNamespace(**data_cfg.augment.to_dict())
        self.on_error, self.max_retries = data_cfg.on_error, data_cfg.max_retries
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")
        self.tokens = source.vocabulary.tokens(self.dims.context_length)

    def __call__(self, video_index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        index, skipped = int(video_index), 0
        while True:
            try:
                example = self.build(index, rng)
            except DataError as e:
                if self.on_error == "raise":
                    raise
                skipped += 1
                log.warning("data: skipped %s video %d (%d in a row): %s", self.name, index,
                            skipped, e)
                if skipped > self.max_retries:
                    raise RuntimeError(f"data source {self.name!r}: {skipped} samples in a row "
                                       f"failed; last error: {e}") from e
                index = int(rng.integers(len(self.source)))
                continue
            example["skipped"][...] = skipped
            return example

    def build(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = self.dims
        video = self.source.video(index)
        plan = sampling.plan_clip(video, self.sampling, d.num_frames, d.max_objects, d.max_phrases,
                                  len(self.source.vocabulary), self.source.exhaustive, rng)
        self.source.vocabulary.check(plan.phrase_ids)
        paths = [video.frame_paths[p] for p in plan.positions]
        images = [read_frame(p) for p in paths]
        width, height = images[0].size
        for path, img in zip(paths, images):
            if img.size != (width, height):
                raise DataError(path, "size", f"{img.size} differs from {paths[0]}'s "
                                f"{(width, height)}")
        for ann in plan.annotations:
            if tuple(ann.size) != (height, width):
                raise DataError(ann.path, "size", f"mask size (h, w) {tuple(ann.size)} != frame "
                                f"size {(height, width)}")
        n = len(plan.object_ids)
        masks = _Masks(plan.annotations, plan.object_ids, d.mask_size)
        visible0 = set(plan.annotations[0].visible_ids())
        required = [k for k, i in enumerate(plan.object_ids) if i in visible0]
        geometry, warped0 = self._geometry(width, height, masks, required, rng)
        clip_ops = self._clip_colour(rng)

        ex = schema.empty_example(d)
        frame_masks = np.empty((n, d.mask_size, d.mask_size), bool)  # one frame's, reused
        for t, img in enumerate(images):
            transforms.warp_image(img, geometry, ex["frames"][t], tuple(self.augment.fill))
            transforms.apply_colour(ex["frames"][t], clip_ops + self._frame_colour(rng))
            masks.unpack(warped0 if t == 0 else masks.warp(t, geometry), frame_masks)
            ex["masks"][t, :n] = schema.pack_masks(frame_masks)
            ex["boxes"][t, :n], ex["object_valid"][t, :n] = transforms.boxes_from_masks(frame_masks)

        k, p = len(plan.positions), len(plan.phrase_ids)
        ex["frame_valid"][:k] = True
        ex["frame_indices"][:k] = [video.frame_numbers[i] for i in plan.positions]
        ex["object_ids"][:n] = plan.object_ids
        ex["phrase_ids"][:p] = plan.phrase_ids
        ex["phrase_tokens"][:p] = self.tokens[plan.phrase_ids]
        ex["phrase_token_valid"] = ex["phrase_tokens"] != 0
        ex["phrase_valid"][:p] = True
        ex["query_positives"][:k, :p, :n] = plan.positives & ex["object_valid"][:k, None, :n]
        ex["query_exhaustive"][:k, :p] = plan.exhaustive
        ex["dataset_index"][...] = self.dataset_index
        ex["video_index"][...] = index
        ex["source_size"][:] = (height, width)
        return ex

    def _geometry(self, width: int, height: int, masks: _Masks, required: list[int],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draws flip + affine until every object visible in the first frame stays visible
        (SAM2 retries the same way), falling back to flip + resize only; returns the matrix and
        the first frame's warped masks (`_Masks.warp`)."""
        aug = self.augment
        tries = aug.affine_tries if aug.enabled else 0
        for attempt in range(tries + 1):
            if aug.enabled:
                m = transforms.sample_geometry(aug, width, height, rng, attempt < tries)
            else:
                m = transforms.resize_matrix(width, height)
            warped = masks.warp(0, m)
            if masks.all_present(warped, required):
                break
        return m, warped

    def _clip_colour(self, rng: np.random.Generator) -> list[tuple[str, float]]:
        aug = self.augment
        if not aug.enabled:
            return []
        ops = transforms.sample_jitter(rng, aug.brightness, aug.contrast, aug.saturation)
        return ops + [("grayscale", 1.0)] if rng.random() < aug.grayscale_prob else ops

    def _frame_colour(self, rng: np.random.Generator) -> list[tuple[str, float]]:
        aug = self.augment
        if not aug.enabled:
            return []
        return transforms.sample_jitter(rng, aug.frame_brightness, aug.frame_contrast,
                                        aug.frame_saturation)


class _Masks:
    """The chosen objects' masks of a clip, warped frame by frame: as the frames' maps of ids when
    every annotation has one (FrameAnnotation.label_map), else as bit planes. Same result."""

    def __init__(self, annotations: list, object_ids: list[int], size: int):
        self.ids, self.size = object_ids, size
        labels = [a.label_map() for a in annotations]
        self.labels = labels if all(x is not None for x in labels) else None
        self.planes = None if self.labels else [a.bit_planes(object_ids) for a in annotations]

    def warp(self, t: int, geometry: np.ndarray) -> np.ndarray:
        if self.labels:
            return transforms.warp_labels(self.labels[t], geometry, self.size)
        return transforms.warp_planes(self.planes[t], geometry, self.size)

    def all_present(self, warped: np.ndarray, objects: list[int]) -> bool:
        """Whether each of `objects` (indices into object_ids) has a pixel in `warped`."""
        if self.labels:
            return all((warped == self.ids[k]).any() for k in objects)
        return all((warped[k // 8] >> (k % 8) & 1).any() for k in objects)

    def unpack(self, warped: np.ndarray, out: np.ndarray) -> None:
        if self.labels:
            transforms.masks_from_labels(warped, self.ids, out)
        else:
            transforms.masks_from_planes(warped, out)
