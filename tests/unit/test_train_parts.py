"""The trainer's small parts: mesh, per-query targets, detection counts, non-finite handling, overrides."""
import collections
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from sam3_jax.data import schema
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.train import loop, metrics, optim, overrides, program
from sam3_jax.train import mesh as mesh_lib
from sam3_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mesh_shapes_and_errors():
    mesh = mesh_lib.make_mesh(-1, 4)
    assert dict(mesh.shape) == {"data": 2, "frame": 4}
    with pytest.raises(ValueError, match="mesh.frame=3 does not divide the 8 devices"):
        mesh_lib.make_mesh(-1, 3)
    with pytest.raises(ValueError, match=r"mesh.data=2 x mesh.frame=2 != 8 devices"):
        mesh_lib.make_mesh(2, 2)
    with pytest.raises(ValueError, match="not divisible by mesh.data=2"):
        mesh_lib.check_divisible(mesh, 3, 8)
    with pytest.raises(ValueError, match="num_frames=6 is not divisible by mesh.frame=4"):
        mesh_lib.check_divisible(mesh, 2, 6)


def test_shard_batch_layout():
    mesh = mesh_lib.make_mesh(2, 4)
    batch = {"frames": np.arange(2 * 8 * 3).reshape(2, 8, 3), "phrase_valid": np.ones((2, 4), bool)}
    out = mesh_lib.shard_batch(mesh, batch)
    assert out["frames"].sharding.spec == P("data", "frame")
    assert out["phrase_valid"].sharding.spec == P("data")
    shard = next(s for s in out["frames"].addressable_shards if s.index[0].start == 1 and s.index[1].start == 6)
    np.testing.assert_array_equal(np.asarray(shard.data), batch["frames"][1:2, 6:8])


