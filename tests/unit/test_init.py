"""The reference initialisation drawn from parameter shapes alone (`model.init.reference_init`)."""

import jax
import numpy as np
import pytest

from sam3_jax.model import detector, init, stacking
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker import tracker as tracker_lib
from sam3_jax.model.tracker.config import TrackerConfig


def test_scanned_vit_blocks_get_the_reference_rules():
    """The blocks are stacked under ``block_groups``: their kernels are N(0, 0.02) and their biases
    zero, as the reference's blocks'."""
    cfg = ModelConfig.tiny()
    trunk = detector.init_params(cfg, jax.random.key(0))["backbone"]["vision_backbone"]["trunk"]
    fc1 = trunk["block_groups"]["blocks_0"]["mlp"]["fc1"]
    assert fc1["kernel"].ndim == 3
    assert abs(float(np.std(fc1["kernel"])) - 0.02) < 0.002
    assert not np.any(np.asarray(fc1["bias"]))


def test_scanned_stacks_get_the_rules_and_values_of_the_torch_layers():
    """A model's initial values do not depend on its layout: the stacked tree (the detector's and the
    tracker's) holds, layer by layer, what the torch layout draws, each layer by its own rule (bounds
    from one layer's shape, not the stacked one's)."""
    cfg, tracker = ModelConfig.tiny(), TrackerConfig.tiny()
    key = jax.random.key(0)
    modules = tracker_lib.Tracker(tracker).init(key, method=tracker_lib.Tracker.all_paths)["params"]  # raw gammas
    for layout, torch_layout in ((detector.abstract_params(cfg), stacking.unrolled_shapes(detector.abstract_params(cfg))),
                                 (modules, stacking.unrolled(modules))):
        assert stacking.scanned_stacks(layout)
        got = stacking.unrolled(jax.jit(lambda r, t=layout: init.reference_init(t, r))(key))
        want = jax.jit(lambda r, t=torch_layout: init.reference_init(t, r))(key)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    stacked = detector.init_params(cfg, jax.random.key(0))
    kernel = np.asarray(stacked["transformer"]["encoder"]["layers_scan"]["layers_0"]["self_attn"]["in_proj_kernel"])
    bound = np.sqrt(6.0 / sum(kernel.shape[1:]))  # Xavier of one (d, 3d) matrix
    assert kernel.shape[0] == cfg.encoder.num_layers and np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.9 * bound and not np.allclose(kernel[0], kernel[1])


def test_draws_are_independent_across_leaves_and_deterministic():
    cfg = ModelConfig.tiny()
    a = detector.init_params(cfg, jax.random.key(0))
    b = detector.init_params(cfg, jax.random.key(0))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    blocks = a["backbone"]["vision_backbone"]["trunk"]["block_groups"]  # torch blocks 0, 1 and 2
    k0, k1 = blocks["blocks_0"]["mlp"]["fc1"]["kernel"][0], blocks["blocks_1"]["mlp"]["fc1"]["kernel"][0]
    k2 = blocks["blocks_0"]["mlp"]["fc1"]["kernel"][1]
    for x, y in ((k0, k1), (k0, k2)):
        assert abs(float(np.corrcoef(np.ravel(x), np.ravel(y))[0, 1])) < 0.05


def test_abstract_leaf_without_a_rule_is_named():
    abstract = {"layer": {"gamma": jax.ShapeDtypeStruct((4,), np.float32)}}
    with pytest.raises(ValueError, match="layer/gamma"):
        init.reference_init(abstract, jax.random.key(0))


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_large_draws_go_block_by_block(kind, monkeypatch):
    """Past ``DRAW_BLOCK`` values a draw is made a block at a time: exactly ``total`` values, each block
    its own (not a repeat), the distribution unchanged, deterministic; up to one block it is the
    single draw it always was (the tiny models' values do not change)."""
    key = jax.random.key(3)
    single = np.asarray(init._draw(kind, key, 900))
    monkeypatch.setattr(init, "DRAW_BLOCK", 1000)
    np.testing.assert_array_equal(np.asarray(init._draw(kind, key, 900)), single)
    x = np.asarray(init._draw(kind, key, 25_500))
    assert x.shape == (25_500,)
    np.testing.assert_array_equal(x, np.asarray(init._draw(kind, key, 25_500)))
    assert not np.array_equal(x[:1000], x[1000:2000])
    mean, std = (0.0, 1.0) if kind == "normal" else (0.0, 1 / np.sqrt(3))
    assert abs(x.mean() - mean) < 0.03 and abs(x.std() - std) < 0.03
    if kind == "uniform":
        assert x.min() >= -1.0 and x.max() < 1.0
