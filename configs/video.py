"""Video training: ``python train.py --config=configs/video.py[:variant] --workdir=DIR``.

Each variant's whole recipe is written here: model, data, steps, the optimiser (parameter groups,
each group's peak lr and weight decay, schedule, layer decay, clipping, what is frozen) and the
loss weights. `sam3_jax.train.config` builds the sections (every field and its default). Variants:

* ``default``: the official SAM 3 size with the reference's detector fine-tuning recipe on
  SAM2-style video clips (DAVIS layout).
* one per real dataset format, same recipe: ``davis`` (also MOSE), ``sav``, ``ytvis`` (also SA-Co
  video), ``coco`` (images as 1-frame clips). Point them at your data on the command line, e.g.
  ``--config.data.sources.davis.image_dir=/data/DAVIS/JPEGImages/480p``.
* ``tracker`` (SAM 3's stage 4: the tracker alone) and ``joint`` (detector and tracker together).
* ``demo`` and ``tracker_demo``: a tiny model on generated videos (written on first use) that
  trains on a laptop CPU in minutes; ``demo`` is the README's main command.

Parameter groups are ``optim.groups``, ``(name, regex)`` rules in match order: a parameter (its
'/'-joined path, e.g. ``detector/backbone/vision_backbone/trunk/block_groups/blocks_3/attn/qkv/kernel``) belongs
to the first rule whose regex it matches, and the last rule, ``rest``, matches everything. Each
group's peak lr is ``optim.lr.<name>`` and its decoupled weight decay ``optim.weight_decay.<name>``;
the ViT trunk's layer-wise lr decay (``optim.layer_decay``) multiplies its group's lr. Every field
can be overridden, e.g. ``--config.optim.lr.vision=1e-5 --config.optim.weight_decay.rest=0.05
--config.mesh.frame=8``; an unknown field is an error that lists the valid ones.
"""
from sam3_jax.data import config as data_config
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.train import config as config_lib

# The reference's parameter groups, in match order.
GROUPS = (("vision", r"^(detector/)?backbone/vision_backbone/"),
          ("text", r"^(detector/)?backbone/language_backbone/"),
          ("rest", r".*"))  # the fusion encoder, decoder and heads, and every tracker parameter
# Tracker-only training of a model trained from scratch: the detector's own parts (text encoder,
# fusion encoder, decoder, heads, its neck) get no gradient and must not drift by weight decay.
DETECTOR_HEADS = r"^detector/(?!backbone/vision_backbone/(trunk|sam2_convs))"


def per_group(vision: float, text: float, rest: float) -> dict:
    return dict(vision=vision, text=text, rest=rest)


def detector_finetune(c):
    """The reference's detector fine-tuning (its roboflow / odinw configs): lrs 2.5e-4 / 5e-5 / 8e-4
    times its lr_scale 0.1, weight decay 0.1 (biases and LayerNorm weights exempt), layer decay 0.9
    over the ViT trunk (pos_embed exempt), inverse square-root schedule, clipping at 0.1, and its
    loss weights; the tracker's loss weights are SAM 2's (``MultiStepMultiMasksAndIous``)."""
    c.total_steps = 20_000
    c.optim.update(dict(groups=GROUPS, lr=per_group(2.5e-5, 5e-6, 8e-5), weight_decay=per_group(0.1, 0.1, 0.1),
                        layer_decay=0.9, layer_decay_exempt="pos_embed", schedule="inverse_sqrt",
                        warmup_steps=20, cooldown_steps=20, timescale=20, clip_norm=0.1, accumulate_steps=1,
                        freeze=""))
    c.loss.update(dict(loss_ce=20.0, presence_loss=20.0, loss_bbox=5.0, loss_giou=2.0, loss_mask=200.0,
                       loss_dice=10.0, o2m_weight=2.0))
    c.tracker.loss.update(dict(weight_mask=20.0, weight_dice=1.0, weight_iou=1.0, weight_class=1.0))
    return c


def official(data: str, mode: str = "detector"):
    c = config_lib.base_config(config_lib.official_model(), data_config.get_config(data))
    c.mode = mode
    return detector_finetune(c)


