"""The video predictor's memory bank policy and ``python -m sam3_jax.predict_video`` end to end.

No PyTorch: the checkpoint is the tiny model (ModelConfig.tiny() / TrackerConfig.tiny()) with seeded
random parameters, written in the converted-checkpoint format. Frames and the init mask come from the
synthetic DAVIS-style generator; video files are made here with PyAV. (Agreement with the reference:
tests/parity/test_video_predictor_parity.py.)
"""
import json
import os
import subprocess
import sys
from fractions import Fraction

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sam3_jax import predict_video
from sam3_jax.checkpoint import converted, weights
from sam3_jax.data.sources.davis import DavisSource
from sam3_jax.data.sources.json_video import ytvis_source
from sam3_jax.data.synthetic import render_video
from sam3_jax.evaluation import ytvis
from sam3_jax.infer import video_io, video_predictor
from sam3_jax.infer.detect_track import DetectTrackFrame, DetectTrackPredictor
from sam3_jax.infer.video_io import VideoFileFrames
from sam3_jax.infer.video_predictor import Box, Clicks, VideoInputError, VideoPredictor
from sam3_jax.model import stacking
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tokenizer import DEFAULT_BPE_PATH
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.memory_bank import MemoryBank, select_memory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MCFG, TCFG = ModelConfig.tiny(), TrackerConfig.tiny()
NUM_FRAMES, INIT = 5, 2


# ------------------------------------------------------------------------------ memory bank policy
def _chosen(memory):
    """What a SelectedMemory points at: sorted (frame, temporal slot) and (frame, distance) of the valid
    entries (frame t's memory and pointer hold t + 1)."""
    m = jax.tree.map(lambda a: np.asarray(a)[0], memory)
    spatial = sorted((float(m.feats[i, 0, 0, 0]), int(m.tpos[i])) for i in np.flatnonzero(m.valid))
    ptrs = sorted((float(m.ptrs[i, 0]), round(float(m.ptr_tpos[i]), 5)) for i in np.flatnonzero(m.ptr_valid))
    return spatial, ptrs


@pytest.mark.parametrize("memory_selection", [True, False])
@pytest.mark.parametrize("direction,prompt_frame", [("forward", 3), ("backward", 24), ("both", 9)])
def test_bounded_bank_selects_what_a_full_bank_selects(memory_selection, direction, prompt_frame):
    """The predictor keeps a few slots per object; a bank with one slot per frame never forgets. At every
    frame of a 28-frame video (scores around the memory-selection threshold, so frames are skipped),
    select_memory picks the same memories from both: the slot policy (and for "both" the bank kept for
    the backward pass) keeps every frame the rules can still reach."""
    cfg = TCFG.replace(use_memory_selection=memory_selection, num_maskmem=4, max_obj_ptrs=6)
    g, d, c, t = cfg.grid, cfg.mem_dim, cfg.d_model, 28
    rng = np.random.default_rng(prompt_frame + 10 * memory_selection)
    scores = rng.choice([0.0, 0.005, 0.02, 0.5], size=t, p=[0.3, 0.2, 0.2, 0.3]).astype(np.float32)

    def entry(f):
        return jnp.full((1, g, g, d), f + 1.0), jnp.full((1, c), f + 1.0)

    capacity = video_predictor.bank_capacity(cfg)
    full = MemoryBank.empty(cfg, 1, t + 1).write(t, prompt_frame, *entry(prompt_frame), True, 0.0)  # frame f: slot f
    bank = MemoryBank.empty(cfg, 1, capacity).write(0, prompt_frame, *entry(prompt_frame), True, 0.0)
    seed = bank
    select_full = jax.jit(lambda b, f, reverse: select_memory(b, f, t, cfg, reverse=reverse), static_argnums=2)
    select_ours = jax.jit(lambda b, f, reverse: select_memory(b, f, t, video_predictor.select_config(cfg),
                                                              reverse=reverse), static_argnums=2)
    store = jax.jit(video_predictor.store, static_argnums=(1, 7))
    passes = {"forward": [False], "backward": [True], "both": [False, True]}[direction]
    checked = 0
    for reverse in passes:
        if reverse and direction == "both":
            bank = seed
        frames = range(prompt_frame - 1, -1, -1) if reverse else range(prompt_frame + 1, t)
        for f in frames:
            want, got = _chosen(select_full(full, f, reverse)), _chosen(select_ours(bank, f, reverse))
            assert got == want, f"{direction} frame {f}: ours {got}, a full bank {want}"
            checked += len(want[0]) + len(want[1])
            feats, ptr = entry(f)
            score = jnp.full((1,), scores[f])
            full = full.write(f, f, feats, ptr, False, scores[f])
            bank = store(bank, cfg, f, feats, ptr, score, f, True)
            if not reverse:
                seed = store(seed, cfg, f, feats, ptr, score, prompt_frame, False)
    assert capacity < t and checked > 3 * t


