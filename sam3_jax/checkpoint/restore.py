"""Parameters read out of a converted checkpoint or a training run, in the layer layout asked for.

What ``--config.init_from`` and the export of a run read: only the requested models' parameters
(Orbax's partial restore skips the rest, the optimiser state included), every layer stack given
stacked or unrolled as the caller's abstract tree has it, whichever the directory stored.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from sam3_jax.checkpoint import converted
from sam3_jax.checkpoint.training import CHECKPOINTS, STATE, restore_target
from sam3_jax.model import stacking


def load_params(directory: str, abstract_params: dict) -> dict:
    """Parameters shaped like ``abstract_params`` (e.g. ``{"detector": ...}``) from ``directory``: a
    converted checkpoint (``directory/params``; only the requested subtrees are read), a training
    run's workdir, ``checkpoints`` or ``checkpoints_best`` directory (the newest step's
    ``state["params"]``) or one step's directory.
    The ViT's blocks come stacked or unrolled as ``abstract_params`` has them, whichever was stored."""
    return _restore_params(_params_item(directory), abstract_params)


def stored_models(directory: str) -> set[str]:
    """The models (``"detector"``, ``"tracker"``) whose parameters ``directory`` holds (as `load_params`
    finds them): a detector-only run or image checkpoint can start a run that trains the tracker too."""
    item = _params_item(directory)
    return set(ocp.PyTreeCheckpointHandler().metadata(epath.Path(item)).tree.get("params", {}))


def _params_item(directory: str) -> str:
    """The Orbax pytree item that holds ``params`` in a converted checkpoint, a run's workdir (its newest
    step), a checkpoints directory (``checkpoints``, ``checkpoints_best``: its newest step) or one step."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"init_from directory does not exist: {directory}")
    if os.path.isfile(os.path.join(directory, converted.MANIFEST)):
        return os.path.join(directory, converted.PARAMS)
    if os.path.isdir(os.path.join(directory, STATE)):
        return os.path.join(directory, STATE)
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
    Layer stacks are read in the layout stored (scanned, or unrolled as checkpoints converted before
    the models were scan-only store them) and given in the one asked for (``stacking``)."""
    handler = ocp.PyTreeCheckpointHandler()
    saved = handler.metadata(epath.Path(path)).tree.get("params", {})
    stored_abstract, to_target = _stack_layout(saved, abstract_params)
    target = {"params": restore_target(stored_abstract)}
    _check_shapes(saved, target["params"])
    with ocp.Checkpointer(handler) as checkpointer:
        params = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))["params"]
    return to_target(params)


def _stack_layout(saved, abstract_params: dict):
    """(the abstract params with the layer stacks in the saved layout, params -> the layout asked
    for): the models and the converter stack every layer stack; checkpoints converted before the
    models were scan-only store them unrolled."""
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
