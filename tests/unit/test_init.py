"""The reference initialisation drawn from parameter shapes alone (`model.init.reference_init`)."""
import re

import jax
import numpy as np
import pytest
from flax import traverse_util

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


def test_scanned_stacks_get_the_rules_of_one_layer():
    """Every scanned stack (the detector's and the tracker's memory attention) initialises each
    stacked leaf by the rule of the torch layer's leaf (the unrolled layout): bounds from one
    layer's shape, not the stacked one's."""
    cfg, tracker = ModelConfig.tiny(), TrackerConfig.tiny()

    def rules(params):
        flat = traverse_util.flatten_dict(params)
        shapes = {p: stacking.layer_shape(p, x.shape) for p, x in flat.items()}
        return {"/".join(p): init.rule_for(p, shapes) for p in flat}

    seen = set()
    for scanned_params in (detector.abstract_params(cfg), tracker_lib.abstract_params(tracker)):
        unrolled = rules(stacking.unrolled_shapes(scanned_params))
        for path, rule in rules(scanned_params).items():
            for s in stacking.STACKS:  # the first group's layer j is unrolled layer j
                if s.stacked in path:
                    seen.add(s.stacked)
                    path = re.sub(rf"{s.stacked}/({s.prefix}_\d+)/", r"\1/", path)
            assert rule == unrolled[path], path
    assert seen == {s.stacked for s in stacking.STACKS}
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