# ------------------------------------------------------------------------------------ CLI fixtures
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny detector + tracker with seeded random parameters, as a converted checkpoint."""
    abstract = converted.abstract_params(MCFG, TCFG)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)
    params = jax.tree.map(np.asarray, params)  # nested dicts of numpy arrays, consumed by write()
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    manifest = {"model_config": converted.config_to_json(MCFG), "tracker_config": converted.config_to_json(TCFG)}
    converted.write(str(out), params, manifest=manifest, dead={}, vocab_path=DEFAULT_BPE_PATH)
    return str(out)


def _synthetic():
    """The test video: NUM_FRAMES 48 x 64 frames (PIL) and their label maps."""
    frames, labels, _ = render_video(np.random.default_rng(3), NUM_FRAMES, 64)
    return frames, labels


@pytest.fixture(scope="module")
def davis_video(tmp_path_factory):
    """DAVIS layout: JPEGImages/vid/0000{0..4}.jpg and the palette annotation of frame INIT."""
    root = tmp_path_factory.mktemp("davis")
    frames, labels = _synthetic()
    frame_dir = root / "JPEGImages" / "vid"
    frame_dir.mkdir(parents=True)
    for i, frame in enumerate(frames):
        frame.save(frame_dir / f"{i:05d}.jpg", quality=95)
    mask = Image.fromarray(labels[INIT])
    mask.putpalette(predict_video.voc_palette())
    mask.save(root / "init.png")
    return root, labels[INIT]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sam3_jax.predict_video", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)


@pytest.mark.parametrize("chunk", [1, 3, 7, 10])
def test_objects_in_chunks_equal_all_at_once(chunk):
    """The tracker's object chunks (``in_object_chunks``): whole chunks through a ``lax.map``, then the
    remainder; per-object results as one call over all objects, and no call sees more than ``chunk``."""
    rng = np.random.default_rng(0)
    tree = {"a": jnp.asarray(rng.normal(size=(7, 3, 2)), jnp.float32), "b": jnp.arange(7)}
    seen = []

    def fn(t):
        seen.append(t["b"].shape[0])
        return {"y": jnp.tanh(t["a"]).sum(-1) * t["b"][:, None], "z": t["b"] + 1}

    want = jax.tree.map(np.asarray, fn(tree))
    seen.clear()
    got = jax.jit(lambda t: video_predictor.in_object_chunks(fn, t, chunk))(tree)
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), want[key], rtol=1e-6)
    assert max(seen) == min(chunk, 7) and sum(seen) == (7 if chunk >= 7 else chunk + 7 % chunk), seen


@pytest.mark.slow
def test_cli_writes_davis_masks(tiny_checkpoint, davis_video):
    root, init_label = davis_video
    out = root / "Annotations" / "vid"
    proc = _cli(f"--checkpoint={tiny_checkpoint}", f"--video={root / 'JPEGImages' / 'vid'}",
                f"--init_mask={root / 'init.png'}", f"--init_frame={INIT}", f"--output={out}", "--direction=both")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(NUM_FRAMES)] + ["results.json"]
    assert not [p for p in os.listdir(out.parent) if p.startswith(".")]  # no temporary directory left
    video = DavisSource(str(root / "JPEGImages"), str(root / "Annotations")).video(0)
    ids = [int(i) for i in np.unique(init_label) if i]
    for i in range(NUM_FRAMES):
        ann = video.load_annotation(i)
        assert ann.size == init_label.shape and set(ann.visible_ids()) <= set(ids)
    prompt = video.load_annotation(INIT)
    np.testing.assert_array_equal(prompt.masks(ids), init_label[None] == np.asarray(ids)[:, None, None])
    assert Image.open(out / "00000.png").getpalette()[:6] == predict_video.voc_palette()[:6]
    # An existing output is not replaced without --overwrite.
    proc = _cli(f"--checkpoint={tiny_checkpoint}", f"--video={root / 'JPEGImages' / 'vid'}",
                f"--init_mask={root / 'init.png'}", f"--output={out}")
    assert proc.returncode != 0 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_text_prompt_writes_every_frame(tiny_checkpoint, davis_video):
    """--prompt: detect-and-track from frame 0; one palette PNG per frame, objects.json and results.json
    (random weights find nothing at the reference's thresholds: the files are still complete)."""
    root, _ = davis_video
    out = root / "text_out"
    proc = _cli(f"--checkpoint={tiny_checkpoint}", f"--video={root / 'JPEGImages' / 'vid'}", "--prompt=a ball",
                f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = [f"{i:05d}.png" for i in range(NUM_FRAMES)]
    assert sorted(os.listdir(out)) == pngs + ["objects.json", "results.json"]
    assert json.loads((out / "results.json").read_text()) == []  # no object found
    meta = json.loads((out / "objects.json").read_text())
    assert meta["prompt"] == "a ball" and isinstance(meta["objects"], list)
    im = Image.open(out / "00000.png")
    assert im.mode == "P" and im.size == (64, 48)
    both = _cli(f"--checkpoint={tiny_checkpoint}", f"--video={root / 'JPEGImages' / 'vid'}", "--prompt=a ball",
                f"--init_mask={root / 'init.png'}", f"--output={root / 'x'}")
    assert both.returncode != 0 and "exactly one of" in both.stderr and "Traceback" not in both.stderr


def test_text_label_map_uses_ids_mod_254():
    from sam3_jax.infer.detect_track import DetectTrackFrame

    masks = np.zeros((2, 3, 4), bool)
    masks[0, 0, :2] = masks[1, 2, 3] = True
    frame = DetectTrackFrame(frame_idx=0, obj_ids=np.array([3, 254]), masks=masks, probs=np.ones(2),
                             boxes_xywh=np.zeros((2, 4)))
    label = predict_video.text_label_map(frame)
    assert label[0, 0] == label[0, 1] == 4 and label[2, 3] == 1 and label.sum() == 9


def _frames(tmp_path, sizes, name="frames"):
    d = tmp_path / name
    d.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i:05d}.jpg")
    return d


def _mask(tmp_path, shape, mode="P"):
    label = np.zeros(shape, np.uint8)
    label[2:6, 3:9] = 1
    im = Image.fromarray(label) if mode == "P" else Image.fromarray(np.stack([label * 100] * 3, -1))
    if mode == "P":
        im.putpalette(predict_video.voc_palette())
    path = tmp_path / "mask.png"
    im.save(path)
    return path


def test_bad_inputs_name_the_problem(tmp_path, tiny_checkpoint):
    """Each bad input fails before any work, naming the file; nothing is written."""
    out = tmp_path / "out"
    mask = _mask(tmp_path, (12, 16))

    def fails(video, init_mask=mask, init_frame=0, match=""):
        with pytest.raises((predict_video.InputError, VideoInputError), match=match):
            predict_video.run(tiny_checkpoint, str(video), str(init_mask), init_frame, str(out), "forward")
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]

    mixed = _frames(tmp_path, [(12, 16), (12, 16), (14, 16)], "mixed")
    fails(mixed, match=r"00002\.jpg: frame is 16x14 but .*00000\.jpg is 16x12")
    fails(_frames(tmp_path, [], "empty"), match="empty: no frames")
    broken = _frames(tmp_path, [(12, 16), (12, 16)], "broken")
    (broken / "00001.jpg").write_bytes(b"not a jpeg")
    fails(broken, match=r"00001\.jpg: cannot be read")
    (tmp_path / "clip.mp4").write_bytes(b"\x00")
    fails(tmp_path / "clip.mp4", match=r"clip\.mp4: cannot be read as a video")
    fails(tmp_path / "missing", match="video not found")
    good = _frames(tmp_path, [(12, 16), (12, 16)], "good")
    fails(good, init_mask=_mask(tmp_path, (10, 16)), match=r"mask.png is 16x10 but the frames are 16x12")
    fails(good, init_mask=_mask(tmp_path, (12, 16), mode="RGB"), match="palette")
    fails(good, init_frame=2, match="outside the video's 2 frames")
    empty_mask = tmp_path / "zeros.png"
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(empty_mask)
    fails(good, init_mask=empty_mask, match="no object")


