"""A training run's directory is a checkpoint the predictors read: its newest step, its best one or a
named step, with the sizes the trainer wrote to model.json; a model the run did not train comes as
the run started it (its init_from's, else its own random initialisation); and what is not a
checkpoint is named in one line."""
import json

import jax
import numpy as np
import pytest

from sam3_jax.checkpoint import converted, training, weights
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tokenizer import DEFAULT_BPE_PATH
from sam3_jax.model.tracker import tracker as tracker_lib
from sam3_jax.model.tracker.config import TrackerConfig

MCFG, TCFG = ModelConfig.tiny(), TrackerConfig.tiny()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(directory, params) of a converted tiny checkpoint with seeded random parameters."""
    abstract = converted.abstract_params(MCFG, TCFG)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)
    out = tmp_path_factory.mktemp("base") / "tiny"
    manifest = {"model_config": converted.config_to_json(MCFG), "tracker_config": converted.config_to_json(TCFG)}
    converted.write(str(out), jax.tree.map(np.copy, params), manifest=manifest, dead={}, vocab_path=DEFAULT_BPE_PATH)
    return str(out), params


def _run(workdir, detector_by_step: dict, init_from: str = "", seed: int = 3, best: tuple | None = None):
    """A workdir as train.py leaves it for a detector run: config.json, model.json and checkpoints of
    the detector's parameters (scanned, as the trainer stores them), and optionally a best one."""
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"init_from": init_from, "seed": seed}))
    weights.write_run_models(str(workdir), MCFG, TCFG)
    for directory, steps in (("checkpoints", detector_by_step), ("checkpoints_best", dict([best] if best else []))):
        manager = training.Checkpointer(str(workdir / directory), async_save=False)
        for step, detector in steps.items():
            manager.save(step, {"params": {"detector": detector}, "step": np.int32(step)})
        manager.close()
    return str(workdir)


def _same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def test_the_newest_the_best_or_a_named_step_of_a_run(base, tmp_path):
    _, params = base
    plus = {k: jax.tree.map(lambda x, k=k: x + k, params["detector"]) for k in (1, 2, 3)}
    run = _run(tmp_path / "run", {4: plus[1], 8: plus[2]}, best=(6, plus[3]))
    for directory, want in ((run, plus[2]), (f"{run}/checkpoints", plus[2]), (f"{run}/checkpoints/4", plus[1]),
                            (f"{run}/checkpoints_best", plus[3])):
        read = weights.read(directory, tracker=False)
        assert read.params.keys() == {"detector"} and read.vocab == DEFAULT_BPE_PATH
        assert read.model_cfg == MCFG and read.tracker_cfg == TCFG
        _same(read.params, {"detector": want})


def test_the_model_a_run_did_not_train_is_the_one_it_started_from(base, tmp_path):
    directory, params = base
    tuned = jax.tree.map(lambda x: x + 1, params["detector"])
    from_scratch = weights.read(_run(tmp_path / "scratch", {2: tuned}, seed=3), tracker=True)
    _same({"detector": from_scratch.params["detector"]}, {"detector": tuned})
    fresh = tracker_lib.init_params(TCFG, jax.random.split(jax.random.key(3))[1])
    _same({"tracker": from_scratch.params["tracker"]}, {"tracker": fresh})  # the trainer's own draw for seed 3
    fine_tuned = weights.read(_run(tmp_path / "tuned", {2: tuned}, init_from=directory), tracker=True)
    _same(fine_tuned.params, {"detector": tuned, "tracker": params["tracker"]})


def test_what_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: neither a converted checkpoint \(manifest.json\) nor a "
                                                r"training run's directory \(model.json beside config.json"):
        weights.read(str(tmp_path / "empty"), tracker=False)
    run = _run(tmp_path / "started", {})
    with pytest.raises(FileNotFoundError, match="started: the run has written no checkpoint yet"):
        weights.read(run, tracker=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.read(str(tmp_path / "missing"), tracker=False)
