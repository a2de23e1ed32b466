"""Image fine-tuning: ``python train.py --config=configs/image.py[:variant] --workdir=DIR``.

The video trainer on 1-frame clips (the detector alone), as the reference fine-tunes SAM 3 on
COCO-format image datasets, with the recipe of ``configs/video.py``'s variant of the same name:
``coco`` (default: the reference's detector fine-tuning at official size; point it at your data with
``--config.data.sources.coco.image_dir=... --config.data.sources.coco.annotations=...``) and
``demo`` (frames of the generated videos as images, the tiny model, CPU).
"""
from sam3_jax.train import config


def get_config(arg: str | None = None):
    variant = arg or "coco"
    if variant not in config.IMAGE_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(config.IMAGE_VARIANTS)}")
    c = config.video_config(variant)
    c.data.num_frames = 1
    if variant == "demo":
        c.data.batch_size = 4
    c.mesh.frame = 1
    return c