@pytest.mark.slow
def test_truncated_frame_fails_cleanly(tmp_path, tiny_checkpoint):
    """A frame whose header reads but whose pixels do not: found while tracking, after the prompt frame
    was written; the error names it and the partial output is removed."""
    video = _frames(tmp_path, [(48, 64)] * 3)
    data = (video / "00001.jpg").read_bytes()
    (video / "00001.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(VideoInputError, match=r"00001\.jpg: cannot be read.*truncated"):
        predict_video.run(tiny_checkpoint, str(video), str(_mask(tmp_path, (48, 64))), 0, str(out), "forward")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_checkpoints_are_read_with_every_stack_scanned(tiny_checkpoint):
    """The predictors run every layer stack scanned, as the converter stores them."""
    params, _, _, _ = video_predictor.read_video_checkpoint(tiny_checkpoint, "a test")
    assert set(stacking.layout(params)) == set(stacking.STACKS)
    stored = converted.read_params(tiny_checkpoint)
    assert jax.tree.structure(params) == jax.tree.structure(stored)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(stored)))
    detector_only = weights.read(tiny_checkpoint, tracker=False)  # what the image predictor reads
    detector_only = detector_only.params
    assert detector_only.keys() == {"detector"}
    assert set(stacking.layout(detector_only)) == set(stacking.STACKS) - {stacking.MEMORY_ATTENTION}


