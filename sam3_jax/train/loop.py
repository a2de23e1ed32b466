"""The training loop behind ``train.py``: config -> mesh, state, data -> jitted steps -> logs and checkpoints.

Everything the run writes lives in ``workdir``: ``config.json`` (the resolved config), ``model.json``
(the model sizes, which make the workdir a checkpoint the predictors read), ``checkpoints/`` (Orbax:
state + Grain iterator), ``checkpoints_best/`` (with ``eval.keep_best``: the evaluated step that scored
best), ``metrics.jsonl`` and ``tensorboard/``. Running again with
the same workdir resumes from the newest checkpoint in ``checkpoints/``, with the data stream and
random numbers exactly where they were; with ``compilation_cache_dir`` it also skips the compiles.
"""
from __future__ import annotations

import collections
import copy
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from sam3_jax.checkpoint import finite, restore, training, weights
from sam3_jax.data import pipeline
from sam3_jax.train import mesh as mesh_lib
from sam3_jax.train import mesh_plan, optim, param_groups, program, reporting, sharding, stop, tasks, validate
from sam3_jax.train import step as step_lib

log = logging.getLogger(__name__)
# Batch fields that identify a clip, reported when a step's loss is not finite.
BATCH_IDS = ("dataset_index", "video_index", "frame_indices")


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients were NaN/Inf and the config says to stop."""


def check_finite(pending, consecutive_bad: int, policy: str, max_consecutive: int) -> int:
    """Empties ``pending`` ((step, finite flag, batch ids) per step, oldest first) and returns the
    count of non-finite steps in a row. Each such step's update was already skipped; raises
    `NonFiniteLoss` naming the batch for ``policy="stop"`` or after ``max_consecutive`` in a row."""
    if policy not in ("skip", "stop"):
        raise ValueError(f"nonfinite must be 'skip' or 'stop', got {policy!r}")
    while pending:
        step, finite, ids = pending.popleft()
        if bool(finite):
            consecutive_bad = 0
            continue
        consecutive_bad += 1
        where = ", ".join(f"{k}={np.asarray(v).tolist()}" for k, v in ids.items())
        log.warning("step %d: non-finite loss or gradients, update skipped (%s)", step, where)
        if policy == "stop" or consecutive_bad > max_consecutive:
            raise NonFiniteLoss(f"step {step}: non-finite loss or gradients on the batch {where}")
    return consecutive_bad


def write_config(config, workdir: str, step: int = 0) -> None:
    """The resolved config as ``config.json``, written whole (temp file + rename). A run resumed at
    ``step`` with another config keeps the earlier one as ``config.<step>.json``."""
    path, text = os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True)
    if step and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            earlier = f.read()
        if earlier != text:
            _write_whole(os.path.join(workdir, f"config.{step}.json"), earlier)
            log.info("the config differs from the one this run used up to step %d, kept as config.%d.json",
                     step, step)
    _write_whole(path, text)


def _write_whole(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def eval_data_config(config) -> ml_collections.ConfigDict | None:
    """The held-out data: the training data config with ``eval.sources``, unaugmented, in-process."""
    if not config.eval.every or not config.eval.sources:
        return None
    data = copy.deepcopy(config.data)
    with data.unlocked():
        data.sources = config.eval.sources
        data.augment.enabled = False
        data.num_workers = 0
    return data


def eval_metrics(config) -> list[str]:
    """The val_* keys an evaluation of this config writes, task by task (none when evaluation is off)."""
    if eval_data_config(config) is None:
        return []
    return [f"val_{name}" for task in tasks.tasks_for(config.mode) for name in task.metric_names(config)]


def check_jf_protocol(config) -> None:
    """A clear error for an unknown ``eval.jf_protocol``, or "videos" on eval sources it cannot read."""
    protocol = config.eval.jf_protocol
    if protocol not in tasks.JF_PREFIX:
        raise ValueError(f"eval.jf_protocol={protocol!r}: one of {', '.join(tasks.JF_PREFIX)}")
    if eval_data_config(config) is not None:
        for task in tasks.tasks_for(config.mode):
            task.check(config)


def check_keep_best(config) -> None:
    """A clear error for an ``eval.keep_best`` that no evaluation of this config writes."""
    name = config.eval.keep_best
    if not name:
        return
    available = eval_metrics(config)
    if not available:
        raise ValueError(f"eval.keep_best={name!r} needs held-out evaluation: set eval.every and eval.sources")
    if name not in available:
        raise ValueError(f"eval.keep_best={name!r} is not a metric of this run's evaluation "
                         f"(mode={config.mode}); one of: {', '.join(available)}")


class Trainer:
    """One run: builds everything from the config, then ``run()`` trains to ``total_steps``."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.is_main = jax.process_index() == 0
        os.makedirs(workdir, exist_ok=True)
        check_jf_protocol(config)
        check_keep_best(config)
        self.mesh = mesh_plan.make_mesh(config)
        mesh_lib.check_divisible(self.mesh, config.data.batch_size * jax.process_count(), config.data.num_frames)
        self.program = program.build(config, self.mesh)
        self.abstract_state = self.program.abstract_state
        self.data = iter(pipeline.build_dataset(config.data, config.seed))
        self.checkpoints = training.Checkpointer(os.path.join(workdir, training.CHECKPOINTS),
                                            max_to_keep=config.keep_checkpoints,
                                            async_save=config.checkpoint_async)
        self.best = None
        if config.eval.keep_best:
            self.best = training.BestCheckpointer(
                os.path.join(workdir, training.BEST_CHECKPOINTS), config.eval.keep_best,
                config.eval.keep_best_mode, async_save=config.checkpoint_async)
        state = self.checkpoints.restore_latest(self.abstract_state, self.data)
        if state is None:
            state = self._fresh_state()
        else:
            log.info("resumed from %s at step %d", workdir, int(state["step"]))
        self.state = state
        if self.is_main:  # only now: the checkpoint resumed (if any) has accepted this config
            write_config(config, workdir, int(state["step"]))
            weights.write_run_models(workdir, self.program.model_cfg, self._tracker_cfg())
        log.info("%s", optim.summarize(self.program.abstract_params, config.optim, config.total_steps))
        total, per_device = sharding.sharded_bytes(self.program.abstract_params, self.program.param_specs, self.mesh)
        log.info("parameters: %.2f GiB, %.2f GiB a device (mesh.shard_params=%s)", total / 2**30,
                 per_device / 2**30, config.mesh.shard_params)
        self.train_step = self.program.train_step
        self.evaluations = [] if eval_data_config(config) is None else [
            task.evaluation(self.program) for task in self.program.tasks]

    def _tracker_cfg(self):
        """The run's tracker; for a detector run, the one ``tracker.model`` describes (what a video
        predictor reading this run runs beside the detector), or None if it does not fit the backbone."""
        if self.program.tracker_cfg is not None:
            return self.program.tracker_cfg
        try:
            return program.tracker_config(self.config, self.program.model_cfg)
        except ValueError:
            return None

    def _fresh_state(self):
        """Parameters from ``init_from`` (the models it holds) or random, laid out as the program's
        ``param_specs``; then a fresh optimiser."""
        config, prog = self.config, self.program
        abstract, placed = prog.abstract_params, prog.param_shardings()
        keys, cfgs = weights.init_keys(config.seed), {"detector": prog.model_cfg, "tracker": prog.tracker_cfg}
        loaded = set()
        params = {}
        if config.init_from:
            loaded = restore.stored_models(config.init_from) & abstract.keys()
            if not loaded:
                raise ValueError(f"init_from={config.init_from} holds none of the models this run trains "
                                 f"({', '.join(sorted(abstract))})")
            # Read whole (a stored layer layout may differ from the run's), then laid out as the run's.
            replicated = mesh_lib.replicated(self.mesh)
            target = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract[k])
                      for k in loaded}
            params = restore.load_params(config.init_from, target)
            finite.check_finite(params, f"init_from={config.init_from}")
            params = jax.device_put(params, {k: placed[k] for k in loaded})
            log.info("initialised %s from %s", " and ".join(sorted(loaded)), config.init_from)
        for name in sorted(abstract.keys() - loaded):
            if config.init_from:
                log.warning("%s: not in %s, initialised at random", name, config.init_from)
            init = jax.jit(weights.INITS[name], static_argnums=0, out_shardings=placed[name])
            params[name] = init(cfgs[name], keys[name])
        with jax.set_mesh(self.mesh):
            init = jax.jit(lambda p: step_lib.init_state(p, prog.tx, config.seed),
                           out_shardings=sharding.shardings(self.abstract_state))
            return init(params)

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, float]:
        """Trains to ``total_steps``; returns the last logged metrics."""
        config = self.config
        start = int(self.state["step"])
        writer = reporting.MetricsWriter(self.workdir, start_step=start) if self.is_main else None
        progress = reporting.Progress(config.total_steps)
        # (step, finite flag on device, the batch's clip ids): checked at each log and save.
        pending: collections.deque = collections.deque()
        consecutive_bad, last = 0, {}
        frames_per_step = config.data.batch_size * jax.process_count() * config.data.num_frames
        tick, tick_step = time.perf_counter(), start
        try:
            if start == 0 and config.eval.every:  # the untrained model's figures: where the curves start
                last.update({f"val_{k}": v for k, v in self.evaluate(0, writer).items()})
            for step in range(start + 1, config.total_steps + 1):
                batch = next(self.data)
                if step == start + 1:
                    log.info("step %d: compiling the train step (minutes at official size)", step)
                    compile_start = time.perf_counter()
                with jax.set_mesh(self.mesh):
                    self.state, step_metrics = self.train_step(self.state, mesh_lib.shard_batch(self.mesh, batch))
                if step == start + 1:
                    jax.block_until_ready(step_metrics)
                    log.info("step %d: compiled and run in %s", step,
                             reporting.format_duration(time.perf_counter() - compile_start))
                stop.check()  # a SIGTERM stops the run here, between steps
                self.checkpoints.check()  # a background save that failed stops the run here
                if self.best:
                    self.best.check()
                pending.append((step, step_metrics["finite"], {k: batch[k] for k in BATCH_IDS}))
                log_now = step % config.log_every == 0 or step in (start + 1, config.total_steps)
                save_now = step % config.checkpoint_every == 0 or step == config.total_steps
                if log_now or save_now:
                    consecutive_bad = check_finite(pending, consecutive_bad, config.nonfinite,
                                                   config.max_consecutive_nonfinite)
                if log_now:
                    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    values["lr"] = values[f"lr/{param_groups.REST}"]  # the head's lr; lr/<group> has each group's
                    now = time.perf_counter()
                    values["step_time_s"] = (now - tick) / (step - tick_step)
                    values["frames_per_s"] = frames_per_step / values["step_time_s"]
                    values["nonfinite_steps"] = float(self._nonfinite_total())
                    tick, tick_step = now, step
                    last = values
                    if writer:
                        writer.scalars(step, values)
                    log.info("%s", progress.line(step, {k: values[k] for k in ("loss", "grad_norm",
                                                                                   "frames_per_s")}))
                if config.eval.every and (step % config.eval.every == 0 or step == config.total_steps):
                    evaluated = {f"val_{k}": v for k, v in self.evaluate(step, writer).items()}
                    last.update(evaluated)
                    if self.best:  # a metric left out (no clip could be scored) is NaN: never kept
                        score = evaluated.get(self.best.metric, float("nan"))
                        if self.best.offer(step, score, self.state, self.data):
                            log.info("step %d: best %s so far (%.4g), kept in %s", step, self.best.metric,
                                     score, training.BEST_CHECKPOINTS)
                if save_now:
                    self.checkpoints.save(step, self.state, self.data)
        finally:
            self.checkpoints.wait()
            if self.best:
                self.best.wait()
            if writer:
                writer.close()
        return last

    def _nonfinite_total(self) -> int:
        return int(optim.skipped_updates(self.state["opt_state"]))

    # ------------------------------------------------------------------------------------- evaluate
    def evaluate(self, step: int, writer) -> dict[str, float]:
        """On the held-out clips (the same ones every time), each task's evaluation (`tasks`): the
        detector's loss, detection rates and COCO AP, the tracker's J&F (of the clips, or of whole
        videos: ``eval.jf_protocol``); and their overlays."""
        data_cfg = eval_data_config(self.config)
        if data_cfg is None:
            return {}
        params = self.state["params"]
        reading = [e for e in self.evaluations if e.reads_clips]
        first = None
        if reading:
            for e in reading:
                e.start()
            data = iter(pipeline.build_dataset(data_cfg, self.config.seed))
            for _ in range(self.config.eval.num_batches):
                batch = next(data)
                first = batch if first is None else first
                with jax.set_mesh(self.mesh):
                    sharded = mesh_lib.shard_batch(self.mesh, batch)
                    outs = [e.dispatch(params, sharded) for e in reading]
                for e, out in zip(reading, outs):
                    e.add(out, batch)
        result = {k: v for e in self.evaluations for k, v in e.result(params).items()}
        log.info("eval at step %d: %s", step, " | ".join(f"{k} {v:.4g}" for k, v in result.items()))
        if writer:
            writer.scalars(step, {f"val_{k}": v for k, v in result.items()})
            if self.config.overlay_every and step % self.config.overlay_every == 0:
                images = {k: v for e in self.evaluations for k, v in e.images(params, first).items()}
                if images:
                    writer.images(step, images)
        return result


def train(config, workdir: str) -> dict[str, float]:
    """``train.py``'s body, callable from Python (tests, notebooks)."""
    return start(config, workdir).run()


def start(config, workdir: str) -> Trainer:
    """The config checked (`validate.ConfigError`), this process joined to its cluster and
    compilation cache, and the run built, resumed from ``workdir`` when it has a checkpoint."""
    validate.check(config)
    if config.distributed:
        cluster = config.cluster
        jax.distributed.initialize(coordinator_address=cluster.coordinator_address or None,
                                   num_processes=cluster.num_processes or None,
                                   process_id=None if cluster.process_id < 0 else cluster.process_id)
    if config.compilation_cache_dir:
        compilation_cache.set_cache_dir(os.path.expanduser(config.compilation_cache_dir))
        compilation_cache.reset_cache()  # jax opens its cache once per process: take this one
    return Trainer(config, workdir)

