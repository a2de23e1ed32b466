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
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

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


def write(output_dir: str, params: dict, *, manifest: dict, dead: dict[str, np.ndarray], vocab_path: str,
          overwrite: bool = False) -> None:
    """Writes the directory atomically. ``params`` (nested dicts of numpy arrays) is consumed: its
    leaves are replaced by jax arrays as they are staged, which keeps peak memory near 2x the
    checkpoint size when converting the official 3.4 GB file."""
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"output directory exists (pass overwrite to replace it): {output_dir}")
    with fileio.atomic_directory(output_dir) as tmp:
        # Synchronous and with little in flight: the async checkpointer would snapshot every array
        # first, and unbounded concurrency stages all of them at once (each one more copy in RAM).
        handler = ocp.StandardCheckpointHandler(save_concurrent_gb=1)
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(os.path.join(tmp, PARAMS), args=ocp.args.StandardSave({"params": _as_jax(params)}))
        np.savez(os.path.join(tmp, DEAD), **dead)
        shutil.copyfile(vocab_path, os.path.join(tmp, VOCAB))
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)


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