def test_predictor_input_errors(tiny_checkpoint):
    predictor = video_predictor.VideoPredictor.from_checkpoint(tiny_checkpoint)
    frames = np.zeros((3, 12, 16, 3), np.uint8)
    mask = np.zeros((12, 16), bool)
    for kwargs, match in [({"direction": "sideways"}, "direction"), ({"frame_idx": 3}, "outside"),
                          ({"prompts": {}}, "no objects"),
                          ({"prompts": {1: video_predictor.Clicks([(1, 2)], [1, 0])}}, "1 points but 2 labels"),
                          ({"prompts": {1: video_predictor.Clicks([(1, 2)], [5])}}, "labels must be"),
                          ({"prompts": {1: video_predictor.Box(5, 5, 2, 9)}}, "x1 > x0"),
                          ({"prompts": {1: np.zeros((2, 2, 2))}}, "2-D")]:
        kwargs = {"prompts": {1: mask}, **kwargs}
        with pytest.raises(VideoInputError, match=match):
            predictor.propagate(frames, **kwargs)
    with pytest.raises(VideoInputError, match="frames must be"):
        predictor.propagate(np.zeros((3, 12, 16), np.uint8), {1: mask})


# ------------------------------------------------------------------------------------ video files
@pytest.fixture(scope="module")
def davis_mp4(davis_video):
    """The DAVIS frames as an H.264 MP4 at 24 fps (yuv420p: lossy), and the MP4 decoded here to
    0000{0..4}.png: the pixels the predictor must see when it is given the MP4."""
    root, _ = davis_video
    path = root / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        for frame in _synthetic()[0]:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode(None))
    decoded = root / "decoded"
    decoded.mkdir()
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            Image.fromarray(frame.to_ndarray(format="rgb24")).save(decoded / f"{i:05d}.png")
    assert len(os.listdir(decoded)) == NUM_FRAMES
    return path, decoded


def test_video_file_frames_in_the_predictors_order(davis_mp4):
    """direction="both" from frame 2, then in order (the overlay): every frame as decoded; only the frames
    passed on the way to frame 2 are spooled, and close() deletes them."""
    path, decoded = davis_mp4
    want = [np.asarray(Image.open(decoded / f"{i:05d}.png")) for i in range(NUM_FRAMES)]
    with VideoFileFrames(str(path)) as frames:
        assert len(frames) == NUM_FRAMES and frames.size == (48, 64) and frames.fps == 24
        for i in [2, 3, 4, 1, 0, *range(NUM_FRAMES)]:
            np.testing.assert_array_equal(frames[i], want[i])
        spool = frames._spool.name
        assert sorted(os.listdir(spool)) == ["00000.npy", "00001.npy"]
    assert not os.path.exists(spool)


def _labels(out):
    return np.stack([np.asarray(Image.open(out / f"{t:05d}.png")) for t in range(NUM_FRAMES)])


def _check_ytvis_results(out, tmp_path):
    """results.json read back with the project's YouTube-VIS reader gives exactly the PNGs' masks, and its
    evaluator scores it AP 1 against ground truth encoded here from the PNGs."""
    results = json.loads((out / "results.json").read_text())
    labels = _labels(out)
    videos = [{"id": results[0]["video_id"], "height": 48, "width": 64,
               "file_names": [f"vid/{t:05d}.jpg" for t in range(NUM_FRAMES)]}]
    categories = [{"id": c, "name": f"thing {c}"} for c in {r["category_id"] for r in results}]
    as_gt = {"videos": videos, "categories": categories,
             "annotations": [{"id": r["obj_id"], "video_id": r["video_id"], "category_id": r["category_id"],
                              "segmentations": r["segmentations"]} for r in results]}
    (tmp_path / "as_gt.json").write_text(json.dumps(as_gt))
    video = ytvis_source(str(tmp_path), str(tmp_path / "as_gt.json")).video(0)
    want = labels[:, None] == np.array([r["label"] for r in results])[None, :, None, None]
    assert want.any(axis=(0, 2, 3)).all()
    for t in range(NUM_FRAMES):
        np.testing.assert_array_equal(video.load_annotation(t).masks([r["obj_id"] for r in results]), want[t])
    gt = {"videos": videos, "categories": categories,
          "annotations": [{"video_id": r["video_id"], "category_id": r["category_id"],
                           "segmentations": ytvis.encode_masklet(want[:, k])} for k, r in enumerate(results)]}
    assert ytvis.evaluate(gt, str(out / "results.json"))["AP"] == 1.0
    return results


