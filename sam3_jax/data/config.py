"""Data config: defaults (SAM2/SAM3 training recipes) and the variants `configs/video.py` picks.

Every field is overridable from the command line, e.g. ``--config.data.image_size=512`` or
``--config.data.sources.davis.image_dir=/data/DAVIS/JPEGImages/480p``.
"""
from __future__ import annotations

import os
import tempfile

import ml_collections

Path = str | ml_collections.FieldReference  # a reference keeps a path tied to another field
DEMO_DIR = os.path.join(tempfile.gettempdir(), "sam3_jax_demo_data")


def source_config(kind: str, image_dir: Path, annotations: Path, *, file_list: Path = "",
                  phrase: str = "", exhaustive: bool = False, weight: float = 1.0,
                  annotation_stride: int = 4) -> ml_collections.ConfigDict:
    """One dataset. Every kind has the same fields; each reader uses the ones it needs.

    annotations: directory (davis: palette PNGs, sav: *_manual.json) or JSON file (ytvis, coco).
    file_list: optional text file of video names to use (davis, sav, ytvis).
    phrase: the noun phrase of every object of a class-agnostic source (davis, sav); "" = none.
    exhaustive: all instances of a phrase are annotated (enables negatives' classification loss).
    weight: mixing weight among the configured sources.
    annotation_stride: sav only, frame numbers between annotated frames.
    """
    return ml_collections.ConfigDict(dict(
        kind=kind, image_dir=image_dir, annotations=annotations, file_list=file_list,
        phrase=phrase, exhaustive=exhaustive, weight=weight, annotation_stride=annotation_stride))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Static maxima of the batch (schema.Dims).
    c.image_size = 1008  # S
    # M: ground-truth masks at full resolution unless set (a derived reference: one-way link);
    # a multiple of 8, since masks travel bit-packed (schema.py).
    c.mask_size = c.get_ref("image_size") * 1
    c.num_frames = 8  # T (SAM2 tracker recipe)
    c.max_objects = 3  # N (SAM2: up to 3 objects visible in the first frame)
    c.max_phrases = 4  # P
    c.context_length = 32  # CLIP text context
    c.batch_size = 1  # per host

    # Loader.
    c.num_workers = 2  # grain mp_prefetch processes (0: in the main process)
    c.worker_buffer_size = 2  # batches buffered per worker
    c.num_threads = 1  # reader threads per process; PIL releases the GIL, but cores are few
    c.prefetch_buffer_size = 2  # examples read ahead per process (each is ~T*S*S*4 bytes)
    c.on_error = "skip"  # bad input: "raise" a DataError, or "skip" it and count in `skipped`
    c.max_retries = 16  # consecutive bad samples tolerated before giving up

    c.sampling = ml_collections.ConfigDict(dict(
        stride_min=1, stride_max=5, reverse_prob=0.5,  # SAM3 VideoGroundingDataset
        first_frame_objects=True,  # SAM2: objects must be visible in the first frame
        window_tries=5,  # windows tried before a video counts as having no usable object
    ))
    c.augment = ml_collections.ConfigDict(dict(  # SAM2 MOSE fine-tuning transforms
        enabled=True,
        hflip_prob=0.5, degrees=25.0, shear=20.0, scale_min=1.0, scale_max=1.0,
        affine_tries=3,  # affine draws tried to keep first-frame objects visible
        fill=(123, 116, 103),  # outside the warped image (SAM2's image mean)
        brightness=0.1, contrast=0.03, saturation=0.03,  # per clip
        grayscale_prob=0.05,
        frame_brightness=0.1, frame_contrast=0.05, frame_saturation=0.05,  # per frame
    ))
    c.sources = ml_collections.ConfigDict()  # name -> source_config(...)
    # When output_dir is set, the generated dataset is written there first if absent.
    c.synthetic = ml_collections.ConfigDict(dict(
        output_dir="", num_videos=24, num_frames=16, size=160, seed=0))
    return c


def demo_config(root: str = DEMO_DIR) -> ml_collections.ConfigDict:
    """Small clips of the generated dataset (written to `root` on first use), YouTube-VIS layout
    so that objects have phrases; its annotations are complete, hence exhaustive. The source's
    paths follow ``synthetic.output_dir``, so overriding that one field moves everything."""
    c = base_config()
    c.image_size, c.num_frames, c.max_objects, c.max_phrases = 128, 4, 3, 4
    c.batch_size, c.num_workers = 2, 0
    c.synthetic.output_dir = root
    out = c.synthetic.get_ref("output_dir")
    c.sources.demo = source_config(
        "ytvis", out + "/ytvis/JPEGImages", out + "/ytvis/annotations.json",
        file_list=out + "/davis/ImageSets/train.txt", exhaustive=True)
    return c


def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
    """variant: demo (generated videos, small sizes) or one real format: davis, sav, ytvis, coco.
    Real variants point at conventional paths under ./data; override them on the command line."""
    if variant == "demo":
        return demo_config()
    c = base_config()
    if variant == "davis":  # also MOSE (same layout)
        c.sources.davis = source_config(
            "davis", "data/DAVIS/JPEGImages/480p", "data/DAVIS/Annotations/480p",
            file_list="data/DAVIS/ImageSets/2017/train.txt", phrase="object")
    elif variant == "sav":
        c.sources.sav = source_config("sav", "data/sav_train/JPEGImages_24fps",
                                      "data/sav_train/sav_train", phrase="object")
    elif variant == "ytvis":
        c.sources.ytvis = source_config("ytvis", "data/ytvis/train/JPEGImages",
                                        "data/ytvis/train/instances.json")
    elif variant == "coco":
        c.num_frames = 1
        c.sources.coco = source_config("coco", "data/coco/train2017",
                                       "data/coco/annotations/instances_train2017.json",
                                       exhaustive=True)
    else:
        raise ValueError(f"unknown data variant {variant!r}: demo, davis, sav, ytvis or coco")
    return c
