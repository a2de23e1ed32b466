"""Image fine-tuning: ``python train.py --config=configs/image.py[:variant] --workdir=DIR``.

The video trainer on 1-frame clips (the detector alone), as the reference fine-tunes SAM 3 on
COCO-format image datasets. Variants: ``coco`` (default; point it at your data with
``--config.data.sources.coco.image_dir=... --config.data.sources.coco.annotations=...``) and
``demo`` (frames of the generated videos as images, small model, CPU).
"""
from sam3_jax.train import config


def get_config(arg: str | None = None):
    return config.image_config(arg or "coco")
