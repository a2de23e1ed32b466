"""The parameter sharding rules (`sam3_jax.train.sharding`): which leaves are split, along which dimension."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sam3_jax.train import mesh as mesh_lib
from sam3_jax.train import optim, sharding

AXES = ("data", "frame")


@pytest.mark.parametrize("path, shape, spec", [
    ("detector/x/kernel", (1024, 4096), P(None, AXES)),  # the largest dimension the devices divide
    ("detector/x/kernel", (4096, 1024), P(AXES)),
    ("detector/x/kernel", (1000, 1024), P(None, AXES)),  # 1000 is not divided by 8
    ("detector/x/kernel", (1001, 1003), P()),  # no dimension is: replicated
    ("detector/x/bias", (65536,), P()),  # biases and norm scales stay whole
    ("detector/norm/scale", (65536,), P()),
    ("detector/x/kernel", (64, 64), P()),  # under MIN_SHARDED elements
    # a scanned stack's layer axis is never split, however large
    ("detector/backbone/vision_backbone/trunk/block_groups/blocks_0/mlp/fc1/kernel", (4096, 1024, 16), P(None, AXES)),
    ("tracker/transformer/encoder/layers_scan/layers_0/linear1/kernel", (8, 256, 2048), P(None, None, AXES)),
])
def test_leaf_spec(path, shape, spec):
    assert sharding.leaf_spec(path, shape, 8, AXES) == spec


def test_one_device_replicates_everything():
    assert sharding.leaf_spec("detector/x/kernel", (1024, 4096), 1, AXES) == P()


def test_sharded_bytes_and_gather():
    mesh = mesh_lib.make_mesh(2, 4)
    params = {"w": jax.ShapeDtypeStruct((64, 1024), jnp.float32), "b": jax.ShapeDtypeStruct((1024,), jnp.float32)}
    specs = sharding.param_specs(params, mesh, shard=True)
    assert specs == {"w": P(None, AXES), "b": P()}
    assert sharding.sharded_bytes(params, specs, mesh) == (65 * 4096, 8 * 4096 + 4096)
    assert sharding.param_specs(params, mesh, shard=False) == {"w": P(), "b": P()}

    w = jax.device_put(jnp.arange(64 * 1024, dtype=jnp.float32).reshape(64, 1024),
                       jax.sharding.NamedSharding(mesh, specs["w"]))
    with jax.set_mesh(mesh):
        whole, grad = jax.jit(jax.value_and_grad(lambda w: jnp.sum(sharding.gather({"w": w})["w"] ** 2) / 2))(w)
    assert tuple(grad.sharding.spec) == tuple(specs["w"])  # the gradient comes back sharded as its parameter
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(w))


def test_unfused_packing_keeps_leaves():
    """With sharded parameters the optimiser works leaf by leaf (no concatenation across shards)
    and computes what the fused packing does."""
    cfg = optim.default_config()
    params = {"detector": {"a": {"kernel": jnp.ones((4, 3))}, "b": {"bias": jnp.arange(5.0)}}}
    fused, unfused = optim.Packing(params, cfg), optim.Packing(params, cfg, fuse=False)
    packed = unfused.pack(params)
    assert set(packed) == {"detector/a/kernel", "detector/b/bias"}
    assert packed["detector/a/kernel"].shape == (4, 3)
    assert float(unfused.norm(params)) == pytest.approx(float(fused.norm(params)))
    grads = jax.tree.map(lambda x: x * 0.5, params)
    tx = [optim.make_optimizer(cfg, params, 10, fuse=f) for f in (True, False)]
    updates = [t.update(grads, t.init(params), params)[0] for t in tx]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), *updates)
