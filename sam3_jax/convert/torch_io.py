"""Reading and writing PyTorch checkpoint files (the only place besides tests that imports torch).

Each tensor of a loaded file has its own storage, so the converter can free them one by one as it
converts (``keymap.convert(consume=True)``) and a 3.4 GB ``sam3.pt`` is never held twice.
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np

from sam3_jax import fileio


class CheckpointFormatError(ValueError):
    """The file is not a SAM 3 checkpoint (or is damaged); the message says what it looks like."""


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading a PyTorch checkpoint needs torch (pip install torch)") from e
    return torch


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Loads ``{"model": sd}`` or a bare state_dict; strips a DDP ``module.`` prefix.

    Returns the arrays and the source dtype of every floating tensor that was not float32 (a
    half-precision copy of ``sam3.pt``): those are widened to float32, which is exact, so that the
    params are float32 masters as always, and export narrows them back to what the file had."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torch checkpoint not found: {path}")
    torch = _torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, not a torch file at all
        raise CheckpointFormatError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointFormatError(f"{path}: expected a state_dict (or {{'model': state_dict}}), got {type(obj).__name__}")
    out, dtypes = {}, {}
    for key, value in obj.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if not hasattr(value, "numpy"):
            raise CheckpointFormatError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and value.dtype != torch.float32:
            dtypes[key] = str(value.dtype).removeprefix("torch.")
            value = value.float()
        out[key] = value.detach().numpy()
    return out, dtypes


def describe_prefixes(keys) -> str:
    counts = Counter(k.split(".")[0] for k in keys)
    return ", ".join(f"{p}.* ({n})" for p, n in counts.most_common(8))


def check_is_sam3(keys, path: str) -> None:
    """Fails with a message naming what the file looks like when it is not SAM 3."""
    keys = list(keys)
    if any(k.startswith("detector.backbone.vision_backbone.trunk.") for k in keys):
        return
    if any(k.startswith(("image_encoder.trunk.", "memory_attention.")) for k in keys):
        raise CheckpointFormatError(
            f"{path}: this looks like a SAM 2 checkpoint (image_encoder/memory_attention keys); "
            "SAM 3 keys start with detector.* and tracker.*")
    raise CheckpointFormatError(
        f"{path}: not a SAM 3 checkpoint: no detector.backbone.vision_backbone.trunk.* keys; "
        f"top-level prefixes found: {describe_prefixes(keys) or 'none (empty state_dict)'}")


def write_state_dict(state_dict: dict[str, np.ndarray], path: str, dtypes: dict[str, str] | None = None) -> None:
    """Writes ``{"model": sd}`` atomically (``fileio.atomic_file``); the keys
    of ``dtypes`` are cast to the torch dtype named there (see ``read_state_dict``)."""
    torch = _torch()
    dtypes = dtypes or {}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    tensors.update({k: tensors[k].to(getattr(torch, name)) for k, name in dtypes.items()})
    with fileio.atomic_file(path) as tmp:
        torch.save({"model": tensors}, tmp)
