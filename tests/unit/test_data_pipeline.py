"""The Grain pipeline: schema-valid batches, determinism, resumption, mixing, sharding."""
import os
import shutil

import numpy as np
import pytest

from sam3_jax.data import config, pipeline, schema, synthetic

SYNTHETIC = dict(num_videos=6, num_frames=8, size=64, seed=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    synthetic.ensure(path, **SYNTHETIC)
    return path


def data_cfg(root, **kw):
    c = config.demo_config(root)
    c.synthetic.update(SYNTHETIC)
    c.image_size, c.batch_size = 32, 2
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def batches(c, n, seed=0, shard=(0, 1), state=None):
    it = iter(pipeline.build_dataset(c, seed=seed, shard_index=shard[0], shard_count=shard[1]))
    if state is not None:
        it.set_state(state)
    out = [next(it) for _ in range(n)]
    return out, it


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_follow_the_schema(root):
    c = data_cfg(root)
    out, _ = batches(c, 3)
    for b in out:
        schema.validate(b, schema.Dims.from_config(c))
        assert b["frames"].shape == (2, 4, 32, 32, 3)
        assert b["phrase_valid"].any() and b["object_valid"][:, 0].any()


def test_deterministic_by_seed(root):
    c = data_cfg(root)
    a, _ = batches(c, 3, seed=5)
    b, _ = batches(c, 3, seed=5)
    for x, y in zip(a, b):
        assert_same(x, y)
    d, _ = batches(c, 3, seed=6)
    assert any(not np.array_equal(x["frames"], y["frames"]) for x, y in zip(a, d))


@pytest.mark.parametrize("workers", [0, 1, pytest.param(2, marks=pytest.mark.slow)])
def test_restored_iterator_continues_the_stream(root, workers):
    c = data_cfg(root, num_workers=workers)
    uninterrupted, _ = batches(c, 5)
    first, it = batches(c, 2)
    state = it.get_state()
    if workers:
        it.close()
    resumed, it2 = batches(c, 3, state=state)
    if workers:
        it2.close()
    for x, y in zip(uninterrupted, first + resumed):
        assert_same(x, y)


def test_mixing_follows_the_weights(root):
    c = data_cfg(root, batch_size=1, image_size=16)
    c.sources.second = config.source_config(
        "davis", f"{root}/davis/JPEGImages", f"{root}/davis/Annotations", phrase="object",
        weight=3.0)
    c.sources.demo.weight = 1.0
    out, _ = batches(c, 40)
    index = np.concatenate([b["dataset_index"] for b in out])
    assert (index == 1).sum() == 30 and (index == 0).sum() == 10
    phrases = {int(i): b["phrase_valid"].sum() for b in out for i in b["dataset_index"]}
    assert phrases[1] == 1  # davis: the one class-agnostic phrase


def test_hosts_read_disjoint_shards(root):
    c = data_cfg(root, batch_size=1, image_size=16)
    c.sources.demo.file_list = ""
    c.sampling.reverse_prob = 0.0
    first = [batches(c, 3, shard=(i, 2))[0] for i in range(2)]
    videos = [[int(b["video_index"][0]) for b in f] for f in first]
    assert set(videos[0]).isdisjoint(videos[1])


def test_skipped_count_reaches_the_batch_through_workers(root, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    os.remove(f"{copy}/ytvis/JPEGImages/synth_0002/00003.jpg")
    open(f"{copy}/ytvis/JPEGImages/synth_0002/00003.jpg", "wb").write(b"\xff\xd8 truncated")
    c = data_cfg(copy, image_size=16, batch_size=4, num_workers=1)
    c.sources.demo.file_list = ""
    c.sampling.stride_min = c.sampling.stride_max = 1
    out, it = batches(c, 6)
    it.close()
    assert sum(int(b["skipped"].sum()) for b in out) > 0
    c.on_error, c.num_workers = "raise", 1
    with pytest.raises(Exception, match="00003.jpg"):
        batches(c, 6)