def tracker(mode: str):
    """SAM 3's stage 4 (``tracker``: backbone and detector frozen) or both models at once (``joint``,
    the detector's recipe), at official size on 8-frame DAVIS/MOSE-style clips with up to 3 objects;
    the tracker's optimiser is SAM 2's MOSE fine-tune (docs/reference_model.md). Longer clips:
    ``--config.data.num_frames=16`` and ``--config.optim.lr.rest=5e-7`` (the paper's 0.1x).
    ``mesh.frame`` must divide ``data.max_objects``."""
    c = official("davis", mode)
    if mode == "tracker":
        c.optim.update(dict(lr=per_group(3e-6, 3e-6, 5e-6), weight_decay=per_group(0.1, 0.1, 0.1),
                            layer_decay=0.9, schedule="cosine", warmup_steps=0, final_lr_fraction=0.1,
                            clip_norm=0.1, freeze="^detector/"))
    return c


def demo():
    """The tiny model trained from scratch on the generated videos, float32 on CPU, sized so that the
    held-out detection figures rise within minutes on two cores: many short steps (2-frame clips
    from 4 of the 72 training videos, at most 2 phrases a clip: the phrases cost more than the
    frames), no dropout and no augmentation (both slow a from-scratch model down), and one learning
    rate of 3e-4 for every group (at 1e-3 the held-out box and mask AP rose slower)."""
    c = detector_finetune(config_lib.base_config(ModelConfig.tiny(), data_config.get_config("demo"),
                                                 TrackerConfig.tiny()))
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
    c.optim.update(dict(lr=per_group(3e-4, 3e-4, 3e-4), weight_decay=per_group(0.01, 0.01, 0.01), layer_decay=1.0,
                        schedule="cosine", warmup_steps=10, final_lr_fraction=0.1, clip_norm=1.0))
    c.loss.pad_n_queries = None  # the tiny decoder has 16 queries, not the reference's 200
    c.eval.update(dict(every=400, num_batches=6))  # 24 held-out clips, 96 (frame, phrase) queries
    train = c.data.sources.demo
    c.eval.sources.demo = data_config.source_config(
        "ytvis", train.get_ref("image_dir"), train.get_ref("annotations"),
        file_list=c.data.synthetic.get_ref("output_dir") + "/davis/ImageSets/val.txt", exhaustive=True)
    c.overlay_every = 400
    return c


def tracker_demo():
    """The demo's tiny model and videos, training the tracker (and the backbone it reads) alone;
    evaluated by J&F on the held-out videos. On frames without clicks the tracker outputs the
    multimask output its IoU head rates best. From scratch that head learns slower than the masks:
    at the recipe's IoU weight (1) it still picked a whole-frame mask for every object after 300
    steps (held-out J 0.005), while the best of the three overlapped the object at IoU 0.41 on
    average (one held-out batch, 5 objects x 3 frames). The demo weights the IoU term 10x so that
    the choice is learnt within its steps (on the 24 videos the demos once generated; README.md,
    'Tracker training', has its figures on the 96 they generate now). It keeps its own clips (4 frames, the
    tracker's J&F needs 3), batch, augmentation and learning rate rather than the detector demo's."""
    c = demo()
    c.mode = "tracker"
    c.optim.freeze = DETECTOR_HEADS
    c.tracker.loss.weight_iou = 10.0
    c.data.update(dict(num_frames=4, batch_size=2, max_phrases=4))
    c.data.augment.enabled = True
    c.optim.lr.update(per_group(1e-3, 1e-3, 1e-3))
    c.total_steps, c.log_every, c.checkpoint_every = 300, 10, 100
    # J&F as predict_video + evaluate --metric=jf give it, on every held-out video whole (DAVIS layout);
    # with jf_protocol="clips", 12 clips: J&F of a few objects is noisy.
    c.eval.update(dict(every=100, num_batches=6, jf_protocol="videos"))
    davis = c.data.synthetic.get_ref("output_dir") + "/davis"
    c.eval.sources.demo = data_config.source_config("davis", davis + "/JPEGImages", davis + "/Annotations",
                                                    file_list=davis + "/ImageSets/val.txt")
    return c


RECIPES = {"default": lambda: official("davis"), "demo": demo, "tracker": lambda: tracker("tracker"),
           "joint": lambda: tracker("joint"), "tracker_demo": tracker_demo,
           **{name: (lambda name=name: official(name)) for name in ("davis", "sav", "ytvis", "coco")}}
assert set(RECIPES) == set(config_lib.VIDEO_VARIANTS)


def get_config(arg: str | None = None):
    variant = arg or "default"
    if variant not in RECIPES:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(config_lib.VIDEO_VARIANTS)}")
    return RECIPES[variant]()