def test_query_targets_order_and_validity():
    b, t, p, n = 1, 2, 2, 3
    batch = {
        "object_valid": np.array([[[1, 1, 0], [1, 0, 0]]], bool),
        "query_positives": np.zeros((b, t, p, n), bool),
        "boxes": np.arange(b * t * n * 4, dtype=np.float32).reshape(b, t, n, 4),
        "masks": schema.pack_masks(np.random.default_rng(0).random((b, t, n, 8, 8)) < 0.5),
        "query_exhaustive": np.array([[[1, 0], [1, 1]]], bool),
        "frame_valid": np.array([[1, 0]], bool),
        "phrase_valid": np.array([[1, 1]], bool),
    }
    batch["query_positives"][0, 0, 0, [0, 1]] = True  # phrase 0: objects 0, 1
    batch["query_positives"][0, 1, 0, [0, 1]] = True  # frame 1: object 1 is not visible there
    targets, query_valid = step_lib.query_targets({k: jnp.asarray(v) for k, v in batch.items()})
    # Queries in (clip, frame, phrase) order.
    np.testing.assert_array_equal(query_valid, [True, True, False, False])
    np.testing.assert_array_equal(targets["valid"], [[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(targets["boxes"][2], batch["boxes"][0, 1])
    np.testing.assert_array_equal(targets["masks"][2], schema.unpack_masks(batch["masks"][0, 1]))
    np.testing.assert_array_equal(targets["is_exhaustive"], [True, False, True, True])


def _box_logit(x):
    return jnp.log(x / (1 - x))


def test_detection_counts_hand_worked():
    # Query 0: 2 objects, 3 predictions; query 1: a negative.
    tgt_boxes = jnp.array([[[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]]] * 2)
    valid = jnp.array([[True, True], [False, False]])
    pred_boxes = jnp.array([[[0.25, 0.25, 0.2, 0.2],     # exact on object 0
                             [0.80, 0.80, 0.2, 0.2],     # IoU 0.39 with object 1
                             [0.5, 0.5, 0.1, 0.1]]] * 2)  # nothing
    probs = jnp.array([[0.9, 0.2, 0.1], [0.3, 0.3, 0.3]])
    outputs = {"pred_logits": _box_logit(probs)[..., None], "pred_boxes": pred_boxes,
               "presence_logit_dec": _box_logit(jnp.array([[0.8], [0.6]]))}
    counts = metrics.detection_counts(outputs, {"boxes": tgt_boxes, "valid": valid}, jnp.array([True, True]))
    r = metrics.rates(jax.device_get(counts))
    iou_1 = (0.15 * 0.15) / (2 * 0.04 - 0.15 * 0.15)
    assert r["top1_precision"] == 1.0  # the top prediction of query 0 is exact
    assert r["best_box_iou"] == pytest.approx((1.0 + iou_1) / 2, abs=1e-5)
    assert r["presence_accuracy"] == 0.5  # query 1's presence 0.6 is wrong
    assert "mask_iou" not in r


def test_top_detections_order_and_layout():
    probs = jnp.array([[0.2, 0.9, 0.5]])
    masks = jnp.stack([jnp.full((4, 4), v) for v in (-1.0, 1.0, -1.0)])[None]  # only query 1 is on
    outputs = {"pred_logits": _box_logit(probs)[..., None], "presence_logit_dec": jnp.zeros((1, 1)),
               "pred_boxes": jnp.array([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.4, 0.4]]]),
               "pred_masks": masks}
    top = jax.device_get(metrics.top_detections(outputs, 2, 8))
    np.testing.assert_allclose(top["scores"], [[0.45, 0.25]], atol=1e-6)  # class x presence (0.5)
    np.testing.assert_allclose(top["boxes"], [[[0, 0, 0.5, 0.5], [0.3, 0.3, 0.7, 0.7]]], atol=1e-6)
    assert top["masks"].shape == (1, 2, 8, 8) and top["masks"][0, 0].all() and not top["masks"][0, 1].any()


def test_coco_ap_hand_worked():
    """One clip, one 40x40 frame, four phrase slots: a positive with one 20x20 object, an exhaustive
    negative, a non-exhaustive and an unused slot (both left out). Two detections each, ranked
    0.95 FP (negative), 0.9 hit (positive), 0.1 FP, 0.05 FP: precision 1/2 at full recall, so
    AP = 0.5 x the share of IoU thresholds 0.5:0.05:0.95 the hit passes (box IoU 0.64: 3 of 10;
    mask IoU 0.72: 5 of 10)."""
    m = 40
    gt = np.zeros((1, 1, 1, m, m), bool)
    gt[..., :20, :20] = True
    batch = {"masks": schema.pack_masks(gt), "boxes": np.array([[[[0.25, 0.25, 0.5, 0.5]]]], np.float32),
             "frame_valid": np.ones((1, 1), bool), "phrase_valid": np.array([[True, True, True, False]]),
             "query_exhaustive": np.array([[[True, True, False, True]]]), "object_valid": np.ones((1, 1, 1), bool),
             "query_positives": np.array([[[[True], [False], [True], [False]]]])}
    hit = np.zeros((m, m), bool)
    hit[:16, :18] = True
    far = np.zeros((m, m), bool)
    far[30:, 30:] = True
    detections = {"scores": np.array([[[[0.9, 0.1], [0.95, 0.05], [0.99, 0.98], [0.99, 0.98]]]]),
                  "boxes": np.array([[[[[0, 0, 0.5, 0.32], [0.75, 0.75, 1, 1]]] + [[[0.75, 0.75, 1, 1]] * 2] * 3]]),
                  "masks": np.array([[[[hit, far]] + [[far, far]] * 3]])}
    images = metrics.coco_images(detections, batch)
    assert len(images) == 2 and len(images[0]["gt_boxes"]) == 1 and len(images[1]["gt_boxes"]) == 0
    np.testing.assert_allclose(images[0]["gt_boxes"], [[0, 0, 20, 20]])
    np.testing.assert_array_equal(images[0]["gt_masks"], gt[0, 0])
    ap = metrics.coco_ap(images)
    assert ap == pytest.approx({"box_ap": 0.15, "box_ap50": 0.5, "mask_ap": 0.25, "mask_ap50": 0.5})
    assert set(ap) == set(metrics.COCO_AP)
    assert all(np.isnan(v) for v in metrics.coco_ap(images[1:]).values())  # no instance: nothing to measure


def test_keep_best_metric_must_be_evaluated():
    config = overrides.load_config(os.path.join(REPO, "configs/video.py:demo"))
    config.eval.keep_best = "val_jf"
    with pytest.raises(ValueError, match=r"eval.keep_best='val_jf' is not a metric .*mode=detector.*one of: "
                                         r"val_loss, val_top1_precision, .*val_box_ap, val_box_ap50, val_mask_ap"):
        loop.check_keep_best(config)
    config.mode = "joint"
    loop.check_keep_best(config)
    config.eval.coco_max_detections = 0
    config.eval.keep_best = "val_box_ap"
    with pytest.raises(ValueError, match=r"one of: .*val_mask_iou, val_j, val_f, val_jf$"):
        loop.check_keep_best(config)
    config.eval.every = 0
    with pytest.raises(ValueError, match="needs held-out evaluation"):
        loop.check_keep_best(config)


def test_nonfinite_update_is_skipped_and_counted():
    params = {"w": jnp.ones(3)}

    def loss_fn(p, batch, rng):
        loss = jnp.sum(p["w"] * batch["x"])
        return loss, {"terms": {}, "num_boxes": 0, "num_queries": 0}

    tx = optim.skip_nonfinite(optax.sgd(0.1))
    step = jax.jit(step_lib.make_train_step(loss_fn, tx))
    state = step_lib.init_state(params, tx, 0)
    batch = {"x": jnp.array([1.0, jnp.nan, 1.0]), "skipped": jnp.zeros(1, jnp.int32)}
    new, m = step(state, batch)
    assert not bool(m["finite"])
    np.testing.assert_array_equal(new["params"]["w"], params["w"])
    assert int(optim.skipped_updates(new["opt_state"])) == 1 and int(new["step"]) == 1
    new, m = step(new, {**batch, "x": jnp.ones(3)})
    assert bool(m["finite"]) and float(new["params"]["w"][0]) == pytest.approx(0.9)


def test_check_finite_policies():
    def pending(*flags):
        return collections.deque((i + 1, f, {"video_index": np.array([i])}) for i, f in enumerate(flags))

    assert loop.check_finite(pending(True, False, True), 0, "skip", 3) == 0
    assert loop.check_finite(pending(True, False, False), 0, "skip", 3) == 2
    with pytest.raises(loop.NonFiniteLoss, match=r"step 2: .*video_index=\[1\]"):
        loop.check_finite(pending(True, False), 0, "stop", 3)
    with pytest.raises(loop.NonFiniteLoss, match="step 3"):
        loop.check_finite(pending(False, False, False), 0, "skip", 2)


def test_unknown_override_lists_valid_keys():
    config = ml_collections.ConfigDict({"seed": 0, "optim": {"lr": {"rest": 1e-3, "text": 1e-4}, "b1": 0.9}})
    assert overrides.unknown_field(config, "optim.lr.rest") is None
    msg = overrides.unknown_field(config, "optim.lrr")
    assert "config.optim has no field 'lrr'" in msg and "valid keys: b1, lr" in msg
    assert "valid keys: optim, seed" in overrides.unknown_field(config, "sed")
    assert "optim.b1 is a value" in overrides.unknown_field(config, "optim.b1.x")
    argv = ["train.py", "--config=configs/video.py:demo", "--config.seed=3", "--workdir=/x"]
    assert overrides.override_paths(argv) == ["seed"]
    assert overrides.config_spec(argv, "default.py") == "configs/video.py:demo"


@pytest.mark.parametrize("spec", ["configs/video.py", "configs/video.py:demo", "configs/video.py:sav",
                                  "configs/video.py:coco", "configs/image.py", "configs/image.py:demo",
                                  "configs/video.py:tracker", "configs/video.py:joint",
                                  "configs/video.py:tracker_demo"])
def test_configs_load_and_agree_with_the_model(spec):
    config = overrides.load_config(os.path.join(REPO, spec))
    cfg = program.model_config(config)  # raises if data.image_size and the model disagree
    for field in ("total_steps", "checkpoint_every", "log_every", "init_from", "seed"):
        assert field in config, field
    assert {"data", "frame"} <= set(config.mesh.keys())
    for section in ("data", "model", "optim", "loss"):
        assert section in config, section
    if spec.startswith("configs/image.py"):
        assert config.data.num_frames == 1 and config.mesh.frame == 1
    assert config.mode in ("detector", "tracker", "joint")
    tracker = program.tracker_config(config, cfg)  # raises if the tracker and the backbone disagree
    if config.mode == "tracker":  # nothing of the detector trains but the parts the tracker reads
        frozen = re.compile(config.optim.freeze)
        assert frozen.search("detector/transformer/decoder/x") and frozen.search("detector/backbone/language_backbone/x")
        assert not frozen.search("tracker/sam_mask_decoder/x")
        assert config.data.max_objects % config.mesh.frame == 0
    if spec.endswith("demo"):
        assert cfg.image_size <= 224 and config.total_steps <= 2400 and tracker.image_size == cfg.image_size
    else:
        assert cfg.vit.depth == 32 and cfg.compute_dtype == "bfloat16" and tracker == TrackerConfig.official()
