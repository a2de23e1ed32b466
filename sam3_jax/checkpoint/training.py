"""Training checkpoints: an Orbax ``CheckpointManager`` over the train state and the Grain iterator.

Each step directory holds two items: ``state`` (the train-state pytree, Orbax standard format) and
``data`` (the Grain iterator's position, a small JSON per process), so a resumed run continues from
the same example. Orbax writes a step under a temporary name and renames it into place when the
write is complete, so a run killed mid-save leaves the previous checkpoints intact; the manager
lists only committed steps and deletes leftover temporary directories when it is created.

A `BestCheckpointer` keeps, beside them, the one step that scored best on a held-out metric
(Orbax's ``best_fn``/``best_mode``), in its own directory (``checkpoints_best/``) so that the
regular manager's keep-newest retention and resume never see it.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import sys

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sam3_jax.checkpoint import save_errors

STATE, DATA, CHECKPOINTS, BEST_CHECKPOINTS = "state", "data", "checkpoints", "checkpoints_best"
CORRUPT = "checkpoints_corrupt"  # beside CHECKPOINTS: unreadable steps moved out of the manager's sight
BEST_MODES = ("max", "min")

log = logging.getLogger(__name__)


class SaveError(RuntimeError):
    """A checkpoint could not be written; the message names the step, its path and the cause."""


class Checkpointer:
    """Saves every step given to ``save`` (keeping the newest ``max_to_keep``); restores the newest."""

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True, **options):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True, **options)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)
        self._pending: int | None = None  # the step whose background save is not confirmed yet

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _failed(self, step: int, error: BaseException) -> SaveError:
        return SaveError(f"step {step}: saving the checkpoint {self._manager.directory / str(step)} failed: "
                         f"{save_errors.cause(error)}")

    def save(self, step: int, state, data_iterator=None, metrics: dict | None = None) -> None:
        """Starts saving ``state`` (and the iterator's position); with ``async_save`` it returns once
        the arrays are copied off the device, and the files are written in the background. Raises
        `SaveError` for this save, or for the previous one if it failed in the background."""
        self.check(wait=True)
        items = {STATE: ocp.args.StandardSave(_keys_to_data(state))}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)
        except Exception as e:  # noqa: BLE001 - every failure to write is reported the same way
            raise self._failed(step, e) from e
        self._pending = step

    def check(self, wait: bool = False) -> None:
        """Raises `SaveError` if the background save has failed; a save still being written is
        waited for only with ``wait``. Once reported, the failed step is forgotten: the previous
        checkpoint stays the newest (Orbax removes the failed step's temporary directory later)."""
        step = self._pending
        if step is None or (not wait and self._manager.is_saving_in_progress()):
            return
        self._pending = None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failed(step, e) from e

    def restore_latest(self, abstract_state, data_iterator=None):
        """The newest readable state shaped, typed and sharded like ``abstract_state`` (arrays or
        ``jax.ShapeDtypeStruct``s; leaves without a sharding go to the default device), or None when
        there is no checkpoint. ``data_iterator`` is moved, in place, to the saved position. Newer
        steps that cannot be read while an older one can are corrupt: each is named in a warning and
        moved to ``checkpoints_corrupt/`` beside this directory (kept for inspection, never resumed)."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                restored = self._restore(step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 - which failures are corruption shows below
                if not failures:  # its other reads may fail later, each a traceback at collection
                    sys.unraisablehook = save_errors.drop_failed_read_errors(sys.unraisablehook)
                failures.append((step, e))
                continue
            for bad, error in failures:  # an older step reads: the newer ones are damaged, not this run's
                self._set_aside(bad, error, step)
            return restored
        if failures:  # not one step reads: the run's config, not the files, is what differs
            raise failures[0][1]
        return None

    def _set_aside(self, step: int, error: BaseException, resumed: int) -> None:
        source = self._manager.directory / str(step)
        target = os.path.join(os.path.dirname(str(self._manager.directory)), CORRUPT, str(step))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(source, target)
        self._manager.reload()
        log.warning("checkpoint %s is unreadable (%s): moved to %s; resuming from step %d", source,
                    save_errors.cause(error), target, resumed)

    def _restore(self, step: int, abstract_state, data_iterator):
        items = {STATE: ocp.args.StandardRestore(restore_target(abstract_state))}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            raise ValueError(
                f"checkpoint {self._manager.directory / str(step)} holds a train state of another layout "
                f"than this run's (another model, optimiser or version): it cannot be resumed. Its "
                f"parameters can start a new run: --config.init_from={self._manager.directory} with "
                f"another --workdir. Orbax: {e}") from e
        except KeyError as e:  # Grain's saved position lacks a field this pipeline's iterator reads
            raise ValueError(
                f"checkpoint {self._manager.directory / str(step)}: the data pipeline's saved position does "
                f"not fit this run's (no {e}): resume with the data.num_workers and data.sources it was "
                f"saved with (config.json)") from e
        return _data_to_keys(restored[STATE], abstract_state)

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is committed; raises `SaveError` if it failed."""
        self.check(wait=True)

    def close(self) -> None:
        self._manager.close()


class BestCheckpointer(Checkpointer):
    """Keeps the single step with the best ``metric`` (``mode`` "max" or "min") of those offered to
    `offer`; the metric is stored with the step, so a resumed run still knows the value to beat."""

    def __init__(self, directory: str, metric: str, mode: str = "max", *, async_save: bool = True):
        if mode not in BEST_MODES:
            raise ValueError(f"best checkpoint mode must be one of {', '.join(BEST_MODES)}, got {mode!r}")
        self.metric, self.mode = metric, mode
        super().__init__(directory, max_to_keep=1, async_save=async_save, best_fn=lambda m: m[metric],
                         best_mode=mode, keep_checkpoints_without_metrics=False)

    def best(self) -> tuple[int, float] | None:
        """(step, metric value) of the kept checkpoint, or None."""
        step = self._manager.best_step()
        return None if step is None else (step, float(self._manager.metrics(step)[self.metric]))

    def offer(self, step: int, value: float, state, data_iterator=None) -> bool:
        """Saves ``state`` if ``value`` beats the kept checkpoint's (a NaN never does); Orbax then
        deletes the one it replaces. Returns whether it saved. A resumed run that evaluates the kept
        step again (it was saved after the newest regular checkpoint) replaces it if it does better."""
        kept = self.best()
        if math.isnan(value) or (kept is not None and not (value > kept[1] if self.mode == "max" else value < kept[1])):
            return False
        if kept is not None and kept[0] == step:
            self._manager.delete(step)
        self.save(step, state, data_iterator, metrics={self.metric: float(value)})
        return True


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    """Orbax cannot write typed PRNG keys: store their raw bits."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree, abstract):
    """Wraps restored key bits with the key implementation the abstract tree asks for."""
    def leaf(x, a):
        if not _is_key(a):
            return x
        impl = jax.random.key_impl(jnp.zeros((), a.dtype))  # key_impl takes key arrays, not abstract ones
        return jax.random.wrap_key_data(x, impl=impl)

    return jax.tree.map(leaf, tree, abstract)


def restore_target(abstract):
    """``jax.ShapeDtypeStruct``s with a sharding each (the abstract leaf's, else the default device),
    and the raw-bits form of PRNG keys."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(path, x):
        sharding = getattr(x, "sharding", None) or default
        if isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh):
            # What jax.eval_shape of sharded arrays gives; Orbax needs the devices to place shards on.
            raise ValueError(f"{jax.tree_util.keystr(path, simple=True, separator='/')}: the abstract sharding is "
                             "on an AbstractMesh; give a NamedSharding on a concrete jax.sharding.Mesh")
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(leaf, abstract)
