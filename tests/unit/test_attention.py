"""``nn.attention.attend``: on a CPU, long attention goes by query chunks; it must be the same function."""
import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax.nn import attention


def _qkv(lq, lk, heads=2, dim=16):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(k1, (1, lq, heads, dim)), jax.random.normal(k2, (1, lk, heads, dim)),
            jax.random.normal(k3, (1, lk, heads, dim)))


def test_query_chunks_equal_whole_attention():
    q, k, v = _qkv(2304, 2048)  # 4.7M (query, key) pairs: over the chunking threshold
    mask = jax.random.bernoulli(jax.random.key(1), 0.3, (1, 2048))
    bias = jax.random.normal(jax.random.key(2), (1, 2, 1, 2048))  # per key, broadcast over queries
    assert attention._query_chunk(q, k, bias, dropout=False) == 768  # largest divisor of 2304 up to 1024
    got = jax.jit(lambda *a: attention.attend(*a))(q, k, v, bias, mask)
    want = jax.jit(lambda *a: attention._softmax_attention(*a, q.shape[-1] ** -0.5))(q, k, v, bias, mask)
    assert got.shape == want.shape == (1, 2304, 2, 16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


def test_chunking_applies_only_where_it_is_the_same_function():
    q, k, _ = _qkv(2304, 2048)
    per_query_bias = jnp.zeros((1, 2, 2304, 2048))
    assert attention._query_chunk(q, k, per_query_bias, dropout=False) is None  # would need chunking too
    assert attention._query_chunk(q, k, None, dropout=True) is None  # dropout draws over the whole matrix
    short_q, short_k, _ = _qkv(576, 576)
    assert attention._query_chunk(short_q, short_k, None, dropout=False) is None  # windowed blocks: whole
