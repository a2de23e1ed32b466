"""The batch contract between the data pipeline and the model/losses.

One example is a clip of ``T`` frames from one video (an image is a 1-frame clip). Every array has a
static shape set by `Dims`, so a batch can cross ``jit`` unchanged; whatever a clip has fewer of
(frames, objects, phrases) is padded with the value listed in `FIELDS` and flagged by a validity
mask. A batch is the same dict with a leading batch axis ``B`` on every key.

Symbols: ``T`` frames, ``N`` objects, ``P`` noun phrases, ``S`` image side, ``M`` mask side,
``L`` text context length (32, CLIP BPE).

* Frames are RGB ``uint8``; normalisation (mean 0.5, std 0.5) belongs to the model.
* Ground-truth masks are binary at ``M x M`` (default ``M = S``: SAM2's losses compare upsampled
  logits with full-resolution masks). They cover the same field of view as the frames, so a mask
  pixel ``(i, j)`` is the frame region ``[i*S/M, (i+1)*S/M)``. They travel bit-packed, eight
  pixels of a row to a byte (``np.packbits`` along x, so ``M`` is a multiple of 8): at ``M = 1008``
  bool masks would be as many bytes as the frames, and every byte is paid for in the worker's
  shared memory and the host-to-device copy. `unpack_masks` (numpy or ``jax.numpy``, so on device
  inside the step) gives the bool ``[..., M, M]``.
* Objects are the clip's masklets: slot ``n`` is the same object in every frame. ``object_valid``
  is exactly "the mask is non-empty", so an object that leaves the frame (or is cropped away by
  augmentation) is invalid in that frame, never dropped; its box is then all zeros.
* Boxes are ``(cx, cy, w, h)`` normalised to ``[0, 1]`` and computed from the masks after every
  geometric transform.
* Noun phrases are per clip. ``phrase_ids`` index the source's phrase vocabulary
  (``dataset_index`` says which source), so no Python string travels in a batch.
  ``phrase_tokens`` are the CLIP token ids of that phrase, zero-padded; ``phrase_token_valid`` is
  True on real tokens (the reference's ``language_mask`` is its negation).
* Detection queries: one per (frame, phrase). ``query_positives[t, p, n]`` says object ``n`` is an
  instance of phrase ``p`` visible in frame ``t``; a phrase with no positive in a frame is a
  negative query for that frame. ``query_exhaustive[t, p]`` is True when every instance of the
  phrase in that frame is among the positives (so unmatched predictions may be penalised); it is
  False when the source is not exhaustively annotated or some instance did not fit in ``N``.
  A query is real iff ``frame_valid[t] & phrase_valid[p]``.
* Clips shorter than ``T`` (short videos, images) are padded at the end: ``frame_valid`` False,
  zero pixels, no valid objects or queries.
* ``skipped`` counts the bad samples the worker skipped before producing this one (config
  ``on_error="skip"``); it travels in the batch so the count survives multiprocess workers. The
  trainer sums it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dims:
    """The static maxima every example is padded to."""

    num_frames: int  # T
    max_objects: int  # N
    max_phrases: int  # P
    image_size: int  # S
    mask_size: int  # M
    context_length: int = 32  # L

    @classmethod
    def from_config(cls, data_cfg: Any) -> Dims:
        return cls(
            num_frames=data_cfg.num_frames,
            max_objects=data_cfg.max_objects,
            max_phrases=data_cfg.max_phrases,
            image_size=data_cfg.image_size,
            mask_size=data_cfg.mask_size,
            context_length=data_cfg.context_length,
        )

    def __post_init__(self):
        if self.mask_size % 8:
            raise ValueError(f"data.mask_size={self.mask_size} must be a multiple of 8: masks are "
                             "bit-packed, 8 pixels of a row to a byte")

    def resolve(self, symbols: tuple[str | int, ...]) -> tuple[int, ...]:
        table = {"T": self.num_frames, "N": self.max_objects, "P": self.max_phrases,
                 "S": self.image_size, "M": self.mask_size, "M/8": self.mask_size // 8,
                 "L": self.context_length}
        return tuple(table[s] if isinstance(s, str) else s for s in symbols)


@dataclasses.dataclass(frozen=True)
class Field:
    shape: tuple[str | int, ...]
    dtype: np.dtype
    pad: Any
    doc: str


_B, _I, _U8, _F = np.dtype(bool), np.dtype(np.int32), np.dtype(np.uint8), np.dtype(np.float32)

FIELDS: dict[str, Field] = {
    "frames": Field(("T", "S", "S", 3), _U8, 0, "RGB frames, identical augmentation per clip"),
    "frame_valid": Field(("T",), _B, False, "False for padding frames past the clip's end"),
    "frame_indices": Field(("T",), _I, -1, "frame number in the source video"),
    "masks": Field(("T", "N", "M", "M/8"), _U8, 0, "per-object binary mask, bit-packed along x"),
    "boxes": Field(("T", "N", 4), _F, 0.0, "cxcywh in [0, 1] from the mask; 0 when invalid"),
    "object_valid": Field(("T", "N"), _B, False, "object visible (mask non-empty) in the frame"),
    "object_ids": Field(("N",), _I, -1, "object id in the source annotation"),
    "phrase_ids": Field(("P",), _I, -1, "index into the source's phrase vocabulary"),
    "phrase_tokens": Field(("P", "L"), _I, 0, "CLIP BPE token ids, zero-padded"),
    "phrase_token_valid": Field(("P", "L"), _B, False, "True on real (non-pad) tokens"),
    "phrase_valid": Field(("P",), _B, False, "phrase slot in use"),
    "query_positives": Field(("T", "P", "N"), _B, False, "object n answers phrase p in frame t"),
    "query_exhaustive": Field(("T", "P"), _B, False, "all instances of p in frame t are positives"),
    "dataset_index": Field((), _I, -1, "which configured source the clip came from"),
    "video_index": Field((), _I, -1, "video index within that source"),
    "source_size": Field((2,), _I, 0, "(height, width) of the source frames"),
    "skipped": Field((), _I, 0, "bad samples skipped before this one"),
}


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """bool [..., M, M] -> uint8 [..., M, M/8] (the ``masks`` field's layout)."""
    return np.packbits(masks, axis=-1)


def unpack_masks(packed, xp=np):
    """The ``masks`` field, uint8 [..., M, M/8] -> bool [..., M, M]. ``xp=jax.numpy`` unpacks on
    device (traceable), after the packed bytes have crossed to it."""
    return xp.unpackbits(packed, axis=-1).astype(bool)


def empty_example(dims: Dims) -> dict[str, np.ndarray]:
    """An all-padding example: the starting point every sample is written into."""
    out = {}
    for name, f in FIELDS.items():
        shape = dims.resolve(f.shape)  # np.zeros for zero pads: lazily zeroed pages are cheaper
        out[name] = np.zeros(shape, f.dtype) if f.pad == 0 else np.full(shape, f.pad, f.dtype)
    return out


def validate(batch: Mapping[str, Any], dims: Dims, batched: bool = True) -> None:
    """Raises ValueError naming the first key that breaks the contract (keys, shapes, dtypes,
    padding and validity rules)."""
    missing, extra = FIELDS.keys() - batch.keys(), batch.keys() - FIELDS.keys()
    if missing or extra:
        raise ValueError(f"batch keys: missing {sorted(missing)}, unexpected {sorted(extra)}")
    lead = None
    for name, f in FIELDS.items():
        value = np.asarray(batch[name])
        if value.dtype != f.dtype:
            raise ValueError(f"batch key {name!r}: dtype {value.dtype}, expected {f.dtype}")
        want = dims.resolve(f.shape)
        got = value.shape[1:] if batched else value.shape
        if batched:
            if value.ndim == 0 or (lead is not None and value.shape[0] != lead):
                raise ValueError(f"batch key {name!r}: shape {value.shape} lacks batch axis {lead}")
            lead = value.shape[0]
        if got != want:
            raise ValueError(f"batch key {name!r}: shape {value.shape}, expected "
                             f"{('B',) + want if batched else want}")
    b = {k: np.asarray(v) if batched else np.asarray(v)[None] for k, v in batch.items()}
    _check_rules(b)


def _check_rules(b: dict[str, np.ndarray]) -> None:
    def require(ok: Any, name: str, rule: str) -> None:
        if not np.all(ok):
            raise ValueError(f"batch key {name!r}: violates '{rule}'")

    frame_valid, object_valid, phrase_valid = b["frame_valid"], b["object_valid"], b["phrase_valid"]
    require(b["masks"].any(axis=(-1, -2)) == object_valid, "object_valid",  # packed: any byte
            "object_valid == mask non-empty")
    require(~object_valid | frame_valid[:, :, None], "object_valid", "only on valid frames")
    require(~object_valid | (b["object_ids"] >= 0)[:, None, :], "object_ids",
            "valid objects have an id >= 0")
    require(frame_valid[..., None, None, None] | (b["frames"] == 0), "frames",
            "padding frames are zero")
    boxes = b["boxes"]
    require((boxes >= 0) & (boxes <= 1), "boxes", "0 <= box <= 1")
    require(object_valid[..., None] | (boxes == 0), "boxes", "zero when the object is invalid")
    require(phrase_valid == (b["phrase_ids"] >= 0), "phrase_valid", "phrase_valid == id >= 0")
    require(b["phrase_token_valid"] == (b["phrase_tokens"] != 0), "phrase_token_valid",
            "True exactly on non-zero tokens")
    require(b["phrase_token_valid"].any(-1) == phrase_valid, "phrase_tokens",
            "valid phrases have tokens, padding phrases none")
    query = frame_valid[:, :, None] & phrase_valid[:, None, :]
    require(~b["query_positives"] | (query[..., None] & object_valid[:, :, None, :]),
            "query_positives", "positives are valid objects of valid queries")
    require(~b["query_exhaustive"] | query, "query_exhaustive", "only on valid queries")
    require(b["skipped"] >= 0, "skipped", "non-negative")
