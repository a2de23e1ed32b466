"""The geometry prompt encoder against the reference's ``SequenceGeometryEncoder`` (builder arguments,
tiny sizes): boxes and points with padding, a batch element without any prompt, both labels."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.model.config import ModelConfig
from sam3_jax.model.geometry import SequenceGeometryEncoder
from sam3_jax.testing.parity import flax_params, max_abs_diff, randomize_, t2n

pytestmark = pytest.mark.parity
TOL = 1e-5
CFG = ModelConfig.tiny()


def reference_encoder(ref, d_model, cfg):
    """``model_builder._create_geometry_encoder`` with the sizes of ``cfg``."""
    from sam3.model.encoder import TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder as TorchEncoder
    from sam3.model.model_misc import MultiheadAttentionWrapper
    from sam3.model.position_encoding import PositionEmbeddingSine

    def mha():
        return MultiheadAttentionWrapper(num_heads=cfg.num_heads, dropout=cfg.dropout, embed_dim=d_model,
                                         batch_first=False)

    layer = TransformerEncoderLayer(
        activation="relu", d_model=d_model, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
        pos_enc_at_attn=False, pre_norm=True, self_attention=mha(), pos_enc_at_cross_attn_queries=False,
        pos_enc_at_cross_attn_keys=True, cross_attention=mha())
    return TorchEncoder(
        pos_enc=PositionEmbeddingSine(num_pos_feats=d_model, normalize=True, scale=None, temperature=10000),
        encode_boxes_as_points=False, points_direct_project=True, points_pool=True, points_pos_enc=True,
        boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True, d_model=d_model,
        num_layers=cfg.num_layers, layer=layer, roi_size=cfg.roi_size, use_act_ckpt=True, add_cls=True,
        add_post_encode_proj=True).eval()


def right_padded(counts, n):
    return np.arange(n)[None, :] >= np.asarray(counts)[:, None]


def make_inputs(seed, box_counts, point_counts, nb, np_, hw, d):
    rng = np.random.default_rng(seed)
    b = len(box_counts)
    centre = rng.uniform(0.1, 0.9, (b, nb, 2))
    size = rng.uniform(0.02, 0.9, (b, nb, 2))
    size[0, :1] = [1.0, 0.95]  # the whole map: 11 samples per bin at 72x72
    boxes = np.concatenate([centre, size], -1).astype(np.float32)
    box_mask = right_padded(box_counts, nb)
    boxes[box_mask] = rng.uniform(-5, 5, (box_mask.sum(), 4))  # padding must not leak
    points = rng.uniform(-0.05, 1.05, (b, np_, 2)).astype(np.float32)  # some just outside the image
    point_mask = right_padded(point_counts, np_)
    return {
        "boxes": boxes, "box_mask": box_mask, "box_labels": rng.integers(0, 2, (b, nb)).astype(np.int32),
        "points": points, "point_mask": point_mask, "point_labels": rng.integers(0, 2, (b, np_)).astype(np.int32),
        "img_feat": rng.normal(size=(b, hw, hw, d)).astype(np.float32),
        "img_pos": rng.normal(size=(b, hw, hw, d)).astype(np.float32),
    }


def run_reference(ref, t_enc, x):
    from sam3.model.geometry_encoders import Prompt

    torch = ref.torch

    def seq_first(a):
        return torch.tensor(np.ascontiguousarray(np.swapaxes(a, 0, 1)))

    b, h, w, d = x["img_feat"].shape
    prompt = Prompt(box_embeddings=seq_first(x["boxes"]), box_mask=torch.tensor(x["box_mask"]),
                    box_labels=seq_first(x["box_labels"]).long(), point_embeddings=seq_first(x["points"]),
                    point_mask=torch.tensor(x["point_mask"]), point_labels=seq_first(x["point_labels"]).long())

    def tokens(a):  # (B, H, W, C) -> seq-first (HW, B, C)
        return seq_first(a.reshape(b, h * w, d))

    with torch.no_grad():
        feats, mask = t_enc(prompt, [tokens(x["img_feat"])], [(h, w)], [tokens(x["img_pos"])])
    return t2n(feats).swapaxes(0, 1), mask.numpy()


CASES = {
    # 72² as in the model: boxes up to the whole map; one element with no prompt at all.
    "72x72": {"seed": 0, "box_counts": [4, 2, 0], "point_counts": [1, 3, 0], "nb": 4, "np_": 3, "hw": 72},
    "8x8_boxes_only": {"seed": 1, "box_counts": [3, 1], "point_counts": [0, 0], "nb": 3, "np_": 0, "hw": 8},
    "8x8_no_prompts": {"seed": 2, "box_counts": [0, 0], "point_counts": [0, 0], "nb": 0, "np_": 0, "hw": 8},
}


@pytest.mark.parametrize("case", list(CASES))
def test_geometry_encoder(ref, case):
    d, cfg = CFG.d_model, CFG.geometry
    t_enc = reference_encoder(ref, d, cfg)
    randomize_(t_enc, seed=0)
    x = make_inputs(d=d, **CASES[case])
    want, want_mask = run_reference(ref, t_enc, x)

    enc = SequenceGeometryEncoder(cfg, d)
    params = flax_params(t_enc, enc, **x)
    got, got_mask = jax.jit(lambda p, x: enc.apply({"params": p}, **x))(params, x)
    np.testing.assert_array_equal(np.asarray(got_mask), want_mask)
    valid = ~want_mask
    assert valid.sum() == sum(CASES[case]["box_counts"]) + sum(CASES[case]["point_counts"]) + len(valid)
    err = max_abs_diff(np.asarray(got)[valid], want[valid])
    assert err <= TOL, err
    assert np.isfinite(np.asarray(got)).all()


def test_geometry_encoder_dropout():
    d, cfg = CFG.d_model, dataclasses.replace(CFG.geometry, num_layers=1)  # one layer: faster to compile
    x = make_inputs(d=d, **CASES["8x8_boxes_only"])
    enc = SequenceGeometryEncoder(cfg, d)
    params = jax.jit(enc.init)(jax.random.key(0), **x)["params"]

    @jax.jit
    def run(p, rng):
        def loss(p):
            out = enc.apply({"params": p}, **x, deterministic=False, rngs={"dropout": rng})[0]
            return jnp.sum(out ** 2), out
        return jax.grad(loss, has_aux=True)(p)

    grads, a = run(params, jax.random.key(1))
    _, b = run(params, jax.random.key(2))
    assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
