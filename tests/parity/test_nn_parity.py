"""Shared layers against their PyTorch counterparts: MHA, MLP, RoPE, sine position encodings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.nn import attention, layers, position, rope
from sam3_jax.testing.parity import flax_params, max_abs_diff, randomize_, t2n

pytestmark = pytest.mark.parity
TOL = 1e-5


@pytest.mark.parametrize("with_bias", [False, True])
def test_multihead_attention(ref, with_bias):
    torch = ref.torch
    t_mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    randomize_(t_mha, seed=0)
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 5, 32)).astype(np.float32), rng.normal(size=(2, 7, 32)).astype(np.float32)
    v = rng.normal(size=(2, 7, 32)).astype(np.float32)
    pad = np.zeros((2, 7), bool)
    pad[1, 5:] = True
    bias = rng.normal(size=(2, 4, 5, 7)).astype(np.float32) if with_bias else None
    with torch.no_grad():
        out = t_mha(torch.tensor(q), torch.tensor(k), torch.tensor(v), key_padding_mask=torch.tensor(pad),
                    attn_mask=None if bias is None else torch.tensor(bias.reshape(8, 5, 7)), need_weights=False)[0]
    mha = attention.MultiheadAttention(32, 4)
    params = flax_params(t_mha, mha, q, k, v)
    got = mha.apply({"params": params}, q, k, v, None if bias is None else jnp.asarray(bias), jnp.asarray(pad))
    assert max_abs_diff(got, t2n(out)) < TOL


def test_mlp_residual_out_norm(ref):
    from sam3.model.model_misc import MLP

    torch = ref.torch
    t_mlp = MLP(16, 48, 16, 3, residual=True, out_norm=torch.nn.LayerNorm(16)).eval()
    randomize_(t_mlp, seed=1)
    x = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    mlp = layers.MLP(48, 16, 3, residual=True, out_norm=True)
    params = flax_params(t_mlp, mlp, x)
    with torch.no_grad():
        want = t2n(t_mlp(torch.tensor(x)))
    assert max_abs_diff(mlp.apply({"params": params}, x), want) < TOL


def test_conv_transpose_2x2(ref):
    torch = ref.torch
    t_ct = torch.nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2)
    randomize_(t_ct, seed=2)
    x = np.random.default_rng(2).normal(size=(2, 6, 3, 5)).astype(np.float32)
    with torch.no_grad():
        want = t2n(t_ct(torch.tensor(x))).transpose(0, 2, 3, 1)
    ct = layers.ConvTranspose2x2(4)
    x_nhwc = x.transpose(0, 2, 3, 1)
    # The conv-transpose rule is keyed on the reference's names; wrap the weights under one of them.
    from sam3_jax.convert import keymap

    abstract = jax.eval_shape(lambda: ct.init(jax.random.key(0), x_nhwc))["params"]
    sd = {f"dconv_2x2.{k}": v.detach().numpy() for k, v in t_ct.state_dict().items()}
    params = keymap.convert(sd, {"dconv_2x2": abstract}).params["dconv_2x2"]
    assert max_abs_diff(ct.apply({"params": params}, x_nhwc), want) < TOL


def test_rope_tables_and_rotation(ref):
    from sam3.model.vitdet import apply_rotary_enc, compute_axial_cis

    torch = ref.torch
    for n, scale in [(4, 1.0), (8, 0.5), (24, 1.0)]:
        want = compute_axial_cis(16, n, n, theta=10000.0, scale_pos=scale).numpy()
        got = rope.axial_cis(16, n, n, 10000.0, scale)
        assert np.max(np.abs(got - want)) < 1e-5
    cis = compute_axial_cis(16, 4, 4)
    x = np.random.default_rng(3).normal(size=(2, 3, 16, 16)).astype(np.float32)  # (B, H, N, D)
    want_q, _ = apply_rotary_enc(torch.tensor(x), torch.tensor(x), cis)
    got = rope.apply_rope(jnp.asarray(x), rope.axial_angles(16, 4, 4))
    assert max_abs_diff(got, t2n(want_q)) < TOL


def test_sine_position_encodings(ref):
    from sam3.model.model_misc import gen_sineembed_for_position
    from sam3.model.position_encoding import PositionEmbeddingSine

    torch = ref.torch
    pe = PositionEmbeddingSine(64, normalize=True)
    want = t2n(pe(torch.zeros(1, 3, 5, 7)))[0].transpose(1, 2, 0)
    assert max_abs_diff(position.sine_map(5, 7, 64), want) < TOL

    boxes = np.random.default_rng(4).uniform(size=(6, 4)).astype(np.float32)
    b = torch.tensor(boxes)
    want = t2n(pe.encode_boxes(b[:, 0], b[:, 1], b[:, 2], b[:, 3]))
    assert max_abs_diff(position.encode_boxes(jnp.asarray(boxes), 64), want) < TOL

    want = t2n(gen_sineembed_for_position(b[:, None, :], 128))[:, 0]
    assert max_abs_diff(position.sine_embed_for_position(jnp.asarray(boxes), 128), want) < TOL
