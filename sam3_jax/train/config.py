"""The training config's sections and presets; ``configs/video.py`` and ``configs/image.py`` pick them.

Every field is overridable from the command line (``--config.optim.lr.rest=1e-4``). The data
section is `sam3_jax.data.config`'s; the model section is the whole `ModelConfig`.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from sam3_jax.data import config as data_config
from sam3_jax.model import stacking
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
# Tracker-only training of a model trained from scratch: the detector's own parts (text encoder,
# fusion encoder, decoder, heads, its neck) get no gradient and must not drift by weight decay.
DETECTOR_HEADS = r"^detector/(?!backbone/vision_backbone/(trunk|sam2_convs))"


def as_config(dataclass_value) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(dataclass_value))


def official_model() -> ModelConfig:
    """The official size as the trainer runs it: bf16 compute, and every layer stack (ViT, text
    encoder, fusion encoder) scanned, which XLA compiles far faster than unrolled layers
    (converted checkpoints store the layers unrolled; ``init_from`` stacks them)."""
    return stacking.set_scans(ModelConfig.official().replace(compute_dtype="bfloat16"), True)


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
    tracker = tracker or stacking.set_scans(TrackerConfig.official(), True)  # as official_model()
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


def demo_config() -> ml_collections.ConfigDict:
    """The tiny model trained from scratch on the generated videos, float32 on CPU, sized so that the
    held-out detection figures rise within minutes on two cores: many short steps (2-frame clips
    from 4 of the 72 training videos, at most 2 phrases a clip: the phrases cost more than the
    frames), no dropout and no augmentation (both slow a from-scratch model down), and a learning
    rate of 3e-4 (at 1e-3 the held-out box and mask AP rose slower)."""
    c = base_config(ModelConfig.tiny(), data_config.get_config("demo"), TrackerConfig.tiny())
    # The tiny model's activations are a few MB: recomputing them (remat) would only cost ~30% of
    # each step, steps the demo spends better on learning.
    for part in ("vit", "text", "encoder", "decoder"):
        c.model[part].remat = False
    for part in ("encoder", "decoder", "geometry"):
        c.model[part].dropout = 0.0
    c.tracker.model.remat = False
    c.data.update(dict(num_frames=2, batch_size=4, max_phrases=2))
    c.data.augment.enabled = False
    c.data.synthetic.num_videos = 96  # 72 to train on, 24 held out
    c.total_steps, c.log_every, c.checkpoint_every = 2400, 50, 400
    c.mesh.frame = 1
    c.optim.update(dict(lr=dict(vision=3e-4, text=3e-4, rest=3e-4), layer_decay=1.0, weight_decay=0.01,
                        schedule="cosine", warmup_steps=10, clip_norm=1.0))
    c.loss.pad_n_queries = None  # the tiny decoder has 16 queries, not the reference's 200
    c.eval.update(dict(every=400, num_batches=6))  # 24 held-out clips, 96 (frame, phrase) queries
    train = c.data.sources.demo
    c.eval.sources.demo = data_config.source_config(
        "ytvis", train.get_ref("image_dir"), train.get_ref("annotations"),
        file_list=c.data.synthetic.get_ref("output_dir") + "/davis/ImageSets/val.txt", exhaustive=True)
    c.overlay_every = 400
    return c


def tracker_demo_config() -> ml_collections.ConfigDict:
    """The demo's tiny model and videos, training the tracker (and the backbone it reads) alone;
    evaluated by J&F on the held-out videos. On frames without clicks the tracker outputs the
    multimask output its IoU head rates best. From scratch that head learns slower than the masks:
    at the recipe's IoU weight (1) it still picked a whole-frame mask for every object after 300
    steps (held-out J 0.005), while the best of the three overlapped the object at IoU 0.41 on
    average (one held-out batch, 5 objects x 3 frames). The demo weights the IoU term 10x so that
    the choice is learnt within its steps (J 0.24 after 300). It keeps its own clips (4 frames, the
    tracker's J&F needs 3), batch, augmentation and learning rate rather than the detector demo's."""
    c = demo_config()
    c.mode = "tracker"
    c.optim.freeze = DETECTOR_HEADS
    c.tracker.loss.weight_iou = 10.0
    c.data.update(dict(num_frames=4, batch_size=2, max_phrases=4))
    c.data.augment.enabled = True
    c.optim.lr.update(dict(vision=1e-3, text=1e-3, rest=1e-3))
    c.total_steps, c.log_every, c.checkpoint_every = 300, 10, 100
    # J&F as predict_video + evaluate --metric=jf give it, on every held-out video whole (DAVIS layout);
    # with jf_protocol="clips", 12 clips: J&F of a few objects is noisy.
    c.eval.update(dict(every=100, num_batches=6, jf_protocol="videos"))
    davis = c.data.synthetic.get_ref("output_dir") + "/davis"
    c.eval.sources.demo = data_config.source_config("davis", davis + "/JPEGImages", davis + "/Annotations",
                                                    file_list=davis + "/ImageSets/val.txt")
    return c


def tracker_config(mode: str) -> ml_collections.ConfigDict:
    """SAM 3's stage 4 (``tracker``: backbone and detector frozen) or both models at once (``joint``),
    at official size on 8-frame DAVIS/MOSE-style clips with up to 3 objects; the tracker's optimiser
    is SAM 2's MOSE fine-tune (SAM3_SPEC §5.4). Longer clips: ``--config.data.num_frames=16`` and
    ``--config.optim.lr.rest=5e-7`` (the paper's 0.1x). ``mesh.frame`` must divide ``data.max_objects``."""
    c = base_config(official_model(), data_config.get_config("davis"))
    c.mode = mode
    if mode == "tracker":
        c.optim.update(dict(lr=dict(vision=3e-6, text=3e-6, rest=5e-6), weight_decay=0.1, layer_decay=0.9,
                            schedule="cosine", warmup_steps=0, final_lr_fraction=0.1, clip_norm=0.1,
                            freeze="^detector/"))
    return c


def video_config(variant: str = "default") -> ml_collections.ConfigDict:
    if variant == "demo":
        return demo_config()
    if variant == "tracker_demo":
        return tracker_demo_config()
    if variant in ("tracker", "joint"):
        return tracker_config(variant)
    if variant not in VIDEO_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VIDEO_VARIANTS)}")
    model = official_model()
    data = data_config.get_config("davis" if variant == "default" else variant)
    return base_config(model, data)


def image_config(variant: str = "coco") -> ml_collections.ConfigDict:
    """The same trainer on 1-frame clips (the detector alone), as the reference fine-tunes on images."""
    if variant not in IMAGE_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(IMAGE_VARIANTS)}")
    c = video_config(variant)
    c.data.num_frames = 1
    if variant == "demo":
        c.data.batch_size = 4
    c.mesh.frame = 1
    return c
