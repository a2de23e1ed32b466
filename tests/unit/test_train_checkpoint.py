"""Training checkpoints: state and data-iterator round trips, retention, a kill mid-save, init_from."""
import os
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sam3_jax.checkpoint import converted, restore, training
from sam3_jax.model import stacking


def _params(scale=1.0):
    return {"detector": {"w": scale * jnp.arange(12.0).reshape(3, 4), "frozen": {"b": jnp.ones((2,))}},
            "tracker": {"v": jnp.full((5,), 2.0 * scale, jnp.bfloat16)}}


def _state(step=7, scale=1.0):
    params = _params(scale)
    labels = {"detector": {"w": "train", "frozen": {"b": "zero"}}, "tracker": {"v": "train"}}
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.multi_transform({"train": optax.adamw(1e-3), "zero": optax.set_to_zero()}, labels))
    opt_state = tx.init(params)
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)  # non-trivial moments
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(step),
            "rng": jax.random.fold_in(jax.random.key(0, impl="rbg"), step)}


def _bits(tree):
    """Leaves as numpy (keys as their raw bits), for bitwise comparison."""
    def leaf(x):
        return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
    return jax.tree.map(leaf, tree)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(_bits(a)), jax.tree.leaves(_bits(b))):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset().batch(4))


def test_state_roundtrip_and_latest_step(tmp_path):
    state = _state()
    assert any(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(
        state["opt_state"], is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
    ckpt = training.Checkpointer(str(tmp_path), max_to_keep=3, async_save=True)
    abstract = jax.eval_shape(lambda: state)
    assert ckpt.latest_step() is None and ckpt.restore_latest(abstract) is None
    ckpt.save(7, state)
    ckpt.wait()
    assert ckpt.latest_step() == 7
    restored = ckpt.restore_latest(abstract)
    _assert_same(restored, state)
    assert str(jax.random.key_impl(restored["rng"])) == "rbg"
    device = jax.devices()[0]
    assert all(x.devices() == {device} for x in jax.tree.leaves(restored))
    ckpt.close()


def test_resuming_a_state_of_another_layout_says_how_to_reuse_its_params(tmp_path):
    ckpt = training.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, _state())
    abstract = jax.eval_shape(lambda: _state())
    abstract["opt_state"] = {"mu": {"rest/decay/float32": jax.ShapeDtypeStruct((12,), jnp.float32)}}
    with pytest.raises(ValueError, match=rf"checkpoint {tmp_path}/3 holds a train state of another layout.*"
                                         rf"--config.init_from={tmp_path} "):
        ckpt.restore_latest(abstract)
    ckpt.close()


def test_restore_onto_abstract_shardings(tmp_path):
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    state = _state()
    state["params"]["detector"]["w"] = jnp.arange(4.0 * len(jax.devices())).reshape(-1, 4)  # shardable
    ckpt = training.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state)

    def sharding(x):
        spec = P("data") if x.shape == state["params"]["detector"]["w"].shape else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    abstract = jax.tree.map(sharding, jax.eval_shape(lambda: state))
    restored = ckpt.restore_latest(abstract)
    _assert_same(restored, state)
    for x, a in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert x.sharding == a.sharding
    # what jax.eval_shape of the sharded state gives
    abstract["step"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh.abstract_mesh, P()))
    with pytest.raises(ValueError, match="^step: the abstract sharding is on an AbstractMesh"):
        ckpt.restore_latest(abstract)
    ckpt.close()


def test_data_iterator_position(tmp_path):
    ckpt = training.Checkpointer(str(tmp_path))
    iterator = _iterator()
    for _ in range(3):
        next(iterator)
    state = _state()
    ckpt.save(3, state, iterator)
    expected = [next(iterator) for _ in range(2)]
    ckpt.wait()
    fresh = _iterator()
    restored = ckpt.restore_latest(jax.eval_shape(lambda: state), fresh)
    _assert_same(restored, state)
    for batch in expected:
        np.testing.assert_array_equal(next(fresh), batch)
    ckpt.close()


