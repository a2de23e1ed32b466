"""Weights that hold NaN or Inf are refused, every such key named, wherever weights are read or written."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import traverse_util


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
