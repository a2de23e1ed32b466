"""The training config's sections and presets; ``configs/video.py`` and ``configs/image.py`` pick them.

Every field is overridable from the command line (``--config.optim.lr.rest=1e-4``). The data
section is `sam3_jax.data.config`'s; the model section is the whole `ModelConfig`.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from sam3_jax.data import config as data_config
from sam3_jax.model.config import ModelConfig
from sam3_jax.train import optim
from sam3_jax.train.losses.detector import DetectorLossConfig

VIDEO_VARIANTS = ("default", "demo", "davis", "sav", "ytvis", "coco")


def as_config(dataclass_value) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(dataclass_value))


def base_config(model: ModelConfig, data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 20_000
    c.log_every = 20
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.checkpoint_async = True  # write checkpoints in the background while training goes on
    c.init_from = ""  # a converted official checkpoint (convert_torch_ckpt.py) or a training run
    c.distributed = False  # jax.distributed.initialize() first (multi-host GPU nodes, TPU pods)
    c.nonfinite = "skip"  # NaN/Inf loss or gradients: "skip" the update (and count it) or "stop"
    c.max_consecutive_nonfinite = 10  # stop anyway after this many skipped updates in a row

    # Devices: clips over "data", the frames of each clip over "frame"; data=-1 takes the rest.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, frame=1))
    c.model = as_config(model)
    c.data = data
    c.data.image_size = model.image_size
    c.optim = optim.default_config()
    c.loss = as_config(DetectorLossConfig())
    # Held-out clips: losses and detection rates (sam3_jax.train.metrics) every `every` steps.
    c.eval = ml_collections.ConfigDict(dict(every=0, num_batches=4, overlay_score_threshold=0.5,
                                            sources=ml_collections.ConfigDict()))
    c.overlay_every = 0  # prediction overlays to TensorBoard at evaluations on these steps; 0: none
    return c


def demo_config() -> ml_collections.ConfigDict:
    """The tiny model on 4-frame clips of the generated videos, float32 on CPU."""
    c = base_config(ModelConfig.tiny(), data_config.get_config("demo"))
    c.total_steps, c.log_every, c.checkpoint_every = 150, 10, 50
    c.mesh.frame = 1
    c.optim.update(dict(lr=dict(vision=1e-3, text=1e-3, rest=1e-3), layer_decay=1.0, weight_decay=0.01,
                        schedule="cosine", warmup_steps=10, clip_norm=1.0))
    c.loss.pad_n_queries = None  # the tiny decoder has 16 queries, not the reference's 200
    c.eval.update(dict(every=50, num_batches=3))
    train = c.data.sources.demo
    c.eval.sources.demo = data_config.source_config(
        "ytvis", train.get_ref("image_dir"), train.get_ref("annotations"),
        file_list=c.data.synthetic.get_ref("output_dir") + "/davis/ImageSets/val.txt", exhaustive=True)
    c.overlay_every = 50
    return c


def video_config(variant: str = "default") -> ml_collections.ConfigDict:
    if variant == "demo":
        return demo_config()
    if variant not in VIDEO_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VIDEO_VARIANTS)}")
    model = ModelConfig.official().replace(compute_dtype="bfloat16")
    data = data_config.get_config("davis" if variant == "default" else variant)
    return base_config(model, data)


def image_config(variant: str = "coco") -> ml_collections.ConfigDict:
    """The same trainer on 1-frame clips (the detector alone), as the reference fine-tunes on images."""
    if variant not in ("coco", "demo"):
        raise ValueError(f"unknown variant {variant!r}; one of coco, demo")
    c = video_config(variant)
    c.data.num_frames = 1
    if variant == "demo":
        c.data.batch_size = 4
    c.mesh.frame = 1
    return c
