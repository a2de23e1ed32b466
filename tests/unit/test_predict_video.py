"""The video predictor's memory bank policy and ``python -m sam3_jax.predict_video`` end to end.

No PyTorch: the checkpoint is the tiny model (ModelConfig.tiny() / TrackerConfig.tiny()) with seeded
random parameters, written in the converted-checkpoint format. Frames and the init mask come from the
synthetic DAVIS-style generator. (Agreement with the reference: tests/parity/test_video_predictor_parity.py.)
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sam3_jax import predict_video
from sam3_jax.convert import checkpoint, sam3_checkpoint
from sam3_jax.data.sources.davis import DavisSource
from sam3_jax.data.synthetic import render_video
from sam3_jax.infer import video_predictor
from sam3_jax.infer.video_predictor import VideoInputError
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
    abstract = sam3_checkpoint.abstract_params(MCFG, TCFG)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)
    params = jax.tree.map(np.asarray, params)  # nested dicts of numpy arrays, consumed by write()
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    manifest = {"model_config": checkpoint.config_to_json(MCFG), "tracker_config": checkpoint.config_to_json(TCFG)}
    checkpoint.write(str(out), params, manifest=manifest, dead={}, vocab_path=DEFAULT_BPE_PATH)
    return str(out)


@pytest.fixture(scope="module")
def davis_video(tmp_path_factory):
    """DAVIS layout: JPEGImages/vid/0000{0..4}.jpg and the palette annotation of frame INIT."""
    root = tmp_path_factory.mktemp("davis")
    frames, labels, _ = render_video(np.random.default_rng(3), NUM_FRAMES, 64)  # 48 x 64 frames
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


@pytest.mark.slow
def test_cli_writes_davis_masks(tiny_checkpoint, davis_video):
    root, init_label = davis_video
    out = root / "Annotations" / "vid"
    proc = _cli(f"--checkpoint={tiny_checkpoint}", f"--video={root / 'JPEGImages' / 'vid'}",
                f"--init_mask={root / 'init.png'}", f"--init_frame={INIT}", f"--output={out}", "--direction=both")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(NUM_FRAMES)]
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
    """--prompt: detect-and-track from frame 0; one palette PNG per frame and objects.json (random
    weights find nothing at the reference's thresholds: the files are still complete)."""
    import json

    root, _ = davis_video
    out = root / "text_out"
    proc = _cli(f"--checkpoint={tiny_checkpoint}", f"--video={root / 'JPEGImages' / 'vid'}", "--prompt=a ball",
                f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(NUM_FRAMES)] + ["objects.json"]
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
    fails(tmp_path / "clip.mp4", match="ffmpeg -i .*clip.mp4")
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
