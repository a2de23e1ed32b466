"""What a training run compiles, built from its config and a mesh alone: the model configs, the
optimiser, the train state's shapes and shardings, and the jitted train and evaluation steps.

No array is allocated here, so the trainer (`loop.Trainer`) and an ahead-of-time compile for
hardware this host does not have (``benchmarks/aot_compile.py``) build the very same programs.
"""
from __future__ import annotations

import dataclasses

import jax
import optax
from jax.sharding import NamedSharding

from sam3_jax.data import schema
from sam3_jax.model import detector
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker import tracker as tracker_lib
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.train import config as config_lib
from sam3_jax.train import mesh as mesh_lib
from sam3_jax.train import optim, sharding, tracker_stage
from sam3_jax.train import step as step_lib
from sam3_jax.train.losses.detector import DetectorLossConfig
from sam3_jax.train.losses.tracker import TrackerLossConfig
from sam3_jax.train.tracker_prompts import PromptConfig


def model_config(config) -> ModelConfig:
    cfg = ModelConfig.from_dict(config.model.to_dict())
    if config.data.image_size != cfg.image_size:
        raise ValueError(f"data.image_size={config.data.image_size} but the model takes "
                         f"model.vit.img_size={cfg.image_size}: set them equal")
    return cfg


def tracker_config(config, model_cfg: ModelConfig) -> TrackerConfig:
    """The tracker of ``config.tracker.model``, checked against the backbone that feeds it."""
    cfg = TrackerConfig(**config.tracker.model.to_dict())
    need = {"d_model": model_cfg.d_model, "image_size": model_cfg.image_size,
            "backbone_stride": model_cfg.vit.patch_size}
    for name, value in need.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"tracker.model.{name}={getattr(cfg, name)} but the backbone gives {value}: set them equal")
    return cfg


@dataclasses.dataclass
class Program:
    """The run's programs on ``mesh``. ``abstract_params`` is ``{"detector": ..., ["tracker": ...]}``
    of ``jax.ShapeDtypeStruct``s; ``param_specs`` its `sharding` layout; ``abstract_state`` the whole
    train state with its shardings. ``train_step(state, batch)`` donates the state; ``eval_step``
    (detecting runs) and ``track_eval`` (tracking runs) are None where the mode has none."""

    config: object
    mesh: jax.sharding.Mesh
    model_cfg: ModelConfig
    tracker_cfg: TrackerConfig | None
    loss_cfg: DetectorLossConfig
    abstract_params: dict
    param_specs: dict
    tx: optax.GradientTransformation
    abstract_state: dict
    train_step: object
    eval_step: object
    track_eval: object
    predict: object
    coco_top_k: int

    @property
    def detects(self) -> bool:
        return self.config.mode != "tracker"

    @property
    def tracks(self) -> bool:
        return self.config.mode != "detector"

    def param_shardings(self) -> dict:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.param_specs)

    def abstract_batch(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A global batch of ``global_batch`` clips as the train step takes it (shapes, shardings)."""
        dims = schema.Dims.from_config(self.config.data)
        return {name: jax.ShapeDtypeStruct((global_batch,) + dims.resolve(f.shape), f.dtype,
                                           sharding=NamedSharding(self.mesh, mesh_lib.batch_spec(name)))
                for name, f in schema.FIELDS.items()}


def build(config, mesh) -> Program:
    """Every program of the run described by ``config`` (checked on the way), on ``mesh``."""
    if config.mode not in config_lib.MODES:
        raise ValueError(f"mode={config.mode!r}: one of {', '.join(config_lib.MODES)}")
    model_cfg = model_config(config)
    detects, tracks = config.mode != "tracker", config.mode != "detector"
    loss_cfg = DetectorLossConfig.from_dict(config.loss.to_dict())
    abstract = {"detector": detector.abstract_params(model_cfg)}
    tracker_cfg = None
    if tracks:
        tracker_cfg = tracker_config(config, model_cfg)
        abstract["tracker"] = tracker_lib.abstract_params(tracker_cfg)
    shard = bool(config.mesh.shard_params)
    tx = optim.make_optimizer(config.optim, abstract, config.total_steps, fuse=not shard)
    specs = sharding.param_specs(abstract, mesh, shard)
    with jax.set_mesh(mesh):
        abstract_state = sharding.abstract_state(lambda p: step_lib.init_state(p, tx, config.seed),
                                                 abstract, mesh, specs)
    labels = optim.param_labels(abstract, config.optim)
    frozen = jax.tree.map(lambda label: label == optim.FROZEN, labels)

    dtype = model_cfg.compute_dtype
    stage = None
    if tracks:
        stage = tracker_stage.make_tracker_stage(
            tracker_cfg, PromptConfig(**config.tracker.prompts.to_dict()),
            TrackerLossConfig(**config.tracker.loss.to_dict()), dtype=dtype)
    eval_step = track_eval = None
    coco_top_k = 0
    with jax.set_mesh(mesh):
        loss_fn = step_lib.make_loss_fn(model_cfg, loss_cfg, mesh, clip_stage=stage, detect=detects)
        train_step = jax.jit(step_lib.make_train_step(
            loss_fn, tx, frozen=frozen, grad_norm=optim.Packing(abstract, config.optim, fuse=not shard).norm,
            learning_rates=lambda s: optim.learning_rates(config.optim, config.total_steps, s)),
            donate_argnums=(0,), out_shardings=(sharding.shardings(abstract_state), None))
        if detects:
            coco_top_k = min(config.eval.coco_max_detections, model_cfg.decoder.num_queries)
            eval_step = jax.jit(step_lib.make_eval_fn(model_cfg, loss_cfg, mesh, top_k=coco_top_k))
        if tracks:
            track_eval = jax.jit(step_lib.make_tracker_eval_fn(
                model_cfg, tracker_stage.make_tracker_predict(tracker_cfg, dtype=dtype), mesh))
    predict = jax.jit(step_lib.make_predict_fn(model_cfg))
    return Program(config, mesh, model_cfg, tracker_cfg, loss_cfg, abstract, specs, tx, abstract_state,
                   train_step, eval_step, track_eval, predict, coco_top_k)
