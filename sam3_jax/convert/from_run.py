"""A training run's parameters as a converted checkpoint directory, so that a fine-tuned model goes
wherever a converted one goes: the predictors, ``init_from`` and the export to a PyTorch ``sam3.pt``.

The run's checkpoints hold parameters and optimiser state but none of what the export needs beside
them (the key map, the dead weights, the source dtypes, the vocabulary), so those come from the
converted checkpoint the run started from (or any converted checkpoint of the same sizes). Every
layer stack is written unrolled, the layout of a converted checkpoint, however the run scanned it.
"""
from __future__ import annotations

import os

import numpy as np

from sam3_jax.convert import checkpoint, sam3_checkpoint
from sam3_jax.train import checkpoint as run_checkpoint


def write_from_run(run_dir: str, base_dir: str, output_dir: str, *, overwrite: bool = False,
                   allow_nonfinite: bool = False) -> dict:
    """Writes ``output_dir`` (atomically): the newest parameters of ``run_dir`` (a workdir or its
    ``checkpoints``) for each model the run holds (detector, tracker), ``base_dir``'s for a model it
    does not, and ``base_dir``'s manifest, dead weights and vocabulary. Returns the manifest, which
    records both sources under ``"trained"``. A parameter of another shape than the base's is an
    error naming it; so are parameters holding NaN or Inf, unless ``allow_nonfinite``. The output is
    checked before anything is read."""
    checkpoint.check_output(output_dir, overwrite)
    manifest = checkpoint.read_manifest(base_dir)
    abstract = sam3_checkpoint.abstract_params(*sam3_checkpoint.configs(manifest))
    trained = sorted(run_checkpoint.stored_models(run_dir) & set(abstract))
    if not trained:
        raise ValueError(f"{run_dir}: holds no parameters of the models of {base_dir} ({', '.join(sorted(abstract))})")
    params = run_checkpoint.load_params(run_dir, {k: abstract[k] for k in trained})
    kept = {k: v for k, v in abstract.items() if k not in trained}
    if kept:
        params.update(run_checkpoint.load_params(base_dir, kept))
    checkpoint.check_finite(params, run_dir, allow=allow_nonfinite, hint=sam3_checkpoint.ALLOW_HINT)
    with np.load(os.path.join(base_dir, checkpoint.DEAD)) as npz:
        dead = {k: npz[k] for k in npz.files}
    manifest = {**manifest, "trained": {"run": os.path.abspath(run_dir), "models": trained,
                                        "base": os.path.abspath(base_dir)}}
    checkpoint.write(output_dir, params, manifest=manifest, dead=dead,
                     vocab_path=os.path.join(base_dir, checkpoint.VOCAB), overwrite=overwrite)
    return manifest
