"""The converted-checkpoint directory: Orbax params, vocabulary, manifest, dead weights.

Layout of ``DIR``:
  params/            Orbax (StandardCheckpointer) of ``{"params": {"detector": ..., "tracker": ...}}``
                     ("tracker" only when the source held one); the trainer's
                     ``--config.init_from=DIR`` reads it
  manifest.json      source file + sha256, model and tracker configs, and what became of every
                     torch key (``export.py`` inverts the "mapped to <path>" entries)
  dead_weights.npz   tensors the reference stores but never uses, carried for export to torch
  bpe_simple_vocab_16e6.txt.gz   the tokenizer vocabulary
A directory is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint where a complete one is expected.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from sam3_jax import fileio

MANIFEST = "manifest.json"
PARAMS = "params"
DEAD = "dead_weights.npz"
VOCAB = "bpe_simple_vocab_16e6.txt.gz"


def sha256(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class NonFiniteError(ValueError):
    """Weights (or a model's outputs) hold NaN or Inf; the message names every such key."""


def nonfinite_keys(tree) -> list[str]:
    """The keys ("/"-joined paths of a nested dict, or the keys of a flat one such as a state_dict) of
    the floating-point arrays (numpy or jax) that hold a NaN or an Inf. Checked on the host, one array
    at a time: no compilation per shape, and no copy of a jax array on the CPU."""
    bad = []
    for path, value in traverse_util.flatten_dict(tree, sep="/").items():
        if jnp.issubdtype(value.dtype, jnp.inexact) and not np.isfinite(np.asarray(value)).all():
            bad.append(path)
    return bad


def check_finite(tree, what: str, *, allow: bool = False, hint: str = "") -> list[str]:
    """Raises NonFiniteError naming every non-finite key of ``tree`` (see ``nonfinite_keys``), its
    message starting with ``what`` and ending with ``hint``; with ``allow`` returns those keys instead."""
    bad = nonfinite_keys(tree)
    if bad and not allow:
        raise NonFiniteError(f"{what}: NaN or Inf in {len(bad)} tensor(s){hint}:\n  " + "\n  ".join(bad))
    return bad


def check_output(output_dir: str, overwrite: bool) -> str:
    """What ``write`` checks, for callers to run before the work that produces the checkpoint."""
    return fileio.check_output(output_dir, overwrite, directory=True)


def write(output_dir: str, params: dict, *, manifest: dict, dead: dict[str, np.ndarray], vocab_path: str,
          overwrite: bool = False) -> None:
    """Writes the directory atomically. ``params`` (nested dicts of numpy arrays) is consumed: its
    leaves are replaced by jax arrays as they are staged, which keeps peak memory near 2x the
    checkpoint size when converting the official 3.4 GB file. Too little free space (the arrays' size
    and 5 %) is refused before writing; a disk that fills all the same raises OSError(ENOSPC) naming
    ``output_dir`` too (Orbax reports it from its writer threads in many other shapes)."""
    output_dir = check_output(output_dir, overwrite)
    arrays = jax.tree.leaves(params) + list(dead.values())
    fileio.check_space(output_dir, sum(a.nbytes for a in arrays) * 21 // 20 + (1 << 20)
                       + os.path.getsize(vocab_path))
    try:
        with fileio.atomic_directory(output_dir) as tmp, _one_report_of_writer_failures():
            # Synchronous and with little in flight: the async checkpointer would snapshot every array
            # first, and unbounded concurrency stages all of them at once (each one more copy in RAM).
            handler = ocp.StandardCheckpointHandler(save_concurrent_gb=1)
            with ocp.Checkpointer(handler) as checkpointer:
                checkpointer.save(os.path.join(tmp, PARAMS), args=ocp.args.StandardSave({"params": _as_jax(params)}))
            np.savez(os.path.join(tmp, DEAD), **dead)
            shutil.copyfile(vocab_path, os.path.join(tmp, VOCAB))
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
    except Exception as e:
        if _disk_full(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), output_dir) from None
        raise


class _WriterFailureLogs(logging.Filter):
    """Drops the log records, a traceback each, of Orbax's writer threads failing and of asyncio
    finding their failed futures at exit: the save raises the same error in the calling thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and (
            record.pathname.endswith(os.path.join("futures", "future.py"))
            or "exception was never retrieved" in record.getMessage()))


def _drop_closed_loop_errors(hook):
    """``sys.unraisablehook`` without the "Event loop is closed" RuntimeErrors that TensorStore's write
    callbacks report, one per write in flight, once a failed save has closed Orbax's event loop, nor
    the error of Orbax's event loop collected at interpreter exit after an interrupted run."""
    def unraisablehook(unraisable):
        value = unraisable.exc_value
        closed = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
        if not closed and getattr(unraisable.object, "__qualname__", "") != "BaseEventLoop.__del__":
            hook(unraisable)
    return unraisablehook


@contextlib.contextmanager
def _one_report_of_writer_failures():
    """While Orbax saves, and after a failed save (its writers and callbacks keep failing until the
    process exits), a failure of its writers is reported once: by the exception the save raises."""
    loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
    quiet, hook = _WriterFailureLogs(), sys.unraisablehook
    for logger in loggers:
        logger.addFilter(quiet)
    sys.unraisablehook = _drop_closed_loop_errors(hook)
    yield  # on an exception the filters stay
    sys.unraisablehook = hook
    for logger in loggers:
        logger.removeFilter(quiet)


def _disk_full(e: BaseException | None) -> bool:
    """Whether ENOSPC is the cause of ``e``, however deep in its chain (or only in its text)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _as_jax(params: dict) -> dict:
    """Replaces numpy leaves by jax arrays in place, one at a time, so each numpy copy is released
    as soon as its jax twin exists (Orbax stages numpy inputs through an extra copy; jax arrays it
    writes from directly). The caller's tree is consumed."""
    for key, value in params.items():
        params[key] = _as_jax(value) if isinstance(value, dict) else jax.device_put(value)
    return params


def read_manifest(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a converted sam3-jax checkpoint (no {MANIFEST}): {checkpoint_dir}")
    with open(path) as f:
        return json.load(f)


def read_params(checkpoint_dir: str, abstract_params=None):
    """Restores ``params``; with ``abstract_params`` (e.g. from jax.eval_shape) shapes are checked."""
    path = os.path.join(os.path.abspath(checkpoint_dir), PARAMS)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no Orbax params in checkpoint directory: {path}")
    target = None
    if abstract_params is not None:
        target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params)}
    return ocp.StandardCheckpointer().restore(path, target)["params"]


def config_to_json(cfg) -> dict:
    return dataclasses.asdict(cfg)
