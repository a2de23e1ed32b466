"""Readers of the on-disk dataset formats, and `build` to make one from its config."""
from __future__ import annotations

from typing import Any

from sam3_jax.data.sources.base import Source
from sam3_jax.data.sources.davis import DavisSource
from sam3_jax.data.sources.json_video import coco_source, ytvis_source
from sam3_jax.data.sources.sav import SavSource

KINDS = ("davis", "sav", "ytvis", "coco")


def build(cfg: Any, strict: bool) -> Source:
    """A source from its config (see `sam3_jax.data.config.source_config` for the fields)."""
    if cfg.kind == "davis":
        return DavisSource(cfg.image_dir, cfg.annotations, cfg.file_list, cfg.phrase,
                           cfg.exhaustive)
    if cfg.kind == "sav":
        return SavSource(cfg.image_dir, cfg.annotations, cfg.file_list, cfg.annotation_stride,
                         cfg.phrase, cfg.exhaustive)
    if cfg.kind == "ytvis":
        return ytvis_source(cfg.image_dir, cfg.annotations, cfg.file_list, cfg.exhaustive, strict)
    if cfg.kind == "coco":
        return coco_source(cfg.image_dir, cfg.annotations, cfg.exhaustive, strict)
    raise ValueError(f"unknown source kind {cfg.kind!r}; expected one of {KINDS}")
