"""The recipes in configs/*.py: every variant's parameter-group rules give each leaf of the tiny
detector + tracker tree (unrolled and scanned) the lr, weight decay and freezing of the groups the
reference documents (vision / text / rest, docs/reference_model.md), as the fixed groups did before
the rules; command-line overrides of the recipe; the checks of bad rules.
"""
import os
import re

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from sam3_jax.model.config import ModelConfig
from sam3_jax.model.detector import abstract_params
from sam3_jax.model.tracker import tracker as tracker_lib
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.train import config as config_lib
from sam3_jax.train import optim, overrides, param_groups, validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The groups before they were rules: the vision backbone, the text backbone, everything else.
FIXED = {"vision": re.compile(r"^(detector/)?backbone/vision_backbone/"),
         "text": re.compile(r"^(detector/)?backbone/language_backbone/")}
DETECTOR_HEADS = r"^detector/(?!backbone/vision_backbone/(trunk|sam2_convs))"
FINETUNE = dict(lr=(2.5e-5, 5e-6, 8e-5), wd=0.1, freeze="", schedule="inverse_sqrt", warmup=20, layer_decay=0.9,
                clip=0.1)
DEMO = dict(lr=(3e-4,) * 3, wd=0.01, freeze="", schedule="cosine", warmup=10, layer_decay=1.0, clip=1.0)
# Each variant's documented recipe: (vision, text, rest) peak lr, weight decay of the decayed leaves,
# freeze regex, schedule, warmup, layer decay, clipping.
RECIPES = {
    **{f"configs/video.py:{v}": FINETUNE for v in ("default", "davis", "sav", "ytvis", "coco", "joint")},
    "configs/image.py:coco": FINETUNE,
    "configs/video.py:tracker": dict(lr=(3e-6, 3e-6, 5e-6), wd=0.1, freeze="^detector/", schedule="cosine",
                                     warmup=0, layer_decay=0.9, clip=0.1),  # SAM 2's MOSE fine-tune
    "configs/video.py:demo": DEMO, "configs/image.py:demo": DEMO,
    "configs/video.py:tracker_demo": {**DEMO, "lr": (1e-3,) * 3, "freeze": DETECTOR_HEADS},
}


@pytest.fixture(scope="module")
def tree():
    return {"detector": abstract_params(ModelConfig.tiny()), "tracker": tracker_lib.abstract_params(TrackerConfig.tiny())}


def load(spec):
    return overrides.load_config(os.path.join(REPO, spec))


def test_every_variant_has_its_recipe():
    assert set(RECIPES) == ({f"configs/video.py:{v}" for v in config_lib.VIDEO_VARIANTS}
                            | {f"configs/image.py:{v}" for v in config_lib.IMAGE_VARIANTS})


@pytest.mark.parametrize("spec", sorted(RECIPES))
def test_rules_give_each_leaf_the_documented_lr_decay_and_freezing(spec, tree):
    cfg, want = load(spec).optim, RECIPES[spec]
    assert (cfg.schedule, cfg.warmup_steps, cfg.layer_decay, cfg.clip_norm, cfg.freeze) == (
        want["schedule"], want["warmup"], want["layer_decay"], want["clip"], want["freeze"])
    assert validate.errors(load(spec)) == []
    lr = dict(zip(("vision", "text", "rest"), want["lr"]))
    labels = param_groups.by_path(param_groups.param_labels(tree, cfg))
    packing = optim.Packing(tree, cfg, fuse=False)
    assert set(packing.members) == {p for p, label in labels.items() if label != "frozen"}
    for path, label in labels.items():
        frozen = path.endswith("positional_encoding_gaussian_matrix") or bool(
            want["freeze"] and re.search(want["freeze"], path))
        group = next((name for name, pattern in FIXED.items() if pattern.search(path)), "rest")
        assert label == ("frozen" if frozen else group), path
        if not frozen:
            assert cfg.lr[label] == lr[group], path
            assert packing.weight_decay[path] == (want["wd"] if param_groups.decays(path) else 0.0), path
            assert packing.group[path] == group, path
    counts = optim.group_counts(tree, cfg)
    assert sum(c["tensors"] for c in counts.values()) == len(labels)