@pytest.fixture(scope="module")
def tiny_video_predictor(tiny_checkpoint):
    """One predictor for the tests below: its jitted functions compile once (most of their time)."""
    return VideoPredictor.from_checkpoint(tiny_checkpoint)


@pytest.mark.slow
def test_predictor_reads_an_mp4_as_its_decoded_frames(tiny_video_predictor, davis_video, davis_mp4):
    """Direction both from frame INIT: every frame's mask logits and object scores are bit-identical."""
    _, init_label = davis_video
    path, decoded = davis_mp4
    prompts = {int(i): init_label == i for i in np.unique(init_label) if i}
    with VideoFileFrames(str(path)) as frames:
        from_mp4 = list(tiny_video_predictor.propagate_iter(frames, prompts, INIT, "both"))
    from_pngs = video_predictor.ImageFolderFrames(str(decoded))
    for a, b in zip(from_mp4, tiny_video_predictor.propagate_iter(from_pngs, prompts, INIT, "both"), strict=True):
        assert a.frame_idx == b.frame_idx
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.scores, b.scores)
    assert [r.frame_idx for r in from_mp4] == [2, 3, 4, 1, 0]


@pytest.fixture(scope="module")
def mask_task_outputs(tiny_checkpoint, tiny_video_predictor, davis_video, davis_mp4, tmp_path_factory):
    """predict_video.run, direction both from frame INIT, on the MP4 (with an MP4 overlay) and on its frames
    decoded to PNGs."""
    root, _ = davis_video
    path, decoded = davis_mp4
    out = tmp_path_factory.mktemp("mask_task")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VideoPredictor, "from_checkpoint", classmethod(lambda cls, directory: tiny_video_predictor))
        for name, video, overlay in (("mp4", path, out / "overlay.mp4"), ("frames", decoded, None)):
            written = predict_video.run(tiny_checkpoint, str(video), str(root / "init.png"), INIT, str(out / name),
                                        "both", overlay=overlay and str(overlay))
            assert written == NUM_FRAMES
    return out


@pytest.mark.slow
def test_mp4_gives_the_masks_of_its_decoded_frames(mask_task_outputs, tmp_path):
    out = mask_task_outputs
    names = [f"{i:05d}.png" for i in range(NUM_FRAMES)] + ["results.json"]
    assert sorted(os.listdir(out / "mp4")) == sorted(os.listdir(out / "frames")) == names
    np.testing.assert_array_equal(_labels(out / "mp4"), _labels(out / "frames"))
    assert (out / "mp4" / "results.json").read_text() == (out / "frames" / "results.json").read_text()
    results = _check_ytvis_results(out / "mp4", tmp_path)
    ids = [int(i) for i in np.unique(_labels(out / "mp4")[INIT]) if i]
    assert [r["obj_id"] for r in results] == [r["label"] for r in results] == ids
    assert all(0 < r["score"] <= 1 and (r["video_id"], r["category_id"]) == (1, 1) for r in results)


