"""The torch <-> Flax key map: one generic rule, and the few named exceptions.

Our Flax modules mirror the reference's module tree (docs/architecture.md,
'The parameter tree mirrors the reference'), so a torch key becomes a Flax path mechanically:
  * ``a.b.3.c`` -> ``a / b_3 / c`` (ModuleList / Sequential indices join their parent's name);
  * leaf ``weight`` -> ``kernel`` (Linear, Conv), ``scale`` (LayerNorm, GroupNorm) or ``embedding``
    (Embedding), whichever the target module has; ``in_proj_weight`` -> ``in_proj_kernel``;
    any other leaf (``bias``, raw parameters such as ``pos_embed``) keeps its name;
  * tensors: Linear (out, in) -> (in, out); Conv (out, in, kh, kw) -> (kh, kw, in, out);
    ConvTranspose (in, out, kh, kw) -> (kh, kw, in, out) for the keys in ``CONV_TRANSPOSE``.
Named exceptions: ``RECOMPUTED`` buffers (checked, not stored) and ``DEAD`` weights the reference
holds but never uses (kept aside for export, not trained).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from flax import traverse_util

from sam3_jax.model import stacking

CONV_TRANSPOSE = re.compile(r"(^|\.)(dconv_2x2(_[01])?|output_upscaling\.[03])\.weight$")

# Buffers recomputed from the config (the converter checks them against the stored values).
RECOMPUTED = {
    "rope": re.compile(r"(^|\.)attn\.freqs_cis$"),
}

# Weights present in the official checkpoint that no forward pass reads (docs/reference_model.md, 'Checkpoint').
DEAD = {
    "neck level 0.5 (dropped by scalp=1)": re.compile(r"(^|\.)(sam2_)?convs\.3\."),
    "third pixel-decoder stage (only two are used)": re.compile(r"(^|\.)pixel_decoder\.(conv_layers|norms)\.2\."),
    "text_projection (pool_type='none')": re.compile(r"(^|\.)encoder\.text_projection$"),
    "tracker no_mem_pos_enc (the memory-less path adds no_mem_embed only)": re.compile(r"(^|\.)no_mem_pos_enc$"),
}


def dead_reason(key: str) -> str | None:
    for reason, pattern in DEAD.items():
        if pattern.search(key):
            return reason
    return None


def recomputed_reason(key: str) -> str | None:
    for reason, pattern in RECOMPUTED.items():
        if pattern.search(key):
            return reason
    return None


def module_path(torch_key: str) -> tuple[str, ...]:
    """``a.layers.0.linear1.weight`` -> ``("a", "layers_0", "linear1", "weight")`` (leaf not renamed)."""
    out: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


_LEAF_CANDIDATES = {
    "weight": ("kernel", "scale", "embedding"),
    "in_proj_weight": ("in_proj_kernel",),
}


def flax_path(torch_key: str, flax_paths) -> tuple[str, ...] | None:
    """The Flax path of a torch key, given the set of paths that exist in the target tree."""
    path = module_path(torch_key)
    for leaf in _LEAF_CANDIDATES.get(path[-1], (path[-1],)):
        candidate = path[:-1] + (leaf,)
        if candidate in flax_paths:
            return candidate
    return None


# Module names of the reference that end in ``_<digit>`` themselves (not a ModuleList index joined
# to its parent's name), which `torch_key` must keep whole.
_NAMES_WITH_INDEX = re.compile(r"dconv_2x2_[01]|ln_[12]")
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "in_proj_kernel": "in_proj_weight"}


def torch_key(path: tuple[str, ...]) -> str:
    """The torch key of a Flax path: the inverse of `flax_path` (``("a", "layers_0", "kernel")`` ->
    ``a.layers.0.weight``), for a model no torch file was converted into."""
    parts = []
    for name in path[:-1]:
        module, _, index = name.rpartition("_")
        if module and index.isdigit() and not _NAMES_WITH_INDEX.fullmatch(name):
            parts += [module, index]
        else:
            parts.append(name)
    return ".".join(parts + [_TORCH_LEAF.get(path[-1], path[-1])])


def to_flax(torch_key: str, leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf in ("kernel", "in_proj_kernel"):
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(2, 3, 0, 1) if CONV_TRANSPOSE.search(torch_key) else value.transpose(2, 3, 1, 0)
    return value


def to_torch(torch_key: str, leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf in ("kernel", "in_proj_kernel"):
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(2, 3, 0, 1) if CONV_TRANSPOSE.search(torch_key) else value.transpose(3, 2, 0, 1)
    return value


class ConversionError(ValueError):
    """Raised with the complete list of problems, never just the first one."""


@dataclass
class Conversion:
    params: dict
    fate: dict[str, str] = field(default_factory=dict)  # torch key -> what became of it
    dead: dict[str, np.ndarray] = field(default_factory=dict)  # kept aside for export
    recomputed: dict[str, np.ndarray] = field(default_factory=dict)  # stored values, for checking


def convert(state_dict: dict[str, np.ndarray], abstract_params, *, source: str = "state_dict",
            consume: bool = False) -> Conversion:
    """Maps every key of ``state_dict`` onto ``abstract_params`` (a tree of arrays or ShapeDtypeStructs).

    The keys name layers one by one (``blocks.3``); a layer stack that ``abstract_params`` holds
    scanned is mapped in that torch layout, then stacked (``stacking``): the params come back in
    the layout of ``abstract_params``, the ``fate`` paths in the torch layout.

    Raises ConversionError listing every unmapped, missing, shape-mismatched key, and every integer or
    bool tensor mapped onto a floating-point parameter (casting would hide a quantised or damaged
    file; the converter never guesses a scale). With
    ``consume`` entries are popped from ``state_dict`` as they are converted, so a large checkpoint
    is never held twice.
    """
    layout = abstract_params
    targets = traverse_util.flatten_dict(stacking.unrolled_shapes(abstract_params))
    flat: dict = {}
    result = Conversion(params={})
    unmapped, mismatched, wrong_dtype = [], [], []
    for key in list(state_dict):
        value = state_dict.pop(key) if consume else state_dict[key]
        if (reason := recomputed_reason(key)) is not None:
            result.recomputed[key] = value
            result.fate[key] = f"recomputed ({reason})"
            continue
        if (reason := dead_reason(key)) is not None:
            result.dead[key] = value
            result.fate[key] = f"dead, kept for export ({reason})"
            continue
        path = flax_path(key, targets)
        if path is None:
            unmapped.append(f"{key} {tuple(value.shape)}")
            continue
        converted = np.ascontiguousarray(to_flax(key, path[-1], np.asarray(value)))
        want = tuple(targets[path].shape)
        if converted.shape != want:
            mismatched.append(f"{key} {tuple(value.shape)} -> {'/'.join(path)} expects {want}")
            continue
        if not np.issubdtype(converted.dtype, np.floating):  # e.g. quantised or damaged: not cast silently
            wrong_dtype.append(f"{key} {converted.dtype} -> {'/'.join(path)} is {np.dtype(targets[path].dtype)}")
            continue
        flat[path] = converted.astype(targets[path].dtype, copy=False)
        del value
        result.fate[key] = "mapped to " + "/".join(path)
    missing = ["/".join(p) + f" {tuple(targets[p].shape)}" for p in targets if p not in flat]
    if unmapped or missing or mismatched or wrong_dtype:
        lines = [f"cannot convert {source}:"]
        for title, items in (("torch keys with no Flax parameter", unmapped),
                             ("Flax parameters with no torch key", missing),
                             ("shape mismatches", mismatched),
                             ("integer or bool tensors where a float parameter goes", wrong_dtype)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        raise ConversionError("\n".join(lines))
    result.params = stacking.stacked_like(traverse_util.unflatten_dict(flat), layout, owned=consume)
    return result