def test_tracker_demo_trains_the_tracker_and_the_backbone_it_reads(tree):
    labels = param_groups.by_path(param_groups.param_labels(tree, load("configs/video.py:tracker_demo").optim))
    for path, label in labels.items():
        reads = path.startswith(("tracker/", "detector/backbone/vision_backbone/trunk/",
                                 "detector/backbone/vision_backbone/sam2_convs"))
        assert (label != "frozen") == (reads and not path.endswith("positional_encoding_gaussian_matrix")), path


def test_loss_weights_are_the_recipes():
    default, demo, tracker_demo = (load(f"configs/video.py{v}") for v in ("", ":demo", ":tracker_demo"))
    weights = dict(loss_ce=20.0, presence_loss=20.0, loss_bbox=5.0, loss_giou=2.0, loss_mask=200.0, loss_dice=10.0)
    for c in (default, demo):
        assert {k: c.loss[k] for k in weights} == weights
    assert default.loss.pad_n_queries == 200 and demo.loss.pad_n_queries is None
    assert (default.tracker.loss.weight_iou, tracker_demo.tracker.loss.weight_iou) == (1.0, 10.0)


def _parse(argv):
    argv = ["prog", f"--config={REPO}/configs/video.py:demo", *argv]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def test_command_line_overrides_of_the_recipe(tree):
    c = _parse(["--config.optim.lr.vision=1e-5", "--config.optim.weight_decay.rest=0.05",
                "--config.optim.groups=(('vision', '^detector/backbone/'), ('text', '^$'), ('rest', '.*'))"])
    assert validate.errors(c) == []
    labels = param_groups.by_path(param_groups.param_labels(tree, c.optim))
    assert all(labels[p] == "vision" for p in labels if p.startswith("detector/backbone/"))
    assert "text" not in labels.values()
    lrs = optim.learning_rates(c.optim, c.total_steps, 10)  # the end of the warmup: the peak lr
    assert float(lrs["vision"]) == pytest.approx(1e-5) and float(lrs["rest"]) == pytest.approx(3e-4)
    packing = optim.Packing(tree, c.optim, fuse=False)
    assert packing.weight_decay["detector/transformer/decoder/query_embed/embedding"] == 0.05
    assert packing.weight_decay["detector/backbone/vision_backbone/trunk/block_groups/blocks_0/attn/qkv/kernel"] == 0.01


def test_bad_rules_are_one_line_each():
    c = load("configs/video.py:demo")
    c.optim.groups = (("vision", "^detector/backbone/("), ("rest", "^detector/"))
    c.optim.freeze = "["
    errors = validate.errors(c)
    assert any("the regex of 'vision'" in e for e in errors)
    assert "optim.groups: the last rule must be the catch-all ('rest', '.*'), got ('rest', '^detector/')" in errors
    assert "optim.lr needs exactly the groups vision, rest; got rest, text, vision" in errors
    assert any(e.startswith("optim.freeze='[': not a regex") for e in errors)
    c = load("configs/video.py:demo")
    c.optim.lr.text = -1.0
    assert validate.errors(c) == ["optim.lr.text=-1.0: must be a number >= 0"]
    with pytest.raises(ValueError, match="optim.lr.text"):
        optim.make_optimizer(c.optim, {"w": np.zeros(2)}, 10)


def test_each_group_decays_at_its_own_rate():
    """Zero gradients: Adam's step is 0, so each update is -lr x weight decay x parameter, per group."""
    c = load("configs/video.py:demo").optim
    c.update(dict(schedule="cosine", warmup_steps=0, final_lr_fraction=1.0, layer_decay=1.0))
    c.lr.update(dict(vision=1.0, text=2.0, rest=3.0))
    c.weight_decay.update(dict(vision=0.1, text=0.2, rest=0.3))
    leaf = {"kernel": np.ones(2, np.float32), "bias": np.ones(2, np.float32)}
    params = {"detector": {"backbone": {"vision_backbone": {"a": leaf}, "language_backbone": {"b": leaf}},
                           "transformer": {"c": leaf}}}
    tx = optim.make_optimizer(c, params, 10)
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    got = {p: float(u[0]) for p, u in param_groups.by_path(updates).items()}
    assert got == pytest.approx({
        "detector/backbone/vision_backbone/a/kernel": -0.1, "detector/backbone/language_backbone/b/kernel": -0.4,
        "detector/transformer/c/kernel": -0.9, "detector/backbone/vision_backbone/a/bias": 0.0,
        "detector/backbone/language_backbone/b/bias": 0.0, "detector/transformer/c/bias": 0.0})
