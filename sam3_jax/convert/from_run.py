"""A training run's parameters as a converted checkpoint directory, so that a fine-tuned model goes
wherever a converted one goes: ``init_from``, the export to a PyTorch ``sam3.pt`` and any tool that
reads only converted checkpoints (the predictors read a run's workdir directly).

The run's checkpoints hold parameters and optimiser state but none of what the export needs beside
them (the key map, the dead weights, the source dtypes, the vocabulary), so those come from the
converted checkpoint the run started from (its ``init_from``, followed through runs started from
runs) or any converted checkpoint of the same sizes; for a run trained from scratch, from the
layout of its sizes (`torch_layout`). The layer stacks are written stacked, as the models and the
converter hold them.
"""
from __future__ import annotations

import json
import os

import numpy as np

from sam3_jax.checkpoint import converted, finite, restore, weights
from sam3_jax.convert import sam3_checkpoint, torch_layout


def base_of(run_dir: str) -> str | None:
    """The converted checkpoint ``run_dir`` (a workdir, or a checkpoint of one) started from; None
    for a run trained from scratch."""
    directory, seen = run_dir, []
    while True:
        workdir = weights.run_dir(os.path.abspath(directory))
        with open(os.path.join(workdir, weights.CONFIG), encoding="utf-8") as f:
            init_from = json.load(f).get("init_from") or ""
        if not init_from:
            return None
        if os.path.isfile(os.path.join(init_from, converted.MANIFEST)):
            return init_from
        if workdir in seen:
            raise ValueError(f"{run_dir}: its init_from chain ({' -> '.join(seen)}) comes back to {workdir}")
        seen.append(workdir)
        directory = init_from


def run_params(run_dir: str, base_dir: str, *, allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """(params, manifest): the newest parameters of ``run_dir`` (or the step it names) for each model
    the run holds (detector, tracker), ``base_dir``'s for a model it does not; ``base_dir``'s manifest
    with both sources recorded under ``"trained"``. A parameter of another shape than the base's is an
    error naming it; so are parameters holding NaN or Inf, unless ``allow_nonfinite``."""
    manifest = converted.read_manifest(base_dir)
    abstract = converted.abstract_params(*converted.configs(manifest))
    trained = sorted(restore.stored_models(run_dir) & set(abstract))
    if not trained:
        raise ValueError(f"{run_dir}: holds no parameters of the models of {base_dir} ({', '.join(sorted(abstract))})")
    params = restore.load_params(run_dir, {k: abstract[k] for k in trained})
    kept = {k: v for k, v in abstract.items() if k not in trained}
    if kept:
        params.update(restore.load_params(base_dir, kept))
    finite.check_finite(params, run_dir, allow=allow_nonfinite, hint=sam3_checkpoint.ALLOW_HINT)
    manifest = {**manifest, "trained": {"run": os.path.abspath(run_dir), "models": trained,
                                        "base": os.path.abspath(base_dir)}}
    return params, manifest


def source(run_dir: str, base_dir: str | None = None, *, allow_nonfinite: bool = False
           ) -> tuple[dict, dict, dict[str, np.ndarray], str]:
    """(params, manifest, dead weights, vocabulary file) of ``run_dir`` as a converted checkpoint:
    `run_params` with ``base_dir``'s (default: `base_of` the run) dead weights and vocabulary; for a
    run from scratch, all its models as `weights.read` gives them and the layout of its sizes."""
    base_dir = base_dir or base_of(run_dir)
    if base_dir is not None:
        params, manifest = run_params(run_dir, base_dir, allow_nonfinite=allow_nonfinite)
        with np.load(os.path.join(base_dir, converted.DEAD)) as npz:
            dead = {k: npz[k] for k in npz.files}
        return params, manifest, dead, os.path.join(base_dir, converted.VOCAB)
    read = weights.read(run_dir, tracker=True, allow_nonfinite=allow_nonfinite)
    manifest, dead = torch_layout.layout(read.model_cfg, read.tracker_cfg)
    manifest["trained"] = {"run": os.path.abspath(run_dir), "models": sorted(read.params), "base": None}
    return read.params, manifest, dead, read.vocab


def write_from_run(run_dir: str, base_dir: str | None, output_dir: str, *, overwrite: bool = False,
                   allow_nonfinite: bool = False) -> dict:
    """Writes `source` as the directory ``output_dir`` (atomically); returns the manifest. The output
    is checked before anything is read."""
    converted.check_output(output_dir, overwrite)
    params, manifest, dead, vocab = source(run_dir, base_dir, allow_nonfinite=allow_nonfinite)
    converted.write(output_dir, params, manifest=manifest, dead=dead, vocab_path=vocab, overwrite=overwrite)
    return manifest
