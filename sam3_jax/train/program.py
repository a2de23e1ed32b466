"""What a training run compiles, built from its config and a mesh alone: its tasks (`tasks`), the
model configs, the optimiser, the train state's shapes and shardings, and the jitted train step.

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
from sam3_jax.train import mesh as mesh_lib
from sam3_jax.train import optim, param_groups, sharding, tasks
from sam3_jax.train import step as step_lib
from sam3_jax.train.losses.detector import DetectorLossConfig

# The shapes of each model's parameters, by the name of its tree in the train state.
ABSTRACT_PARAMS = {"detector": detector.abstract_params, "tracker": tracker_lib.abstract_params}


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
    """The run's programs on ``mesh``. ``tasks`` are ``config.mode``'s (`tasks.tasks_for`);
    ``abstract_params`` is ``{"detector": ..., ["tracker": ...]}`` (the models they need) of
    ``jax.ShapeDtypeStruct``s; ``param_specs`` its `sharding` layout; ``abstract_state`` the whole train
    state with its shardings. ``train_step(state, batch)`` (every task's loss) donates the state."""

    config: object
    mesh: jax.sharding.Mesh
    tasks: tuple
    model_cfg: ModelConfig
    tracker_cfg: TrackerConfig | None
    loss_cfg: DetectorLossConfig
    abstract_params: dict
    param_specs: dict
    tx: optax.GradientTransformation
    abstract_state: dict
    train_step: object

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
    run_tasks = tasks.tasks_for(config.mode)
    model_cfg = model_config(config)
    loss_cfg = DetectorLossConfig.from_dict(config.loss.to_dict())
    needed = tasks.models(run_tasks)
    cfgs = {"detector": model_cfg}
    if "tracker" in needed:
        cfgs["tracker"] = tracker_config(config, model_cfg)
    abstract = {name: ABSTRACT_PARAMS[name](cfgs[name]) for name in needed}
    shard = bool(config.mesh.shard_params)
    tx = optim.make_optimizer(config.optim, abstract, config.total_steps, fuse=not shard)
    specs = sharding.param_specs(abstract, mesh, shard)
    with jax.set_mesh(mesh):
        abstract_state = sharding.abstract_state(lambda p: step_lib.init_state(p, tx, config.seed),
                                                 abstract, mesh, specs)
    labels = param_groups.param_labels(abstract, config.optim)
    frozen = jax.tree.map(lambda label: label == param_groups.FROZEN, labels)

    loss_parts = tasks.loss_parts(run_tasks, config, cfgs)
    with jax.set_mesh(mesh):
        loss_fn = step_lib.make_loss_fn(model_cfg, loss_cfg, mesh, **loss_parts)
        train_step = jax.jit(step_lib.make_train_step(
            loss_fn, tx, frozen=frozen, grad_norm=optim.Packing(abstract, config.optim, fuse=not shard).norm,
            learning_rates=lambda s: optim.learning_rates(config.optim, config.total_steps, s)),
            donate_argnums=(0,), out_shardings=(sharding.shardings(abstract_state), None))
    return Program(config, mesh, run_tasks, model_cfg, cfgs.get("tracker"), loss_cfg, abstract, specs, tx,
                   abstract_state, train_step)
