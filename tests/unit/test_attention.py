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
    monkeypatch.setattr(attention, "TILE_LOGITS_CPU", 1 << 20)
    q, k, v = _qkv(2, lq, 1000)
    mask = jax.random.bernoulli(jax.random.key(1), 0.3, (2, 1000))
    bias = jax.random.normal(jax.random.key(2), (2, 3, 1, 1000))  # per key, broadcast over queries
    heads, chunk, count = attention._tiles(6, lq, 1000, "cpu")
    assert heads == 1 and count >= 2 and chunk * count >= lq > chunk * (count - 1) and chunk * 1000 <= 1 << 20
    got = jax.jit(lambda *a: attention.attend(*a))(q, k, v, bias, mask)
    want = jax.jit(lambda *a: attention._softmax_attention(*a, q.shape[-1] ** -0.5))(q, k, v, bias, mask)
    assert got.shape == want.shape == (2, lq, 3, 8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=3e-6)


@pytest.mark.parametrize("heads, chunk, count", [(1, 300, 7), (6, 512, 4), (2, 2039, 1)])
def test_tiles_of_any_layout_take_a_per_query_bias(heads, chunk, count):
    """One (batch, head) pair a tile (CPUs) or several (accelerators), with a bias per query
    (boxRPB) that is tiled along with the queries."""
    q, k, v = _qkv(2, 2039, 1000)
    mask = jax.random.bernoulli(jax.random.key(1), 0.3, (2, 1000))
    bias = jax.random.normal(jax.random.key(2), (2, 3, 2039, 1000))
    got = attention._tiled_attention(q, k, v, bias, mask, 0.25, heads, chunk, count)
    want = attention._softmax_attention(q, k, v, bias, mask, 0.25)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=3e-6)


def test_tiles_have_the_same_gradients():
    q, k, v = _qkv(1, 576, 576)  # a ViT window: tiled per head, one chunk each
    assert attention._tiles(3, 576, 576, "cpu") == (1, 576, 1)
    grad = jax.jit(jax.grad(lambda *a: (attention.attend(*a) ** 2).sum(), argnums=(0, 1, 2)))
    want = jax.jit(jax.grad(lambda *a: (attention._softmax_attention(*a, None, None, 0.25) ** 2).sum(),
                            argnums=(0, 1, 2)))
    for g, w in zip(grad(q, k, v), want(q, k, v)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=2e-5 * float(jnp.abs(w).max()))


def test_tiled_dropout_drops_weights_and_the_backward_pass_sees_the_same_mask():
    """With one-hot values each output row is the row of dropped, rescaled weights; the gradient
    wrt the values is those weights transposed, which only holds if the rematerialised tiles of
    the backward pass draw the masks of the forward pass."""
    rate, lq, lk = 0.25, 1500, 64
    q, k, _ = _qkv(2, lq, lk, heads=2)
    v = jnp.broadcast_to(jnp.eye(lk)[None, :, None, :], (2, lk, 2, lk))
    rng = jax.random.wrap_key_data(jax.random.bits(jax.random.key(3), (4,), jnp.uint32), impl="unsafe_rbg")

    def run(v):
        return attention._tiled_attention(q, k, v, None, None, 0.25, 1, 500, 3, dropout_rate=rate, dropout_rng=rng)

    dropped = np.asarray(jax.jit(run)(v))  # (b, lq, h, lk)
    plain = np.asarray(attention._softmax_attention(q, k, v, None, None, 0.25))
    kept = dropped != 0
    assert abs(1 - kept.mean() - rate) < 0.01
    np.testing.assert_allclose(dropped[kept], plain[kept] / (1 - rate), rtol=1e-5)
    tiles = kept[0, :, 0].reshape(3, 500, lk)
    assert (tiles[0] != tiles[1]).mean() > 0.2  # each tile draws its own mask
    cotangent = jax.random.normal(jax.random.key(4), dropped.shape)
    grad_v = jax.jit(jax.grad(lambda v: (run(v) * cotangent).sum()))(v)
    want = np.einsum("bqhk,bqhd->bkhd", dropped, np.asarray(cotangent))
    np.testing.assert_allclose(np.asarray(grad_v), want, rtol=1e-4, atol=1e-4)


def test_the_backward_pass_holds_one_tile_of_logits_not_all(monkeypatch):
    """Compiled temporary memory of the gradient: bounded by the tiles, not by (B, H, Lq, Lk)."""
    monkeypatch.setattr(attention, "TILE_LOGITS_CPU", 1 << 18)
    q, k, v = _qkv(1, 2048, 2048, heads=2)
    mask = jnp.zeros((1, 2048), bool)
    fn = jax.grad(lambda *a: (attention.attend(*a) ** 2).sum(), argnums=(0, 1, 2))
    temp = jax.jit(fn).lower(q, k, v, None, mask).compile().memory_analysis().temp_size_in_bytes
    all_logits = 2 * 2048 * 2048 * 4
    assert temp < all_logits / 4, (temp, all_logits)


def test_tiling_applies_only_to_long_attention():
    assert attention._tiles(3, 200, 32, "cpu") is None  # text-sized: whole
    assert attention._tiles(3, 2304, 2048, "cpu")[0] == 1  # a CPU tile: one (batch, head) pair
    assert attention._tiles(64, 401, 5184, "gpu") is None  # under TILE_LOGITS: whole on accelerators
    heads, chunk, count = attention._tiles(64, 5184, 5184, "gpu")  # the fusion encoder, 8 frames
    assert heads == 64 and heads * chunk * 5184 <= attention.TILE_LOGITS + heads * 5184 and chunk * count >= 5184
