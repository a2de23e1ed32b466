"""Training checkpoints: an Orbax ``CheckpointManager`` over the train state and the Grain iterator.

Each step directory holds two items: ``state`` (the train-state pytree, Orbax standard format) and
``data`` (the Grain iterator's position, a small JSON per process), so a resumed run continues from
the same example. Orbax writes a step under a temporary name and renames it into place when the
write is complete, so a run killed mid-save leaves the previous checkpoints intact; the manager
lists only committed steps and deletes leftover temporary directories when it is created.

A `BestCheckpointer` keeps, beside them, the one step that scored best on a held-out metric
(Orbax's ``best_fn``/``best_mode``), in its own directory (``checkpoints_best/``) so that the
regular manager's keep-newest retention and resume never see it.

``load_params`` serves the trainer's ``--config.init_from``: a converted official checkpoint
(``sam3_jax.convert.checkpoint``) or a training checkpoint.
"""
from __future__ import annotations

import math
import os

from etils import epath
import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sam3_jax.convert import checkpoint as converted
from sam3_jax.model import stacking

STATE, DATA, CHECKPOINTS, BEST_CHECKPOINTS = "state", "data", "checkpoints", "checkpoints_best"
BEST_MODES = ("max", "min")


class Checkpointer:
    """Saves every step given to ``save`` (keeping the newest ``max_to_keep``); restores the newest."""

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True, **options):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True, **options)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_iterator=None, metrics: dict | None = None) -> None:
        """Starts saving ``state`` (and the iterator's position); with ``async_save`` it returns once
        the arrays are copied off the device, and the files are written in the background."""
        items = {STATE: ocp.args.StandardSave(_keys_to_data(state))}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)

    def restore_latest(self, abstract_state, data_iterator=None):
        """The newest state shaped, typed and sharded like ``abstract_state`` (arrays or
        ``jax.ShapeDtypeStruct``s; leaves without a sharding go to the default device), or None when
        there is no checkpoint. ``data_iterator`` is moved, in place, to the saved position."""
        step = self.latest_step()
        if step is None:
            return None
        items = {STATE: ocp.args.StandardRestore(_restore_target(abstract_state))}
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
        return _data_to_keys(restored[STATE], abstract_state)

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is committed."""
        self._manager.wait_until_finished()

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


def load_params(directory: str, abstract_params: dict) -> dict:
    """Parameters shaped like ``abstract_params`` (e.g. ``{"detector": ...}``) from ``directory``: a
    converted checkpoint (``directory/params``; only the requested subtrees are read), a training
    run's ``checkpoints`` directory or the run's workdir (the newest step's ``state["params"]``).
    The ViT's blocks come stacked or unrolled as ``abstract_params`` has them, whichever was stored."""
    return _restore_params(_params_item(directory), abstract_params)


def stored_models(directory: str) -> set[str]:
    """The models (``"detector"``, ``"tracker"``) whose parameters ``directory`` holds (as `load_params`
    finds them): a detector-only run or image checkpoint can start a run that trains the tracker too."""
    item = _params_item(directory)
    return set(ocp.PyTreeCheckpointHandler().metadata(epath.Path(item)).tree.get("params", {}))


def _params_item(directory: str) -> str:
    """The Orbax pytree item that holds ``params`` in a converted checkpoint, run or checkpoints dir."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"init_from directory does not exist: {directory}")
    if os.path.isfile(os.path.join(directory, converted.MANIFEST)):
        return os.path.join(directory, converted.PARAMS)
    for candidate in (directory, os.path.join(directory, CHECKPOINTS)):
        if os.path.isdir(candidate) and (latest := _latest_step_dir(candidate)):
            return os.path.join(latest, STATE)
    raise ValueError(f"neither a converted checkpoint ({converted.MANIFEST} + {converted.PARAMS}/) nor a training "
                     f"checkpoint directory (or a workdir holding {CHECKPOINTS}/): {directory}")


def _latest_step_dir(directory: str) -> str | None:
    """The newest committed step directory, found as ``CheckpointManager`` finds it."""
    latest = ocp.path.step.latest_step_metadata(directory, ocp.path.step.standard_name_format())
    return None if latest is None else str(latest.path)


def _restore_params(path: str, abstract_params: dict) -> dict:
    """Restores ``{"params": abstract_params}`` from the pytree item at ``path``, which may hold more
    (the other model's parameters, the optimiser state): Orbax's partial restore reads only these.
    Layer stacks are read in the layout stored (unrolled as converted, or scanned) and given in the
    one asked for (``stacking``)."""
    handler = ocp.PyTreeCheckpointHandler()
    saved = handler.metadata(epath.Path(path)).tree.get("params", {})
    stored_abstract, to_target = _stack_layout(saved, abstract_params)
    target = {"params": _restore_target(stored_abstract)}
    _check_shapes(saved, target["params"])
    with ocp.Checkpointer(handler) as checkpointer:
        params = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))["params"]
    return to_target(params)


def _stack_layout(saved, abstract_params: dict):
    """(the abstract params with the layer stacks in the saved layout, params -> the layout asked
    for): a converted checkpoint stores every stack unrolled, a training run's checkpoint stores
    them as its config scanned them."""
    stored, wanted = stacking.layout(saved), stacking.layout(abstract_params)
    if stored == wanted:
        return abstract_params, lambda params: params
    shardings = {getattr(x, "sharding", None) for x in jax.tree.leaves(abstract_params)}
    sharding = shardings.pop() if len(shardings) == 1 else None  # replicated params share one
    stored_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                   jax.eval_shape(lambda t: stacking.relayout(t, stored), abstract_params))
    return stored_abstract, lambda params: stacking.relayout(params, wanted, owned=True)


def _check_shapes(saved, target) -> None:
    """Orbax reports a missing or misshapen parameter without its path; name it here."""
    flat_saved = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
    for key, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = jax.tree_util.keystr(key, simple=True, separator="/")
        if key not in flat_saved:
            raise ValueError(f"parameter {name} is not in the checkpoint")
        if tuple(flat_saved[key].shape) != tuple(leaf.shape):
            raise ValueError(f"parameter {name}: shape {tuple(flat_saved[key].shape)} in the checkpoint, "
                             f"{tuple(leaf.shape)} expected")


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


def _restore_target(abstract):
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