@pytest.mark.slow
def test_mp4_overlay_has_every_frame(mask_task_outputs, davis_mp4):
    """The overlay: one frame per tracked frame at the video's size and rate, the objects tinted in the
    PNGs' palette colours (H.264 is lossy: compared with a tolerance)."""
    out = mask_task_outputs
    _, decoded = davis_mp4
    assert not [p for p in os.listdir(out) if p.startswith(".")]
    with av.open(str(out / "overlay.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 24
        got = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    labels = _labels(out / "mp4")
    assert len(got) == NUM_FRAMES and got[0].shape == (48, 64, 3)
    for t in range(NUM_FRAMES):
        frame = np.asarray(Image.open(decoded / f"{t:05d}.png"))
        want = video_io.blend(frame, labels[t], predict_video.voc_palette()).astype(int)
        error, tinted = np.abs(got[t] - want), labels[t] > 0
        assert error.mean() < 4, t
        if tinted.any():  # (random weights: not every frame has an object; the prompt frame has)
            assert error[tinted].mean() < np.abs(got[t] - frame)[tinted].mean() / 3, t
    assert labels[INIT].any()


class _FakeDetectTrack:
    """Stands in for the text-prompted predictor: objects 3 and 300 are the synthetic video's objects 1 and
    2, with fixed detection scores; it reads every frame, in order, as the real one does."""

    def __init__(self):
        self.labels = _synthetic()[1]

    def propagate_iter(self, frames, prompt, start_frame=0, direction="forward"):
        self.calls = getattr(self, "calls", []) + [(start_frame, direction)]
        order = list(range(start_frame, len(frames))) if direction != "backward" else [start_frame]
        order += list(range(start_frame - 1, -1, -1)) if direction != "forward" else []
        for t in order:
            assert frames[t].shape == (48, 64, 3)
            yield DetectTrackFrame(frame_idx=t, obj_ids=np.array([3, 300]), probs=np.array([0.9, 0.6]),
                                   masks=self.labels[t][None] == np.array([1, 2])[:, None, None],
                                   boxes_xywh=np.zeros((2, 4)))


def _main(capsys, *args):
    """predict_video's main in this process (no JAX start-up per call): (exit code, stderr)."""
    try:
        predict_video.FLAGS(["predict_video", *args])
        predict_video.main([])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        predict_video.FLAGS.unparse_flags()
    return code, capsys.readouterr().err


def test_text_task_on_mp4_writes_ytvis_results_and_gif(tmp_path, monkeypatch, capsys, davis_mp4):
    """--prompt on an MP4 through the CLI's main: PNGs 00000.png ..., objects.json as before, results.json
    with the ids given by flag and objects.json's scores, and a GIF overlay of every frame."""
    path, _ = davis_mp4
    monkeypatch.setattr(DetectTrackPredictor, "from_checkpoint", classmethod(lambda cls, d: _FakeDetectTrack()))
    out, gif = tmp_path / "out", tmp_path / "overlay.gif"
    code, err = _main(capsys, "--checkpoint=unused", f"--video={path}", "--prompt=a shape", f"--output={out}",
                      f"--overlay={gif}", "--video_id=5", "--category_id=2")
    assert code == 0, err
    assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(NUM_FRAMES)] + ["objects.json", "results.json"]
    objects = json.loads((out / "objects.json").read_text())["objects"]
    assert [list(o) for o in objects] == [["id", "label", "score", "frames"]] * 2
    results = _check_ytvis_results(out, tmp_path)
    assert [(r["obj_id"], r["label"], r["score"]) for r in results] == [(o["id"], o["label"], o["score"])
                                                                       for o in objects]
    assert [(r["obj_id"], r["label"]) for r in results] == [(3, 4), (300, 47)]
    assert {(r["video_id"], r["category_id"]) for r in results} == {(5, 2)}
    for r, o in zip(results, objects):  # null exactly where the object has no pixel
        assert [t for t, s in enumerate(r["segmentations"]) if s is not None] == o["frames"]
    with Image.open(gif) as im:
        assert im.n_frames == NUM_FRAMES and im.size == (64, 48)
        assert abs(im.info["duration"] - 1000 / 24) <= 5  # GIF delays are in 10 ms
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_text_task_directions_write_the_frames_reached(tmp_path, monkeypatch, capsys, davis_video):
    """--prompt with --init_frame and --direction: the predictor is asked for them; the PNGs are the frames
    reached (backward: 0 .. INIT; both: all, the forward pass first), objects.json lists each object's
    frames in ascending order and results.json is null on frames not reached."""
    root, _ = davis_video
    fake = _FakeDetectTrack()
    monkeypatch.setattr(DetectTrackPredictor, "from_checkpoint", classmethod(lambda cls, d: fake))
    for direction, reached in [("backward", range(INIT + 1)), ("both", range(NUM_FRAMES)),
                               ("forward", range(INIT, NUM_FRAMES))]:
        out = tmp_path / direction
        code, err = _main(capsys, "--checkpoint=unused", f"--video={root / 'JPEGImages' / 'vid'}", "--prompt=a shape",
                          f"--output={out}", f"--init_frame={INIT}", f"--direction={direction}")
        assert code == 0, err
        assert fake.calls[-1] == (INIT, direction)
        assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in reached] + ["objects.json", "results.json"]
        objects = json.loads((out / "objects.json").read_text())["objects"]
        results = json.loads((out / "results.json").read_text())
        for o, r in zip(objects, results, strict=True):
            want = [t for t in reached if (fake.labels[t] == (1 if o["id"] == 3 else 2)).any()]
            assert o["frames"] == want and want
            assert [t for t, x in enumerate(r["segmentations"]) if x is not None] == want
    code, err = _main(capsys, "--checkpoint=unused", f"--video={root / 'JPEGImages' / 'vid'}", "--prompt=a shape",
                      f"--output={tmp_path / 'bad'}", f"--init_frame={NUM_FRAMES}", "--direction=backward")
    assert code == 2 and f"--init_frame={NUM_FRAMES} is outside" in err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cli_text_prompt_backward_writes_the_frames_reached(tiny_checkpoint, davis_video, tmp_path, capsys):
    """--prompt --direction=backward --init_frame=INIT with the tiny model: PNGs for frames 0 .. INIT only,
    objects.json and results.json (one null or RLE per frame of the video)."""
    root, _ = davis_video
    out = tmp_path / "backward"
    code, err = _main(capsys, f"--checkpoint={tiny_checkpoint}", f"--video={root / 'JPEGImages' / 'vid'}",
                      "--prompt=a ball", f"--output={out}", f"--init_frame={INIT}", "--direction=backward")
    assert code == 0, err
    assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(INIT + 1)] + ["objects.json", "results.json"]
    for r in json.loads((out / "results.json").read_text()):
        assert len(r["segmentations"]) == NUM_FRAMES and r["segmentations"][INIT + 1:] == [None] * (NUM_FRAMES - INIT - 1)
    assert json.loads((out / "objects.json").read_text())["prompt"] == "a ball"
    assert Image.open(out / "00000.png").size == (64, 48)


