"""From-scratch initialisation against the reference's freshly built modules: for every tensor of
the official state_dict, our initialiser (moved through the converter's key map) must give the
same constants, or random values of the same spread and family (uniform or normal)."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from sam3_jax.convert import keymap
from sam3_jax.model import detector, stacking
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker import tracker as tracker_lib
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.testing import reference
from sam3_jax.testing.parity import state_dict_numpy

pytestmark = pytest.mark.parity

# Tensors the reference allocates with torch.empty and never initialises: nothing to compare.
UNINITIALISED = ("language_backbone.encoder.positional_embedding",)


def _is_uniform(x: np.ndarray) -> bool:
    """Max/std is sqrt(3) for a uniform sample; a normal sample of >= 1000 draws exceeds 3."""
    return float(np.abs(x).max() / x.std()) < 1.8


def init_mismatches(torch_state: dict, params) -> list[str]:
    """Every tensor whose initial values do not match the reference's in kind, constant or spread (each
    layer of a stack on its own, in the torch layout)."""
    flat = traverse_util.flatten_dict(stacking.unrolled(jax.device_get(params)))
    problems = []
    for key, want in torch_state.items():
        if keymap.dead_reason(key) or keymap.recomputed_reason(key) or key.endswith(UNINITIALISED):
            continue
        path = keymap.flax_path(key, flat)
        assert path is not None, key
        got = keymap.to_torch(key, path[-1], np.asarray(flat[path], np.float64))
        want = np.asarray(want, np.float64)
        if want.size == 1 and want.flat[0] not in (0.0, 1.0):
            continue  # one random draw (a 1-output bias): nothing to compare
        if want.min() == want.max():  # a constant: the same one
            if not np.array_equal(got, want):
                problems.append(f"{key}: want constant {want.flat[0]}, got values in [{got.min():.3g}, {got.max():.3g}]")
            continue
        if got.min() == got.max():
            problems.append(f"{key}: want random (std {want.std():.3g}), got constant {got.flat[0]}")
            continue
        n = want.size
        tol = max(0.1, 3.0 / np.sqrt(n))  # the sample std's relative error is <= 0.7 / sqrt(n)
        ratio = got.std() / want.std()
        if abs(ratio - 1) > tol:
            problems.append(f"{key} {want.shape}: std {got.std():.4g}, reference {want.std():.4g}")
        elif n >= 1000 and _is_uniform(got) != _is_uniform(want):
            kinds = {True: "uniform", False: "normal"}
            problems.append(f"{key}: {kinds[_is_uniform(got)]}, reference {kinds[_is_uniform(want)]}")
    return problems


def test_detector_init_matches_reference(ref):
    cfg = ModelConfig.tiny()
    ref.torch.manual_seed(0)
    state = state_dict_numpy(reference.build_image_model(cfg))
    assert init_mismatches(state, detector.init_params(cfg, jax.random.key(0))) == []


def test_tracker_init_matches_reference(ref):
    cfg = TrackerConfig.tiny()
    state = state_dict_numpy(reference.build_tracker(cfg, randomize=False))
    state.pop("no_mem_pos_enc")  # never read by the reference: the converter keeps it aside
    assert init_mismatches(state, tracker_lib.init_params(cfg, jax.random.key(0))) == []
