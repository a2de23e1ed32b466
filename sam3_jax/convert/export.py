"""Converted checkpoint -> PyTorch state_dict with exactly the keys of the original ``sam3.pt``.

The inverse of ``sam3_checkpoint.convert_file``: every manifest entry "mapped to <path>" names the
Flax parameter a torch key came from (so the inverse needs no second copy of the path rule), dead
weights come back from ``dead_weights.npz``, and the ViT's RoPE ``freqs_cis`` buffers are recomputed
from the config: our float32 angles (``rope.axial_angles``, computed as the reference does) through
``torch.polar``, which reproduces the reference's complex64 tables bit for bit at every size
(``rope.axial_cis``, via float64 ``exp``, differs from them in the last bit, up to 6e-8, at
official size). ``export_params`` takes any params with the checkpoint's tree (e.g. fine-tuned
ones), which is what lets a model trained here be deployed with Meta's tools.
"""
from __future__ import annotations

import os

import numpy as np
from flax import traverse_util

from sam3_jax import fileio
from sam3_jax.checkpoint import converted, finite
from sam3_jax.convert import from_run, keymap, sam3_checkpoint, torch_io
from sam3_jax.model import stacking
from sam3_jax.nn import rope

MAPPED = "mapped to "


def export_params(params: dict, manifest: dict, dead: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``params`` ({"detector": ..., ["tracker": ...]}) -> torch state_dict of the manifest's keys.

    Raises ConversionError listing every key it cannot fill and every parameter no key reads."""
    cfg, _ = converted.configs(manifest)
    params = stacking.unrolled(params)  # the torch layout
    flat = traverse_util.flatten_dict(params)
    used, problems, out = set(), [], {}
    for key, fate in manifest["keys"].items():
        root, _, local = key.partition(".")
        if fate.startswith(MAPPED):
            path = (root,) + tuple(fate[len(MAPPED):].split("/"))
            if path not in flat:
                problems.append(f"{key}: no parameter {'/'.join(path)}")
                continue
            used.add(path)
            out[key] = np.ascontiguousarray(keymap.to_torch(local, path[-1], np.asarray(flat[path])))
        elif fate.startswith("dead"):
            if key not in dead:
                problems.append(f"{key}: missing from {converted.DEAD}")
                continue
            out[key] = np.asarray(dead[key])
        elif fate.startswith("recomputed"):
            args = sam3_checkpoint.rope_args(local, cfg)
            if args is None:
                problems.append(f"{key}: no rule recomputes this buffer")
                continue
            out[key] = _freqs_cis(*args)
        else:
            problems.append(f"{key}: unknown fate {fate!r}")
    unused = ["/".join(p) for p in flat if p not in used]
    if problems or unused:
        lines = ["cannot export to torch:"]
        for title, items in (("torch keys that cannot be filled", problems),
                             ("parameters no torch key reads", unused)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        raise keymap.ConversionError("\n".join(lines))
    return out


def _freqs_cis(*args) -> np.ndarray:
    import torch

    angles = torch.from_numpy(rope.axial_angles(*args))
    return torch.polar(torch.ones_like(angles), angles).numpy()


def export_checkpoint(checkpoint_dir: str, params: dict | None = None) -> dict[str, np.ndarray]:
    """The state_dict of a converted checkpoint directory (its own params unless ``params`` is given)."""
    manifest = converted.read_manifest(checkpoint_dir)
    if params is None:
        abstract = converted.abstract_params(*converted.configs(manifest))
        params = converted.read_params(checkpoint_dir, abstract)
    with np.load(os.path.join(checkpoint_dir, converted.DEAD)) as npz:
        dead = {k: npz[k] for k in npz.files}
    return export_params(params, manifest, dead)


def write_torch(checkpoint_dir: str, torch_ckpt: str, params: dict | None = None, *, overwrite: bool = False,
                allow_nonfinite: bool = False) -> int:
    """Writes ``{"model": state_dict}`` to ``torch_ckpt`` atomically, each tensor in the dtype the
    source file had; returns the number of keys. ``checkpoint_dir``: a converted checkpoint, or a
    training run (its workdir or one of its checkpoints) exported as `from_run.source` gives it (the
    layout of the converted checkpoint it started from, or of its sizes). An existing ``torch_ckpt`` is
    refused, before any work, unless ``overwrite``; tensors holding NaN or Inf are refused, all
    named, unless ``allow_nonfinite``."""
    fileio.check_output(torch_ckpt, overwrite, directory=False)
    if params is None and not os.path.isfile(os.path.join(checkpoint_dir, converted.MANIFEST)):
        params, manifest, dead, _ = from_run.source(checkpoint_dir, allow_nonfinite=allow_nonfinite)
        state_dict = export_params(params, manifest, dead)
    else:
        manifest, state_dict = converted.read_manifest(checkpoint_dir), export_checkpoint(checkpoint_dir, params)
    finite.check_finite(state_dict, checkpoint_dir, allow=allow_nonfinite, hint=sam3_checkpoint.ALLOW_HINT)
    dtypes = manifest.get("source_dtypes", {})
    torch_io.write_state_dict(state_dict, torch_ckpt, dtypes)
    return len(state_dict)
