"""Step 1 of our real train step against Meta's training forward pass, same weights, same clip.

Ours: ``program.build(config, mesh).train_step`` (what ``train.py`` runs) from the demo variant of
``configs/video.py`` in detector mode on a 1-device mesh. The reference: ``Sam3Image`` in training
mode with its matcher, ``Sam3LossWrapper`` with the fine-tuning loss weights, then ``backward``
(``sam3_jax.testing.train_reference``). Its weights are seeded noise, moved into our params by our
converter; the clip is one of the generated demo videos. Dropout and drop-path are off on both
sides, so the two are the same function: every loss term and the global norm of the trainable
gradients (before clipping) must agree.

Then two real train steps from the same weights: step 2 must run on what step 1's update wrote.

``SAM3_TRAIN_PARITY_SIZE=official`` runs all of it at the official size (1 frame, 1 phrase, the
trainer's scanned layer stacks; the train steps in bfloat16 as the default variant trains): run
it alone, each side needs most of a 24 GiB machine (benchmarks/README.md has its figures). The
suite runs its step-1 comparisons at that size too, in a child process (``test_train_step_official.py``).
"""
import dataclasses
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.model import detector
from sam3_jax.model.config import ModelConfig
from sam3_jax.train import config as config_lib
from sam3_jax.train import mesh as mesh_lib
from sam3_jax.train import optim
from sam3_jax.train import program as program_lib
from sam3_jax.train import sharding
from sam3_jax.train import step as step_lib

pytestmark = pytest.mark.parity

SIZE = os.environ.get("SAM3_TRAIN_PARITY_SIZE", "tiny")
# frames, phrases, objects per clip; pad_n_queries of the CE mean (the tiny decoder has 16 queries).
CLIP = {"tiny": dict(frames=2, phrases=2, objects=3, pad_n_queries=None),
        "official": dict(frames=1, phrases=1, objects=3, pad_n_queries=200)}[SIZE]
SEED = 9  # at the tiny size, weights whose final layer has one-to-many matches (o2m box and mask terms)
# Metrics of the step that are not loss terms.
NOT_TERMS = ("loss", "grad_norm", "finite", "num_boxes", "num_queries", "skipped_samples")
# Relative errors seen: at most 8e-7 (loss terms) and 4e-7 (gradient norm) at the tiny size, 5.0e-6
# and 5.4e-6 at the official size (48 terms).
RTOL_TERMS = {"tiny": 5e-6, "official": 5e-5}[SIZE]
RTOL_GRAD_NORM = {"tiny": 5e-6, "official": 5e-5}[SIZE]


def without_randomness(cfg: ModelConfig, float32: bool = True) -> ModelConfig:
    """Dropout and drop-path off (and float32 compute)."""
    d = dataclasses.asdict(cfg.replace(compute_dtype="float32") if float32 else cfg)
    for part in ("encoder", "decoder", "geometry"):
        d[part]["dropout"] = 0.0
    d["vit"]["drop_path_rate"] = 0.0
    return ModelConfig.from_dict(d)


def train_config(trains: bool = False):
    """``configs/video.py``'s demo variant (tiny) or default (official), detector mode, one clip on
    one device, the model without randomness, in float32 (``trains``: in the variant's compute dtype)."""
    if SIZE == "official":
        config = config_lib.video_config("default")
        model = without_randomness(config_lib.official_model(), float32=not trains)  # scanned, as it trains
    else:
        config = config_lib.video_config("demo")
        model = without_randomness(ModelConfig.from_dict(config.model.to_dict()), float32=not trains)
    config.model = config_lib.as_config(model)
    config.mode = "detector"
    config.loss.pad_n_queries = CLIP["pad_n_queries"]
    config.data.image_size = model.image_size
    config.data.num_frames, config.data.batch_size = CLIP["frames"], 1
    config.data.max_phrases, config.data.max_objects = CLIP["phrases"], CLIP["objects"]
    config.mesh.update(dict(data=1, frame=1, shard_params=False))
    return config


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from sam3_jax.testing.train_reference import demo_clip

    cfg = train_config()
    batch = demo_clip(cfg.data.image_size, CLIP["frames"], CLIP["phrases"], CLIP["objects"],
                      str(tmp_path_factory.mktemp("videos")))
    positives = batch["query_positives"] & batch["object_valid"][:, :, None, :]
    assert positives.any() and batch["phrase_valid"].all()  # targets to match, every phrase a query
    return batch


@pytest.fixture(scope="module")
def reference_step(ref, clip, tmp_path_factory):
    """The reference's step 1, in a child process: its loss dict, the global gradient norm and the
    file holding its weights."""
    from sam3_jax.testing import train_reference

    cfg = program_lib.model_config(train_config())
    out = str(tmp_path_factory.mktemp("reference_step"))
    step = train_reference.step_one_in_child(cfg, clip, out, pad_n_queries=CLIP["pad_n_queries"], seed=SEED)
    return types.SimpleNamespace(terms=step["terms"], grad_norm=step["grad_norm"],
                                 weights=os.path.join(out, "weights.npz"))


