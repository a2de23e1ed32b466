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

import dataclasses
import errno
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from sam3_jax import fileio
from sam3_jax.checkpoint import save_errors
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig

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
        with fileio.atomic_directory(output_dir) as tmp, save_errors.writer_failures_reported_once():
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
        if save_errors.disk_full(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), output_dir) from None
        raise


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


def configs(manifest: dict) -> tuple[ModelConfig, TrackerConfig | None]:
    """(model config, tracker config or None) as recorded in a converted checkpoint's manifest."""
    cfg = ModelConfig.from_dict(manifest["model_config"])
    tracker = manifest.get("tracker_config")
    if tracker is None:
        return cfg, None
    names = {f.name for f in dataclasses.fields(TrackerConfig)}
    return cfg, TrackerConfig(**{k: v for k, v in tracker.items() if k in names})


def abstract_params(cfg: ModelConfig, tracker_cfg: TrackerConfig | None) -> dict:
    """The params tree of a checkpoint of these sizes (shapes and dtypes only): ``"detector"``, and
    ``"tracker"`` when ``tracker_cfg`` is given."""
    from sam3_jax.model import detector
    from sam3_jax.model.tracker import tracker

    tree = {"detector": detector.abstract_params(cfg)}
    if tracker_cfg is not None:
        tree["tracker"] = tracker.abstract_params(tracker_cfg)
    return tree
