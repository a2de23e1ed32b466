"""The frame-sharded train step: equal to the unsharded one.

On 8 CPU devices, meshes data=2 x frame=4 and data=1 x frame=8 must give the loss, every loss
term, the gradients and the gathered clip (tracker features, detections) of the 1-device step,
with a clip-level stage whose gradients flow back through the all_gather: a stand-in, and the
tracker itself (joint training: its objects split over the "frame" devices by an all_to_all).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.data import config as data_config
from sam3_jax.data import pipeline
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.detector import init_params
from sam3_jax.model.tracker import tracker as tracker_lib
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.train import mesh as mesh_lib
from sam3_jax.train import step as step_lib
from sam3_jax.train import tracker_stage
from sam3_jax.train.losses.detector import DetectorLossConfig
from sam3_jax.train.losses.tracker import TrackerLossConfig
from sam3_jax.train.tracker_prompts import PromptConfig

pytestmark = pytest.mark.slow


def _no_dropout(cfg: ModelConfig) -> ModelConfig:
    """Dropout masks depend on how the batch is split; without them the step is a pure function."""
    d = dataclasses.asdict(cfg)
    for part in ("encoder", "decoder", "geometry"):
        if "dropout" in d[part]:
            d[part]["dropout"] = 0.0
    d["vit"]["drop_path_rate"] = 0.0
    return ModelConfig.from_dict(d)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = _no_dropout(ModelConfig.tiny())
    data = data_config.get_config("demo")
    data.synthetic.output_dir = str(tmp_path_factory.mktemp("videos"))
    data.image_size, data.num_frames, data.batch_size, data.max_objects = cfg.image_size, 8, 2, 4
    batch = next(iter(pipeline.build_dataset(data, seed=0, shard_index=0, shard_count=1)))
    assert batch["query_positives"].any() and (~batch["query_positives"].any(-1)).any()  # positives and negatives
    assert batch["object_valid"][:, 0].sum() >= 3  # objects to track
    params = {"detector": init_params(cfg, jax.random.key(0)),
              "tracker": tracker_lib.init_params(TRACKER, jax.random.key(2))}
    return cfg, batch, params


TRACKER = TrackerConfig.tiny().replace(mem_attn_dropout=0.0)


def clip_stage(params, clip, batch, rng):
    """A stand-in for the tracker: a loss on every frame's tracker features and detections, a sum
    over the shard's clips. Each "frame" device holds the whole clip, so it adds 1 / frame-count of it."""
    share = 1.0 / jax.lax.axis_size("frame")
    feats = sum(jnp.sum(jnp.square(f.astype(jnp.float32))) * 1e-4 for f in clip["tracker_fpn"])
    frame_weight = jnp.arange(clip["pred_boxes"].shape[1])[:, None, None, None]  # frames of the clip differ
    boxes = jnp.sum(clip["pred_boxes"].astype(jnp.float32) * frame_weight) * 1e-2
    return share * (feats + boxes), {"clip_loss": share * (feats + boxes)}


STAGES = {"stand-in": clip_stage,
          "tracker": tracker_stage.make_tracker_stage(TRACKER, PromptConfig(), TrackerLossConfig())}


def run(setup, data: int, frame: int, stage="stand-in"):
    """Loss, aux and gradients on a data x frame mesh; ``stage`` names one of STAGES or is a stage."""
    cfg, batch, params = setup
    mesh = mesh_lib.make_mesh(data, frame, devices=jax.devices()[:data * frame])
    with jax.set_mesh(mesh):
        loss_fn = step_lib.make_loss_fn(cfg, DetectorLossConfig(pad_n_queries=None), mesh,
                                        clip_stage=STAGES.get(stage, stage), return_clip=True)
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        (loss, aux), grads = grad_fn(jax.device_put(params, mesh_lib.replicated(mesh)),
                                     mesh_lib.shard_batch(mesh, batch), jax.random.key(1))
    return jax.device_get((loss, aux, grads))


@pytest.fixture(scope="module")
def single(setup):
    cache = {}

    def get(stage):
        if stage not in cache:
            cache[stage] = run(setup, 1, 1, stage)
        return cache[stage]

    return get


def _assert_grads_close(grads, grads1, atol: float):
    """Every leaf, relative to its scale; leaves whose true gradient is zero (e.g. biases that shift
    all attention logits alike) hold rounding noise, judged against the largest leaf."""
    flat1 = jax.tree_util.tree_flatten_with_path(grads1)[0]
    flat = jax.tree.leaves(grads)
    assert len(flat) == len(flat1)
    top = max(float(np.abs(g).max()) for _, g in flat1)
    for (path, g1), g in zip(flat1, flat):
        scale = max(float(np.abs(g1).max()), 1e-4 * top)
        np.testing.assert_allclose(g / scale, g1 / scale, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("stage,data,frame", [("stand-in", 2, 4), ("stand-in", 1, 8), ("tracker", 2, 4)])
def test_sharded_step_equals_single_device(setup, single, stage, data, frame):
    loss1, aux1, grads1 = single(stage)
    loss, aux, grads = run(setup, data, frame, stage)
    assert np.isfinite(loss1) and loss1 > 0
    np.testing.assert_allclose(loss, loss1, rtol=2e-5)
    stage_terms = {"stand-in": {"clip_loss"}, "tracker": {"trk_mask", "trk_dice", "trk_iou", "trk_class"}}[stage]
    assert aux["terms"].keys() == aux1["terms"].keys() and stage_terms <= aux["terms"].keys()
    for name, value in aux1["terms"].items():
        np.testing.assert_allclose(aux["terms"][name], value, rtol=2e-5, atol=1e-7, err_msg=name)
    assert int(aux["num_boxes"]) == int(aux1["num_boxes"]) > 0
    assert int(aux["num_queries"]) == int(aux1["num_queries"]) > 0
    # Every "frame" device gathered the same, whole clip: the single device's.
    for path, ref in jax.tree_util.tree_flatten_with_path(aux1["clip"])[0]:
        got = jax.tree_util.tree_map(lambda x: x, aux["clip"])
        for key in path:
            got = got[key.key if hasattr(key, "key") else key.idx]
        assert got.shape == (frame,) + ref.shape[1:]
        for copy in got:
            np.testing.assert_allclose(np.asarray(copy, np.float32), np.asarray(ref[0], np.float32),
                                       rtol=1e-2, atol=1e-2, err_msg=jax.tree_util.keystr(path))
    # The tracker's gradients come through ~30 prediction steps per object: a longer chain of float32
    # sums whose order differs with the split (measured: 1.01e-3 of the leaf scale, 1 element).
    _assert_grads_close(grads, grads1, atol={"stand-in": 1e-3, "tracker": 2e-3}[stage])
    # The clip stage's gradient reaches the tracker neck, which only it uses (and the tracker's own).
    neck = grads1["detector"]["backbone"]["vision_backbone"]["sam2_convs_0"]
    assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(neck))
    if stage == "tracker":
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads1["tracker"]))
        assert np.abs(grads1["tracker"]["sam_mask_decoder"]["iou_prediction_head"]["layers_0"]["kernel"]).max() > 0
