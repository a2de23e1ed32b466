"""``layers.Conv`` (the memory encoder's convs, computed from shifted windows on a CPU) equals
``flax.linen.Conv`` with the same params: outputs and the gradients of input and kernel."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.nn.layers import Conv

CASES = {  # the memory encoder's kinds: stride-2 3x3 down-sampling, 1x1 projection, depthwise 7x7
    "strided": dict(cin=4, features=16, kernel=(3, 3), strides=2, padding=1, groups=1, size=(13, 10)),
    "pointwise": dict(cin=8, features=6, kernel=(1, 1), strides=1, padding=0, groups=1, size=(5, 7)),
    "depthwise": dict(cin=8, features=8, kernel=(7, 7), strides=1, padding=3, groups=8, size=(9, 11)),
}


@pytest.mark.parametrize("case", CASES)
def test_conv_equals_flax_conv(case):
    c = CASES[case]
    ours = Conv(c["features"], c["kernel"], strides=c["strides"], padding=c["padding"], feature_group_count=c["groups"])
    flax_conv = nn.Conv(c["features"], c["kernel"], strides=c["strides"], padding=[(c["padding"],) * 2] * 2,
                        feature_group_count=c["groups"])
    x = jax.random.normal(jax.random.key(0), (2, *c["size"], c["cin"]))
    params = ours.init(jax.random.key(1), x)["params"]
    params = {"kernel": params["kernel"], "bias": jax.random.normal(jax.random.key(2), params["bias"].shape)}
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_conv.init(jax.random.key(1), x)["params"])
    probe = jax.random.normal(jax.random.key(3), flax_conv.apply({"params": params}, x).shape)

    def loss(module, p, x):
        return jnp.sum(module.apply({"params": p}, x) * probe)

    np.testing.assert_allclose(ours.apply({"params": params}, x), flax_conv.apply({"params": params}, x),
                               rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(loss, argnums=(1, 2))(ours, params, x),
                         jax.grad(loss, argnums=(1, 2))(flax_conv, params, x)):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4 * np.abs(w).max())
