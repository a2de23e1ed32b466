"""The tracker's train step (SAM 3's stage 4) against the reference tracker trained by SAM 2's recipe,
same weights, same clip.

Ours: ``program.build(config, mesh).train_step`` (what ``train.py`` runs) in tracker mode: the
tracker's clip-level stage on the features of the frozen backbone (``optim.freeze="^detector/"``, as
``configs/video.py:tracker``), from the demo variant of ``configs/video.py`` (tiny) or the tracker
variant (official) on a 1-device mesh. The reference (``sam3_jax.testing.tracker_train_reference``,
in a child process): its image model's backbone in eval mode under ``no_grad``, then its tracker's own
``track_step`` over the clip in train mode with SAM 2's ``MultiStepMultiMasksAndIous`` losses
(``sam3_jax.testing.reference_tracker_step``) and ``backward``. Both models' weights are seeded noise,
written by the reference as a video-model ``sam3.pt``, converted by our converter
(``convert_file``) and read as the trainer's ``init_from`` reads them (``restore.load_params``: in
whatever layer layout the program has). The clip is one of the generated demo videos.

The prompts are the semi-supervised protocol on both sides: the GT mask on frame 0 (the only
initial conditioning frame), the other frames memory-conditioned with multimask output and a loss
each, no clicks (``tracker.prompts``: no point inputs, one conditioning frame; the plan is then
not random). Dropout is off on both sides (the memory attention's, and the ViT's drop path, which
our frozen backbone would otherwise apply in training mode), so the two are the same function: the
four loss terms, their weighted total and the global norm of the tracker's gradients (before
clipping) must agree.

Our step hands the tracker the backbone's features in bfloat16 (``step._gather_clip`` gathers them
in ``GATHER_DTYPE``), also in a float32 run. Each comparison runs twice: with the features in
float32 on both sides (our gather's dtype patched to float32, the reference's features as they are),
where the two are the same float32 function; and as the trainer runs (bfloat16), the reference's
features rounded the same way. There the two float32 backbones, which differ by float32 rounding,
put a few features on different sides of a bfloat16 rounding boundary: those features differ by a
bfloat16 ulp (2^-8 relative) between the sides, which the tolerance must allow.

The clip has 3 frames: with memory selection (on in both tracker configs) the reference scores a
candidate memory frame by the mean over the objects tracked together, ours per object
(benchmarks/bench_train_step.py's caveats); up to 3 frames the only candidate is the previous frame,
which both always keep, so no choice can differ.

``SAM3_TRAIN_PARITY_SIZE=official`` runs it at the official size (3 frames, 3 objects, float32):
run it alone, each side needs most of a 24 GiB machine (benchmarks/README.md has its figures).
"""
import os
import types

import jax
import jax.numpy as jnp
import pytest

from sam3_jax.checkpoint import restore
from sam3_jax.train import config as config_lib
from sam3_jax.train import mesh as mesh_lib
from sam3_jax.train import program as program_lib
from sam3_jax.train import sharding
from sam3_jax.train import step as step_lib
from sam3_jax.train.losses.tracker import TrackerLossConfig
from sam3_jax.train.tracker_stage import PREFIX

pytestmark = pytest.mark.parity

SIZE = os.environ.get("SAM3_TRAIN_PARITY_SIZE", "tiny")
FRAMES, OBJECTS = 3, 3  # frames: see the module docstring
# Weights under which the tracked objects are predicted present on the frames with a loss (under
# seed 3, for one, they are not: the mask logits are then a constant and the mask terms no test).
SEED = 4
TERMS = ("mask", "dice", "iou", "class")
FEATURE_DTYPES = ("float32", "bfloat16")  # the tracker's input features: see the module docstring
# Largest relative errors seen at the tiny size, loss terms / gradient norm. float32 features: 1.3e-7
# / 7.7e-8 (seed 4; 7.5e-8 / 9e-9 under seed 3), float32 reassociation over a 3-frame recurrence: 1e-6.
# bfloat16 features: 1.8e-6 / 2.8e-8 (seed 4), 7.3e-7 / 9.7e-6 (seed 3), all of it from the features
# that round to different bfloat16 values on the two sides (the same weights and clip give the float32
# figures with float32 features): 5e-5. Official size (seed 4): 3.0e-7 / 3.6e-7 with float32
# features, 1.8e-6 / 2.5e-6 with bfloat16 features: the same tolerances hold.
RTOL = {("tiny", "float32"): 1e-6, ("tiny", "bfloat16"): 5e-5,
        ("official", "float32"): 1e-6, ("official", "bfloat16"): 5e-5}


def train_config():
    """The trainer's config in tracker mode, one clip on one device, without randomness, in float32."""
    if SIZE == "official":
        config = config_lib.video_config("tracker")
        config.model.compute_dtype = "float32"  # the variant trains in bfloat16
    else:
        config = config_lib.video_config("demo")
        config.mode = "tracker"
        config.optim.freeze = "^detector/"  # as configs/video.py:tracker
    assert config.mode == "tracker" and config.optim.freeze == "^detector/"
    config.model.vit.drop_path_rate = 0.0
    config.tracker.model.mem_attn_dropout = 0.0
    config.tracker.prompts.update(dict(prob_to_use_pt_input=0.0, num_init_cond_frames=1))
    config.data.num_frames, config.data.batch_size = FRAMES, 1
    config.data.max_phrases, config.data.max_objects = 1, OBJECTS
    config.mesh.update(dict(data=1, frame=1, shard_params=False))
    return config