def reference_params(path: str, cfg: ModelConfig) -> dict:
    """The reference's weights (``weights.npz``) as the trainer's params, converted key by key so
    the weights are held once."""
    from sam3_jax.convert import keymap

    with np.load(path) as f:
        return {"detector": keymap.convert(dict(f), detector.abstract_params(cfg), consume=True).params}


@pytest.fixture(scope="module")
def our_step(reference_step, clip):
    """Step 1's metrics on the reference's weights: the loss and terms of the trainer's loss function
    and the norm of its gradients as the train step computes them (``step.make_loss_fn``,
    ``optim.Packing.norm``), without the optimiser, whose state the official size cannot add here."""
    config = train_config()
    mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
    prog = program_lib.build(config, mesh)
    # On the device, the host copy dropped (official size, a probe of this function on random weights:
    # peak RSS 16.05 GiB, 19.0 with the copy kept).
    params = jax.device_put(reference_params(reference_step.weights, prog.model_cfg))
    batch = mesh_lib.shard_batch(mesh, {k: v for k, v in clip.items() if k != "phrase_text"})
    with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
        loss_fn = step_lib.make_loss_fn(prog.model_cfg, prog.loss_cfg, mesh, detect=True)
        norm = optim.Packing(prog.abstract_params, config.optim).norm

        @jax.jit
        def metrics(p, b):
            (loss, aux), grads = jax.value_and_grad(
                lambda q: loss_fn(q, b, jax.random.key(config.seed)), has_aux=True)(p)
            norm_ = norm(grads)
            return {"loss": loss, **aux["terms"], "grad_norm": norm_, "num_boxes": aux["num_boxes"],
                    "finite": jnp.isfinite(loss) & jnp.isfinite(norm_)}

        out = jax.device_get(metrics(params, batch))
    return {k: float(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def our_train_steps(reference_step, clip, our_step):
    """Two steps of the trainer's compiled train step (``program.build(...).train_step``) from the
    reference's weights, in the compute dtype the variant trains in (official: bfloat16), warmup
    off so that step 1 updates the weights: each step's metrics."""
    config = train_config(trains=True)
    config.optim.warmup_steps = 0
    mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
    prog = program_lib.build(config, mesh)
    params = reference_params(reference_step.weights, prog.model_cfg)
    batch = mesh_lib.shard_batch(mesh, {k: v for k, v in clip.items() if k != "phrase_text"})
    steps = []
    with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
        state = jax.jit(lambda p: step_lib.init_state(p, prog.tx, config.seed),
                        out_shardings=sharding.shardings(prog.abstract_state))(params)
        del params
        for _ in range(2):
            state, metrics = prog.train_step(state, batch)
            steps.append({k: float(v) for k, v in jax.device_get(metrics).items() if not k.startswith("lr/")})
    return steps


def reference_terms(want: dict) -> dict:
    """The reference's loss terms under our names: it also logs metrics (F1, presence accuracy) and
    a constant-zero presence loss for the o2m queries (they have no presence logit), left out."""
    out = {}
    for k, v in want.items():
        if k == "core_loss" or k.startswith(("ce_f1", "presence_dec_acc")):
            continue
        if k.startswith("presence_loss") and k.endswith("_o2m"):
            assert v == 0.0, k
            continue
        out[k] = v
    return out


def relative(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-6)


def test_step_one_loss_terms_match_reference(our_step, reference_step):
    want = reference_terms(dict(reference_step.terms))
    got = {k: v for k, v in our_step.items() if k not in NOT_TERMS}
    assert set(got) == set(want)
    errors = {k: relative(got[k], want[k]) for k in want}
    for k in sorted(want):
        print(f"{k:28} ours {got[k]:.7g}  reference {want[k]:.7g}  rel err {errors[k]:.1e}")
    total = relative(our_step["loss"], reference_step.terms["core_loss"])
    print(f"{'total':28} ours {our_step['loss']:.7g}  reference {reference_step.terms['core_loss']:.7g}  "
          f"rel err {total:.1e}")
    assert our_step["finite"] == 1.0 and our_step["num_boxes"] > 0
    if SIZE == "tiny":  # every term exercised, the final layer's one-to-many matches included
        assert all(v > 0 for v in want.values()), [k for k, v in want.items() if not v > 0]
    assert max(errors.values()) < RTOL_TERMS, max(errors.items(), key=lambda kv: kv[1])
    assert total < RTOL_TERMS


def test_step_one_grad_norm_matches_reference(our_step, reference_step):
    err = relative(our_step["grad_norm"], reference_step.grad_norm)
    print(f"grad norm: ours {our_step['grad_norm']:.7g}  reference {reference_step.grad_norm:.7g}  rel err {err:.1e}")
    assert err < RTOL_GRAD_NORM



def test_two_train_steps_run_and_update(our_train_steps, our_step):
    """The real train step: its step 1 reports what the compared function does (at the tiny size,
    where both run in float32), and step 2 runs on the weights step 1 wrote."""
    first, second = our_train_steps
    if SIZE == "tiny":
        for k, v in our_step.items():
            assert first[k] == pytest.approx(v, rel=1e-5), k
    assert first["finite"] == second["finite"] == 1.0 and second["grad_norm"] > 0
    assert second["loss"] != first["loss"]
