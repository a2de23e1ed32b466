"""Parameters and optimiser state sharded over the mesh (``mesh.shard_params``, FSDP) train as the
replicated ones do: on 8 CPU devices (data=2 x frame=4), three steps of the tiny joint model (layer
stacks scanned, as the official configs run them) give the same losses and parameters, each device
holds a shard of the large leaves and their Adam moments, and a sharded run's checkpoint resumes
on another mesh (or starts a replicated run with ``init_from``)."""
import json
import os
from unittest import mock

import jax
import numpy as np
import pytest

from sam3_jax.train import config as config_lib
from sam3_jax.train import loop, param_groups, sharding

pytestmark = pytest.mark.slow


def _config(tmp_path, shard: bool, total_steps: int = 3):
    c = config_lib.video_config("tracker_demo")
    c.mode = "joint"
    c.data.synthetic.output_dir = str(tmp_path / "videos")
    c.data.update(dict(num_frames=4, batch_size=2, max_phrases=2, max_objects=4, num_workers=0))
    c.mesh.update(dict(data=2, frame=4, shard_params=shard))
    c.update(dict(total_steps=total_steps, log_every=1, checkpoint_every=3, checkpoint_async=False,
                  overlay_every=0))
    c.eval.every = 0
    return c


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _spec(x):
    return tuple(x.sharding.spec)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    out = {}
    # The tiny model's leaves are small: shard down to 1024 elements, so that most of them are.
    with mock.patch.object(sharding, "MIN_SHARDED", 1024):
        for shard in (False, True):
            workdir = str(tmp / f"shard_{shard}")
            trainer = loop.Trainer(_config(tmp, shard), workdir)
            trainer.run()
            out[shard] = (workdir, trainer)
    return tmp, out


def test_sharded_equals_replicated(runs):
    _, out = runs
    (rep_dir, rep), (sh_dir, sh) = out[False], out[True]
    np.testing.assert_allclose(list(_losses(sh_dir).values()), list(_losses(rep_dir).values()), rtol=1e-5)
    a, b = param_groups.by_path(rep.state["params"]), param_groups.by_path(sh.state["params"])
    for path in a:
        np.testing.assert_allclose(np.asarray(b[path]), np.asarray(a[path]), rtol=1e-4, atol=1e-6, err_msg=path)


def test_large_leaves_and_their_moments_are_sharded(runs):
    _, out = runs
    rep, sh = out[False][1], out[True][1]
    params = param_groups.by_path(sh.state["params"])
    kernel = "detector/backbone/vision_backbone/trunk/block_groups/blocks_0/mlp/fc1/kernel"
    assert _spec(params[kernel])[0] is None  # the scanned layer axis stays whole
    assert ("data", "frame") in _spec(params[kernel])
    shard_shape = params[kernel].addressable_shards[0].data.shape
    assert np.prod(shard_shape) * 8 == np.prod(params[kernel].shape)
    moments = [x for x in jax.tree.leaves(sh.state["opt_state"]) if getattr(x, "shape", ()) == params[kernel].shape]
    assert moments and all(_spec(m) == _spec(params[kernel]) for m in moments)  # mu and nu follow it
    assert all(_spec(x) == () or all(s is None for s in _spec(x)) for x in jax.tree.leaves(rep.state["params"]))

    def device_bytes(state):
        return sum(s.data.nbytes for x in jax.tree.leaves(state) if hasattr(x, "addressable_shards")
                   for s in x.addressable_shards if s.device == jax.devices()[0])

    assert device_bytes(sh.state) < 0.3 * device_bytes(rep.state)


def test_sharded_checkpoint_resumes_on_another_mesh(runs):
    """8-way shards written on a 2 x 4 mesh, restored as 4-way shards on a 2 x 2 mesh of 4 devices."""
    tmp, out = runs
    sh_dir, sh = out[True]
    config = _config(tmp, shard=True, total_steps=4)
    config.mesh.update(dict(data=-1, frame=2))
    with mock.patch.object(sharding, "MIN_SHARDED", 1024):
        resumed = loop.Trainer(config, sh_dir)
    assert int(resumed.state["step"]) == 3 and resumed.mesh.size == 4
    a, b = param_groups.by_path(sh.state["params"]), param_groups.by_path(resumed.state["params"])
    for path in a:
        np.testing.assert_array_equal(np.asarray(b[path]), np.asarray(a[path]), err_msg=path)
    kernel = b["detector/backbone/vision_backbone/trunk/block_groups/blocks_0/mlp/fc1/kernel"]
    assert np.prod(kernel.addressable_shards[0].data.shape) * 4 == np.prod(kernel.shape)


def test_sharded_run_starts_a_replicated_one(runs, tmp_path):
    """The optimiser state of a sharded run is kept leaf by leaf, a replicated run's in packed
    vectors: resuming across is refused with the way out, whose parameters then start the new run."""
    tmp, out = runs
    sh_dir, sh = out[True]
    with pytest.raises(ValueError, match="holds a train state of another layout.*--config.init_from="):
        loop.Trainer(_config(tmp, shard=False, total_steps=4), sh_dir)
    config = _config(tmp, shard=False)
    config.init_from = sh_dir
    started = loop.Trainer(config, str(tmp_path / "replicated"))
    a, b = param_groups.by_path(sh.state["params"]), param_groups.by_path(started.state["params"])
    for path in a:
        assert all(s is None for s in _spec(b[path]))
        np.testing.assert_array_equal(np.asarray(b[path]), np.asarray(a[path]), err_msg=path)