def test_keeps_the_newest(tmp_path):
    ckpt = training.Checkpointer(str(tmp_path), max_to_keep=2)
    for step in range(1, 6):
        ckpt.save(step, _state(step), _iterator())
    ckpt.wait()
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]
    assert ckpt.latest_step() == 5
    ckpt.close()


_KILLED_SAVER = """
import sys, time
import jax.numpy as jnp
from sam3_jax.checkpoint import training

class StuckIterator:
    # grain's handler asks a non-Dataset iterator for get_state(); this one never answers, so the
    # step stays uncommitted while the state item is (being) written.
    def get_state(self):
        print("saving", flush=True)
        time.sleep(600)

ckpt = training.Checkpointer(sys.argv[1], async_save=True)
ckpt.save(1, {"x": jnp.ones((4,)), "big": jnp.zeros((8,))})
ckpt.wait()
ckpt.save(2, {"x": jnp.zeros((4,)), "big": jnp.ones((4 << 20,))}, StuckIterator())
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_KILLED_SAVER), str(tmp_path)],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path))  # step 2, in flight
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = training.Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 1
    abstract = {"x": jax.ShapeDtypeStruct((4,), jnp.float32), "big": jax.ShapeDtypeStruct((8,), jnp.float32)}
    restored = ckpt.restore_latest(abstract)
    np.testing.assert_array_equal(restored["x"], np.ones(4))
    ckpt.save(3, {"x": jnp.full((4,), 3.0), "big": jnp.zeros((8,))})
    ckpt.wait()
    assert ckpt.latest_step() == 3
    assert sorted(os.listdir(tmp_path)) == ["1", "3"]  # the temporary directory was removed before saving
    np.testing.assert_array_equal(ckpt.restore_latest(abstract)["x"], np.full(4, 3.0))
    ckpt.close()


def _abstract(tree):
    return jax.eval_shape(lambda: tree)


def test_load_params_from_converted_checkpoint(tmp_path):
    vocab = tmp_path / "vocab.txt.gz"
    vocab.write_bytes(b"")
    params = _params()
    converted.write(str(tmp_path / "converted"), jax.tree.map(np.asarray, params), manifest={}, dead={},
                    vocab_path=str(vocab))
    detector = restore.load_params(str(tmp_path / "converted"), {"detector": _abstract(params["detector"])})
    _assert_same(detector, {"detector": params["detector"]})
    both = restore.load_params(str(tmp_path / "converted"), _abstract(params))
    _assert_same(both, params)


def test_load_params_converts_the_stack_layouts(tmp_path):
    """A converted checkpoint stores every layer stack unrolled (``blocks_{i}``, ``resblocks_{i}``,
    ``layers_{i}``, the tracker's too); a run that scans them asks for the stacked layout, and a
    scanned run's checkpoint reads back unrolled, or scanned with some stacks unrolled."""
    vocab = tmp_path / "vocab.txt.gz"
    vocab.write_bytes(b"")
    rng = np.random.default_rng(0)

    def layers(prefix, n):
        return {f"{prefix}_{i}": {"attn": {"qkv": {"kernel": rng.normal(size=(3, 9)).astype(np.float32)}},
                                  "norm1": {"bias": rng.normal(size=3).astype(np.float32)}} for i in range(n)}

    trunk = {"ln_pre": {"scale": rng.normal(size=3).astype(np.float32)}, **layers("blocks", 6)}
    text = {"encoder": {"transformer": layers("resblocks", 4), "ln_final": {"scale": np.ones(3, np.float32)}}}
    unrolled = {"detector": {"backbone": {"vision_backbone": {"trunk": trunk}, "language_backbone": text},
                             "transformer": {"encoder": layers("layers", 2)}, "head": {"w": np.ones(2, np.float32)}},
                "tracker": {"transformer": {"encoder": layers("layers", 3)}}}
    every = {stacking.VIT: 3, stacking.TEXT: 1, stacking.FUSION_ENCODER: 1, stacking.MEMORY_ATTENTION: 1}
    scanned = jax.tree.map(np.asarray, stacking.relayout(unrolled, every))
    vision_only = jax.tree.map(np.asarray, stacking.relayout(unrolled, {stacking.VIT: 3}))
    det = scanned["detector"]
    assert det["backbone"]["vision_backbone"]["trunk"]["block_groups"]["blocks_2"]["norm1"]["bias"].shape == (2, 3)
    assert det["backbone"]["language_backbone"]["encoder"]["transformer"]["resblocks_scan"]["resblocks_0"][
        "norm1"]["bias"].shape == (4, 3)
    np.testing.assert_array_equal(det["transformer"]["encoder"]["layers_scan"]["layers_0"]["attn"]["qkv"]["kernel"][1],
                                  unrolled["detector"]["transformer"]["encoder"]["layers_1"]["attn"]["qkv"]["kernel"])
    assert stacking.layout(scanned) == every
    converted.write(str(tmp_path / "converted"), unrolled, manifest={}, dead={}, vocab_path=str(vocab))
    _assert_same(restore.load_params(str(tmp_path / "converted"), _abstract(scanned)), scanned)
    ckpt = training.Checkpointer(str(tmp_path / "run"), async_save=False)
    ckpt.save(1, {"params": scanned, "step": jnp.int32(1)})
    ckpt.close()
    for want in (unrolled, scanned, vision_only, {"detector": unrolled["detector"]}):
        _assert_same(restore.load_params(str(tmp_path / "run"), _abstract(want)), want)


def test_load_params_from_training_checkpoint(tmp_path):
    ckpt = training.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(1, _state(1, scale=1.0))
    ckpt.save(2, _state(2, scale=3.0))
    ckpt.close()
    expected = {"detector": _params(scale=3.0)["detector"]}
    for directory in (tmp_path, tmp_path / "checkpoints"):
        _assert_same(restore.load_params(str(directory), _abstract(expected)), expected)


def test_load_params_errors(tmp_path):
    ckpt = training.Checkpointer(str(tmp_path / "run"), async_save=False)
    ckpt.save(1, _state())
    ckpt.close()
    abstract = _abstract({"detector": _params()["detector"]})
    abstract["detector"]["w"] = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"detector/w: shape \(3, 4\) in the checkpoint, \(4, 4\) expected"):
        restore.load_params(str(tmp_path / "run"), abstract)
    with pytest.raises(ValueError, match=r"segmenter/w is not in the checkpoint"):
        restore.load_params(str(tmp_path / "run"), {"segmenter": {"w": jax.ShapeDtypeStruct((1,), jnp.float32)}})
    with pytest.raises(FileNotFoundError, match="missing"):
        restore.load_params(str(tmp_path / "missing"), abstract)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a converted checkpoint.*empty"):
        restore.load_params(str(tmp_path / "empty"), abstract)


