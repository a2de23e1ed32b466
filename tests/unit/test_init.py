"""The reference initialisation drawn from parameter shapes alone (`model.init.reference_init`)."""
import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import traverse_util

from sam3_jax.model import detector, init, stacking
from sam3_jax.model.config import ModelConfig


def test_scanned_vit_blocks_get_the_reference_rules():
    """With ``vit.scan_blocks`` the blocks are stacked under ``block_groups``: their kernels are
    N(0, 0.02) and their biases zero, as the unrolled blocks'."""
    cfg = ModelConfig.tiny()
    cfg = cfg.replace(vit=dataclasses.replace(cfg.vit, scan_blocks=True))
    trunk = detector.init_params(cfg, jax.random.key(0))["backbone"]["vision_backbone"]["trunk"]
    fc1 = trunk["block_groups"]["blocks_0"]["mlp"]["fc1"]
    assert fc1["kernel"].ndim == 3
    assert abs(float(np.std(fc1["kernel"])) - 0.02) < 0.002
    assert not np.any(np.asarray(fc1["bias"]))


def test_scanned_stacks_get_the_rules_of_one_layer():
    """Every scanned stack (ViT, text encoder, fusion encoder) initialises each stacked leaf by the
    rule of the unrolled layer's leaf: bounds from one layer's shape, not the stacked one's."""
    cfg = ModelConfig.tiny()
    scanned = stacking.set_scans(cfg, True)

    def rules(c):
        flat = traverse_util.flatten_dict(detector.abstract_params(c))
        shapes = {p: stacking.layer_shape(p, x.shape) for p, x in flat.items()}
        return {"/".join(p): init.rule_for(p, shapes) for p in flat}

    unrolled = rules(cfg)
    compared = 0
    for path, rule in rules(scanned).items():
        for s in stacking.STACKS:  # the first group's layer j is unrolled layer j
            path = re.sub(rf"{s.stacked}/({s.prefix}_\d+)/", r"\1/", path)
        assert rule == unrolled[path], path
        compared += 1
    assert compared < len(unrolled)  # the stacks hold fewer leaves than the unrolled layers
    stacked = detector.init_params(scanned, jax.random.key(0))["transformer"]["encoder"]["layers_scan"]["layers_0"]
    kernel = np.asarray(stacked["self_attn"]["in_proj_kernel"])  # Xavier of one (d, 3d) matrix
    bound = np.sqrt(6.0 / sum(kernel.shape[1:]))
    assert kernel.shape[0] == cfg.encoder.num_layers and np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.9 * bound and not np.allclose(kernel[0], kernel[1])


def test_draws_are_independent_across_leaves_and_deterministic():
    cfg = ModelConfig.tiny()
    a = detector.init_params(cfg, jax.random.key(0))
    b = detector.init_params(cfg, jax.random.key(0))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    blocks = a["backbone"]["vision_backbone"]["trunk"]
    k0, k1 = blocks["blocks_0"]["mlp"]["fc1"]["kernel"], blocks["blocks_1"]["mlp"]["fc1"]["kernel"]
    assert abs(float(np.corrcoef(np.ravel(k0), np.ravel(k1))[0, 1])) < 0.05


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
