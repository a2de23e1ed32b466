"""Video training config: ``--config=configs/video.py:<variant>``.

Variants: ``demo`` (generated videos, small, runs anywhere) and one per real dataset format:
``davis`` (also MOSE), ``sav``, ``ytvis`` (also SA-Co video), ``coco``. The data part lives in
`sam3_jax.data.config`; override any field on the command line, e.g.
``--config.data.sources.davis.image_dir=/data/DAVIS/JPEGImages/480p``.
"""
from __future__ import annotations

import ml_collections

from sam3_jax.data import config as data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data_config.get_config(arg or "demo")
    return c