def test_bad_video_files_exit_2_naming_the_file(tmp_path, capsys, davis_video, davis_mp4):
    """Each fails before any work: exit 2, one line naming the file, no output and no temporary file."""
    root, _ = davis_video
    mp4, _ = davis_mp4
    (tmp_path / "notes.mp4").write_text("not a video\n")
    data = mp4.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[:len(data) // 2])  # the index (moov) is at the end: gone
    for name, fmt in (("no_stream.mp4", "mp4"), ("no_frames.avi", "avi")):
        container = av.open(str(tmp_path / name), "w", format=fmt)
        stream = container.add_stream("mjpeg", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        container.start_encoding()  # a header, no frame (the MP4 muxer drops the empty stream)
        container.close()
    with av.open(str(tmp_path / "sizes.mkv"), "w") as container:  # Motion JPEG: every packet has its own size
        stream = container.add_stream("mjpeg", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")))
        small = av.CodecContext.create("mjpeg", "w")
        small.width, small.height, small.pix_fmt, small.time_base = 32, 24, "yuvj420p", Fraction(1, 24)
        frame = av.VideoFrame.from_ndarray(np.zeros((24, 32, 3), np.uint8), format="rgb24")
        frame.pts = 1
        for packet in small.encode(frame):
            packet.stream, packet.time_base, packet.pts, packet.dts = stream, Fraction(1, 24), 1, 1
            container.mux(packet)
    out = tmp_path / "out"
    for name, message in [("notes.mp4", "cannot be read as a video"), ("truncated.mp4", "cannot be read as a video"),
                          ("no_stream.mp4", "no video stream"), ("no_frames.avi", "no frames"),
                          ("sizes.mkv", "frame 1 is 32x24 but frame 0 is 64x48")]:
        video = tmp_path / name
        for task in (f"--init_mask={root / 'init.png'}", "--prompt=a shape"):
            code, err = _main(capsys, "--checkpoint=unused", f"--video={video}", task, f"--output={out}")
            assert code == 2 and err.count("\n") == 1 and f"{video}: {message}" in err, (name, err)
            assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    for overlay, message in [("o.avi", "must end with .gif or .mp4"), ("out/o.mp4", "must be outside --output"),
                             ("notes.mp4", "output exists")]:
        code, err = _main(capsys, "--checkpoint=unused", f"--video={mp4}", "--prompt=a shape", f"--output={out}",
                          f"--overlay={tmp_path / overlay}")
        assert code == 2 and message in err and not out.exists(), (overlay, err)


# ------------------------------------------------------------------------------ box and click prompts
BOXES = {1: (29, 7, 43, 22), 2: (42, 11, 53, 23), 3: (29, 18, 40, 28)}  # the objects' bounding boxes on frame INIT


@pytest.mark.slow
@pytest.mark.parametrize("case", ["boxes", "clicks", "mask_and_clicks"])
def test_box_and_point_flags_give_the_apis_masks(case, tiny_video_predictor, davis_video, tmp_path, monkeypatch,
                                                 capsys):
    """--box / --points (alone, together for one object, beside --init_mask) through the CLI's main, forward
    from INIT: the predictor is given these prompts, and every PNG is the label map of the API's result for
    them (random weights: box and click masks are mostly empty, so the prompts themselves are compared)."""
    root, init_label = davis_video
    video = root / "JPEGImages" / "vid"
    args = ["--box=3:29,18,40,28", "--points=3:34,23,1;45,16,0"]
    prompts = {3: Clicks([(34, 23), (45, 16)], [1, 0], box=Box(*BOXES[3]))}
    if case == "boxes":
        args = [f"--box={i}:{','.join(map(str, b))}" for i, b in BOXES.items()]
        prompts = {i: Box(*b) for i, b in BOXES.items()}
    elif case == "clicks":
        args += ["--points=2:47,16,1;35,14,0", "--points=1:35.5,14,1"]
        prompts |= {1: Clicks([(35.5, 14)], [1]), 2: Clicks([(47, 16), (35, 14)], [1, 0])}
    else:
        Image.fromarray(np.where(init_label == 3, 0, init_label).astype(np.uint8)).save(tmp_path / "ids12.png")
        args.append(f"--init_mask={tmp_path / 'ids12.png'}")
        prompts |= {1: init_label == 1, 2: init_label == 2}
    prompts = dict(sorted(prompts.items()))
    calls = []

    def recording(frames, prompts, frame_idx, direction):
        calls.append((prompts, frame_idx, direction))
        return VideoPredictor.propagate_iter(tiny_video_predictor, frames, prompts, frame_idx, direction)

    monkeypatch.setattr(VideoPredictor, "from_checkpoint", classmethod(lambda cls, d: tiny_video_predictor))
    monkeypatch.setattr(tiny_video_predictor, "propagate_iter", recording)
    out = tmp_path / "out"
    code, err = _main(capsys, "--checkpoint=unused", f"--video={video}", *args, f"--init_frame={INIT}",
                      f"--output={out}", "--direction=forward")
    assert code == 0, err
    [(given, frame_idx, direction)] = calls
    assert (list(given), frame_idx, direction) == ([1, 2, 3], INIT, "forward")
    for i, prompt in prompts.items():
        if isinstance(prompt, np.ndarray):
            np.testing.assert_array_equal(given[i], prompt)
        else:
            assert given[i] == prompt, (i, given[i])
    results = VideoPredictor.propagate_iter(tiny_video_predictor, video_predictor.ImageFolderFrames(str(video)),
                                            prompts, INIT, "forward")
    want = {f"{r.frame_idx:05d}.png": predict_video.label_map(r, [1, 2, 3]) for r in results}
    assert sorted(os.listdir(out)) == sorted(want) + ["results.json"]
    for name, label in want.items():
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), label, err_msg=name)
    assert [r["obj_id"] for r in json.loads((out / "results.json").read_text())] == [1, 2, 3]

@pytest.mark.parametrize("args,message", [
    (["--box=1:1,2,3"], "--box=1:1,2,3: expected ID:x0,y0,x1,y1"),
    (["--box=a:1,2,3,4"], "--box=a:1,2,3,4: expected ID:x0,y0,x1,y1"),
    (["--box=1:1,2,3,4;5,6,7,8"], "--box=1:1,2,3,4;5,6,7,8: expected ID:x0,y0,x1,y1"),
    (["--box=1:nan,2,3,4"], "--box=1:nan,2,3,4: expected ID:x0,y0,x1,y1"),
    (["--points=1:1,2"], "--points=1:1,2: expected ID:x,y,label[;x,y,label...]"),
    (["--points=1:1,2,1;"], "--points=1:1,2,1;: expected ID:x,y,label"),
    (["--points=1:1,2,2"], "--points=1:1,2,2: a label must be 1 (positive) or 0 (negative)"),
    (["--box=0:1,2,3,4"], "--box=0:1,2,3,4: object id 0 is outside 1..254"),
    (["--points=255:1,2,1"], "--points=255:1,2,1: object id 255 is outside 1..254"),
    (["--box=1:1,2,3,4", "--box=1:5,6,7,8"], "--box=1:5,6,7,8: object 1 has another --box"),
    (["--box=1:5,2,5,9"], "--box=1:5,2,5,9: a box needs x1 > x0 and y1 > y0"),
    (["--box=1:0,0,65,10"], "--box=1:0,0,65,10: outside the 64x48 frame"),
    (["--points=1:10,-1,1"], "--points=1:10,-1,1: outside the 64x48 frame"),
    (["--init_mask=INIT", "--box=2:1,2,3,4"], "--box=2:1,2,3,4: object 2 also has a mask in --init_mask"),
    (["--init_mask=INIT", "--points=1:1,2,1"], "--points=1:1,2,1: object 1 also has a mask in --init_mask"),
    ([], "no prompt: give --init_mask, --box or --points"),
    (["--prompt=a ball", "--box=1:1,2,3,4"], "give exactly one of --prompt (text) and objects on one frame"),
])
def test_bad_box_and_point_flags_exit_2(args, message, tmp_path, capsys, davis_video):
    """Each fails before the checkpoint is read: exit 2, one line naming the flag and its value, nothing written."""
    root, _ = davis_video
    args = [a.replace("INIT", str(root / "init.png")) for a in args]
    out = tmp_path / "out"
    code, err = _main(capsys, "--checkpoint=unused", f"--video={root / 'JPEGImages' / 'vid'}", *args,
                      f"--output={out}")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not os.listdir(tmp_path)