def test_best_checkpoint_keeps_the_best_step_across_restarts(tmp_path):
    best = training.BestCheckpointer(str(tmp_path), "val_jf", "max", async_save=False)
    assert best.best() is None
    assert best.offer(1, 0.3, _state(1), _iterator())
    assert not best.offer(2, 0.2, _state(2)) and not best.offer(3, float("nan"), _state(3))
    assert best.offer(4, 0.5, _state(4, scale=2.0))
    assert sorted(os.listdir(tmp_path)) == ["4"] and best.best() == (4, 0.5)
    best.close()
    again = training.BestCheckpointer(str(tmp_path), "val_jf", "max", async_save=False)  # a resumed run
    assert not again.offer(5, 0.4, _state(5))
    assert again.offer(4, 0.6, _state(4, scale=3.0))  # the kept step, evaluated again, did better
    assert again.best() == (4, 0.6)
    _assert_same(again.restore_latest(jax.eval_shape(lambda: _state(4))), _state(4, scale=3.0))
    again.close()
    lowest = training.BestCheckpointer(str(tmp_path / "min"), "val_loss", "min", async_save=False)
    for step, loss in ((1, 2.0), (2, 1.0), (3, 1.5)):
        lowest.offer(step, loss, _state(step))
    assert lowest.best() == (2, 1.0) and os.listdir(tmp_path / "min") == ["2"]
    with pytest.raises(ValueError, match="max, min"):
        training.BestCheckpointer(str(tmp_path / "x"), "val_jf", "highest")