def build_program():
    return program_lib.build(train_config(), mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def program():
    return build_program()


@pytest.fixture(scope="module")
def clip(program, tmp_path_factory):
    from sam3_jax.testing.train_reference import demo_clip

    batch = demo_clip(program.model_cfg.image_size, FRAMES, 1, OBJECTS, str(tmp_path_factory.mktemp("videos")))
    tracked = batch["object_valid"][0, 0]
    # Objects to track (visible on frame 0), seen on a later frame (mask terms), and all of it real.
    assert tracked.any() and (batch["object_valid"][0, 1:] & tracked).any() and batch["frame_valid"].all()
    return batch


@pytest.fixture(scope="module")
def reference_step(program, clip, tmp_path_factory):
    """The reference's step in a child process: per feature dtype its terms, total, gradient norm and
    work; and our converted checkpoint of its weights."""
    from sam3_jax.convert.sam3_checkpoint import convert_file
    from sam3_jax.testing import tracker_train_reference

    out = str(tmp_path_factory.mktemp("reference_step"))
    step = tracker_train_reference.step_one_in_child(
        program.model_cfg, program.tracker_cfg, TrackerLossConfig(**program.config.tracker.loss.to_dict()),
        clip, out, seed=SEED, feature_dtypes=FEATURE_DTYPES)
    converted = os.path.join(out, "converted")
    convert_file(os.path.join(out, "sam3.pt"), converted, cfg=program.model_cfg, tracker_cfg=program.tracker_cfg)
    os.remove(os.path.join(out, "sam3.pt"))
    return {dtype: types.SimpleNamespace(**step[dtype], converted=converted) for dtype in FEATURE_DTYPES}


@pytest.fixture(scope="module", params=FEATURE_DTYPES)
def features(request):
    return request.param


@pytest.fixture(scope="module")
def ref_step(reference_step, features):
    return reference_step[features]


@pytest.fixture(scope="module")
def our_step(ref_step, clip, features):
    """Step 1's metrics of the trainer's compiled train step on the reference's weights (computed
    before its update), the tracker's features gathered in ``features``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_lib, "GATHER_DTYPE", jnp.dtype(features))  # read when the step is traced
        program = build_program()
        mesh, config = program.mesh, program.config
        replicated = mesh_lib.replicated(mesh)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                              program.abstract_params)
        params = restore.load_params(ref_step.converted, target)
        batch = mesh_lib.shard_batch(mesh, {k: v for k, v in clip.items() if k != "phrase_text"})
        with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
            state = jax.jit(lambda p: step_lib.init_state(p, program.tx, config.seed),
                            out_shardings=sharding.shardings(program.abstract_state))(params)
            del params
            _, metrics = program.train_step(state, batch)
            metrics = jax.device_get(metrics)
    return {k: float(v) for k, v in metrics.items() if not k.startswith("lr/")}


def relative(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-12)


def test_reference_did_our_work(ref_step, clip):
    """The reference tracked every object slot through every frame: the GT mask on frame 0, the
    other frames memory-conditioned with multimask output and a loss each."""
    w = ref_step.work
    assert w["frames"] == FRAMES and w["object_slots"] == OBJECTS
    assert w["tracked"] == int(clip["object_valid"][0, 0].sum())
    assert w["mask_input_frames"] == 1 and w["memory_frames"] == w["multimask_steps"] == w["loss_steps"] == FRAMES - 1
    assert w["sam_heads_calls"] == FRAMES
    assert w["present"] > 0, w  # objects predicted present: the mask terms depend on the masks


def test_loss_terms_match_reference(our_step, ref_step, features):
    want = ref_step.terms
    errors = {k: relative(our_step[PREFIX + k], want[k]) for k in TERMS}
    errors["total"] = relative(our_step["loss"], ref_step.loss)
    for k in TERMS:
        print(f"{k:6} ours {our_step[PREFIX + k]:.8g}  reference {want[k]:.8g}  rel err {errors[k]:.1e}")
    print(f"total  ours {our_step['loss']:.8g}  reference {ref_step.loss:.8g}  rel err {errors['total']:.1e}")
    assert our_step["finite"] == 1.0
    assert {k[len(PREFIX):] for k in our_step if k.startswith(PREFIX)} == set(TERMS)
    assert all(want[k] > 0 for k in TERMS) and ref_step.loss > 0, want  # nothing compared vacuously
    assert max(errors.values()) < RTOL[SIZE, features], max(errors.items(), key=lambda kv: kv[1])


def test_grad_norm_matches_reference(our_step, ref_step, features):
    err = relative(our_step["grad_norm"], ref_step.grad_norm)
    print(f"grad norm: ours {our_step['grad_norm']:.8g}  reference {ref_step.grad_norm:.8g}  rel err {err:.1e}")
    assert ref_step.grad_norm > 0
    assert err < RTOL[SIZE, features]
