"""The training config's sections, their fields and defaults; the recipes are in ``configs/*.py``.

`base_config` builds every section (each field with its default: the optimiser's are
`optim.default_config`'s, the losses' their dataclasses'); ``configs/video.py`` and
``configs/image.py`` write each variant's recipe over it (model, data, steps, parameter groups and
their lrs, schedule, loss weights, freezing). Every field is overridable from the command line
(``--config.optim.lr.vision=1e-5``). The data section is `sam3_jax.data.config`'s; the model
section is the whole `ModelConfig`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.train import optim
from sam3_jax.train.losses.detector import DetectorLossConfig
from sam3_jax.train.losses.tracker import TrackerLossConfig
from sam3_jax.train.tracker_prompts import PromptConfig

VIDEO_VARIANTS = ("default", "demo", "davis", "sav", "ytvis", "coco", "tracker", "joint", "tracker_demo")
IMAGE_VARIANTS = ("coco", "demo")
# What a run trains: the detector's losses, the tracker's, or both on the same clips (one backbone pass).
MODES = ("detector", "tracker", "joint")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def as_config(dataclass_value) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(dataclass_value))


def official_model() -> ModelConfig:
    """The official size as the trainer runs it: bf16 compute."""
    return ModelConfig.official().replace(compute_dtype="bfloat16")


def base_config(model: ModelConfig, data: ml_collections.ConfigDict,
                tracker: TrackerConfig | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 20_000
    c.log_every = 20
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.checkpoint_async = True  # write checkpoints in the background while training goes on
    c.init_from = ""  # a converted official checkpoint (convert_torch_ckpt.py) or a training run
    c.distributed = False  # jax.distributed.initialize() first (multi-host GPU nodes, TPU pods)
    # Where jax cannot detect the cluster (SLURM, TPU pods, Open MPI and Kubernetes it can): the
    # coordinator's host:port, the number of processes and this one's index (0 and -1: detect).
    c.cluster = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    c.nonfinite = "skip"  # NaN/Inf loss or gradients: "skip" the update (and count it) or "stop"
    c.max_consecutive_nonfinite = 10  # stop anyway after this many skipped updates in a row
    # jax's persistent compilation cache: the compiled steps are written here and read back by any
    # later run of the same programs (a resume, a restarted job, the same config on another
    # workdir), which then skips XLA's compile, minutes at official size. Trusted storage only
    # (jax runs what it finds there). "" leaves jax's own setting (JAX_COMPILATION_CACHE_DIR).
    c.compilation_cache_dir = ""

    # Devices: clips over "data", the frames of each clip over "frame"; a -1 (on one of them) takes
    # as many as fit and split the batch (data) or the frames (frame) evenly (train/mesh_plan.py).
    # shard_params: parameters and optimiser state sharded over every device (FSDP; see
    # sam3_jax.train.sharding) instead of a whole copy on each: for models that do not fit otherwise.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, frame=1, shard_params=False))
    c.mode = "detector"  # one of MODES
    c.model = as_config(model)
    # The tracker (modes "tracker" and "joint"): its sizes, SAM 2's prompt simulation and losses.
    tracker = tracker or TrackerConfig.official()
    c.tracker = ml_collections.ConfigDict(dict(
        model=dataclasses.asdict(tracker.replace(image_size=model.image_size)),
        prompts=dataclasses.asdict(PromptConfig()), loss=dataclasses.asdict(TrackerLossConfig())))
    c.data = data
    c.data.image_size = model.image_size
    c.optim = optim.default_config()
    c.loss = as_config(DetectorLossConfig())
    # Held-out clips every `every` steps: losses, detection rates and COCO AP (sam3_jax.train.metrics)
    # and, when the tracker trains, J&F of the semi-supervised protocol (GT mask on frame 0); written
    # as val_<name> to metrics.jsonl and TensorBoard.
    #   coco_max_detections: COCO box and mask AP (val_box_ap, val_box_ap50, val_mask_ap,
    #     val_mask_ap50) over each query's this-many best predictions (COCO counts 100 per image;
    #     at most the decoder's queries); 0 leaves AP out. Masks are compared at the batch's mask size
    #     M: the eval step returns queries x k x M^2 bytes of masks per batch (4x that while
    #     upsampling), so lower it for many frames at full size.
    #   keep_best: a val_* metric (e.g. "val_jf", "val_box_ap", "val_loss"): the checkpoint of the
    #     evaluated step that scored best on it so far is kept in checkpoints_best/ (one step, with
    #     its metric; step 0, the untrained model, is not offered). ""= none. Resuming still starts
    #     from the newest checkpoint in checkpoints/. keep_best_mode: "max" or "min" (e.g. for val_loss).
    #   jf_protocol: the tracker's J&F. "clips": num_batches batches of the eval pipeline's clips
    #     (data.num_frames frames, resized to the model's square input, masks at the batch's mask size)
    #     tracked by the training-time clip tracker, as val_j, val_f, val_jf: a quick proxy. "videos":
    #     every held-out video whole, tracked by the inference VideoPredictor from its first frame's
    #     ground-truth masks and scored at its own size with DAVIS's conventions, as val_video_j,
    #     val_video_f, val_video_jf: the figure predict_video + evaluate --metric=jf give for the
    #     step's checkpoint. Needs eval.sources of kind "davis" (train/video_eval.py).
    c.eval = ml_collections.ConfigDict(dict(every=0, num_batches=4, overlay_score_threshold=0.5,
                                            coco_max_detections=100, keep_best="", keep_best_mode="max",
                                            jf_protocol="clips", sources=ml_collections.ConfigDict()))
    c.overlay_every = 0  # prediction overlays to TensorBoard at evaluations on these steps; 0: none
    return c


def load(name: str, variant: str):
    """``get_config(variant)`` of ``configs/<name>.py``, as ``--config=configs/<name>.py:variant`` loads it."""
    spec = importlib.util.spec_from_file_location(f"sam3_jax_configs_{name}", os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def video_config(variant: str = "default") -> ml_collections.ConfigDict:
    return load("video", variant)


def image_config(variant: str = "coco") -> ml_collections.ConfigDict:
    return load("image", variant)


def tracker_demo_config() -> ml_collections.ConfigDict:
    return video_config("tracker_demo")
