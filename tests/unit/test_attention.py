"""``nn.attention.attend``: on a CPU, long attention goes by (batch, head, query chunk) tiles; it must
be the same function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.nn import attention


def _qkv(b, lq, lk, heads=3, dim=16, dim_v=8):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(k1, (b, lq, heads, dim)), jax.random.normal(k2, (b, lk, heads, dim)),
            jax.random.normal(k3, (b, lk, heads, dim_v)))


@pytest.mark.parametrize("lq", [2304, 2039])  # a prime length pads its last chunk
def test_tiles_equal_whole_attention(lq, monkeypatch):
    monkeypatch.setattr(attention, "TILE_LOGITS", 1 << 20)
    q, k, v = _qkv(2, lq, 1000)
    mask = jax.random.bernoulli(jax.random.key(1), 0.3, (2, 1000))
    bias = jax.random.normal(jax.random.key(2), (2, 3, 1, 1000))  # per key, broadcast over queries
    chunk, count = attention._tiles(q, k, bias, dropout=False)
    assert count >= 2 and chunk * count >= lq > chunk * (count - 1) and chunk * 1000 <= 1 << 20
    got = jax.jit(lambda *a: attention.attend(*a))(q, k, v, bias, mask)
    want = jax.jit(lambda *a: attention._softmax_attention(*a, q.shape[-1] ** -0.5))(q, k, v, bias, mask)
    assert got.shape == want.shape == (2, lq, 3, 8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=3e-6)


def test_tiles_have_the_same_gradients():
    q, k, v = _qkv(1, 576, 576)  # a ViT window: tiled per head, one chunk each
    assert attention._tiles(q, k, None, dropout=False) == (576, 1)
    grad = jax.jit(jax.grad(lambda *a: (attention.attend(*a) ** 2).sum(), argnums=(0, 1, 2)))
    want = jax.jit(jax.grad(lambda *a: (attention._softmax_attention(*a, None, None, 0.25) ** 2).sum(),
                            argnums=(0, 1, 2)))
    for g, w in zip(grad(q, k, v), want(q, k, v)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=2e-5 * float(jnp.abs(w).max()))


def test_tiling_applies_only_where_it_is_the_same_function():
    q, k, _ = _qkv(1, 2304, 2048)
    per_query_bias = jnp.zeros((1, 3, 2304, 2048))
    assert attention._tiles(q, k, per_query_bias, dropout=False) is None  # would need tiling too
    assert attention._tiles(q, k, None, dropout=True) is None  # dropout draws over the whole matrix
    short_q, short_k, _ = _qkv(1, 200, 32)
    assert attention._tiles(short_q, short_k, None, dropout=False) is None  # text-sized: whole
