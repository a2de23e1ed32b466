"""Inputs under faults (issue 33): image headers claiming a huge size are refused before decoding
(predictors: one message; training data: a counted bad sample), a YouTube-VIS video without
``file_names`` is a counted skipped sample, and a predictor whose outputs are not finite says so."""
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image
from test_data_sources import copy, data_cfg, edit_ytvis, generated, ytvis  # noqa: F401,F811 (fixtures)
from test_predict_video import REPO, _main, davis_video  # noqa: F401 (fixture)

from sam3_jax.data import image_io
from sam3_jax.data.clips import ClipBuilder
from sam3_jax.data.errors import DataError
from sam3_jax.data.sources.base import read_frame
from sam3_jax.infer.video_predictor import FrameResult, VideoPredictor


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(path, width: int, height: int) -> str:
    """A valid PNG header claiming ``width`` x ``height`` over a few hundred bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 4096, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return str(path)


def huge_jpeg(path, width: int, height: int) -> str:
    """A small JPEG whose frame header (SOF0) is rewritten to claim ``width`` x ``height``."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, quality=90)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return str(path)


@pytest.fixture
def huge(tmp_path):
    """Over PIL's own limit (20000^2), under it (12000^2, past ours), a 40000^2 JPEG."""
    return [huge_png(tmp_path / "a.png", 20000, 20000), huge_png(tmp_path / "b.png", 12000, 12000),
            huge_jpeg(tmp_path / "c.jpg", 40000, 40000)]


def test_huge_headers_are_refused_before_decoding(huge):
    for path in huge:
        assert os.path.getsize(path) < 2000
        with pytest.raises(image_io.ImageError, match=f"{path}: .*limit of {image_io.MAX_PIXELS}.*before decoding"):
            image_io.load_image(path)
        with pytest.raises(DataError, match="before decoding") as e:
            read_frame(path)
        assert e.value.path == path and e.value.field == "image"
    image_io.check_pixels(16384, 8192, "at the limit")  # 2^27: accepted


def test_predict_cli_refuses_a_huge_image_in_one_line(huge, tmp_path):
    proc = _predict_cli("--checkpoint=unused", f"--image={huge[1]}", "--prompt=cat", f"--output={tmp_path / 'out.npz'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"predict: error: {huge[1]}: 12000x12000 pixels")
    assert not (tmp_path / "out.npz").exists()


def test_huge_frames_count_as_bad_training_samples(copy):  # noqa: F811
    folder = f"{copy}/ytvis/JPEGImages/synth_0000"
    for name in os.listdir(folder):
        huge_jpeg(__import__("pathlib").Path(folder) / name, 40000, 40000)
    c = data_cfg("skip", max_retries=50)
    skipped = [int(ClipBuilder(ytvis(copy), c, 0, "t")(0, np.random.default_rng(s))["skipped"]) for s in range(3)]
    assert min(skipped) >= 1


def test_huge_frames_and_masks_refused_by_predict_video(huge, davis_video, tmp_path, capsys):  # noqa: F811
    root, _ = davis_video
    frames = tmp_path / "frames"
    frames.mkdir()
    os.link(huge[2], frames / "00000.jpg")
    out = tmp_path / "out"
    code, err = _main(capsys, "--checkpoint=unused", f"--video={frames}", f"--init_mask={root / 'init.png'}",
                      f"--output={out}")
    assert code == 2 and err.count("\n") == 1 and f"{frames / '00000.jpg'}: 40000x40000 pixels is beyond" in err, err
    code, err = _main(capsys, "--checkpoint=unused", f"--video={root / 'JPEGImages' / 'vid'}",
                      f"--init_mask={huge[1]}", f"--output={out}")
    assert code == 2 and err.count("\n") == 1 and f"{huge[1]}: 12000x12000 pixels" in err, err
    assert not out.exists()


def test_ytvis_video_without_file_names_is_a_counted_skip(copy, caplog):  # noqa: F811
    def drop(data):
        del data["videos"][0]["file_names"]
    edit_ytvis(copy, drop)
    listed = f"{copy}/davis/ImageSets/train.txt"
    for file_list in ("", listed):  # with a video list too: it has no name to be listed under
        source = ytvis(copy, file_list=file_list)
        assert source.entries[0].file_names is None and source.entries[0].name == "1"
        with pytest.raises(DataError, match="file_names.*missing or not a list"):
            source.video(0)
    c = data_cfg("skip", max_retries=20)
    skipped = [int(ClipBuilder(ytvis(copy), c, 0, "t")(0, np.random.default_rng(s))["skipped"]) for s in range(4)]
    assert min(skipped) >= 1 and "missing or not a list" in caplog.text


NAN_PREDICTOR = """
import numpy as np
from sam3_jax.infer.image_predictor import ImagePredictor, Prediction

class NanPredictor:
    def predict_batch(self, images, prompts, threshold):
        return [Prediction(np.full(4, np.nan, np.float32), np.zeros((4, 4), np.float32), np.float32(0),
                           np.zeros((4, 8, 8), np.float32), np.zeros(0), np.zeros((0, 4)),
                           np.zeros((0,) + images[0].shape[:2], bool)) for _ in prompts]

ImagePredictor.from_checkpoint = classmethod(lambda cls, d: NanPredictor())
"""


def _predict_cli(*args, prelude=""):
    """``python -m sam3_jax.predict`` with ``args`` (after ``prelude``, run first in the same process)."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv = ['predict'] + sys.argv[1:]\n" \
           "runpy.run_module('sam3_jax.predict', run_name='__main__', alter_sys=True)"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_predictors_say_when_their_outputs_are_not_finite(tmp_path, monkeypatch, capsys, davis_video):  # noqa: F811
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.png")
    proc = _predict_cli("--checkpoint=unused", f"--image={tmp_path / 'img.png'}", "--prompt=cat",
                        f"--output={tmp_path / 'out.npz'}", prelude=NAN_PREDICTOR)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cat: the model's outputs: NaN or Inf in 1 tensor(s):\n  pred_logits" in proc.stderr
    assert "instance(s)" not in proc.stdout and not (tmp_path / "out.npz").exists()

    class NanTracker:
        def propagate_iter(self, frames, prompts, frame_idx, direction):
            h, w = frames.size
            yield FrameResult(frame_idx, np.zeros((len(prompts), h, w), bool),
                              np.full((len(prompts), h, w), np.nan, np.float32), np.zeros(len(prompts), np.float32))

    monkeypatch.setattr(VideoPredictor, "from_checkpoint", classmethod(lambda cls, d: NanTracker()))
    root, _ = davis_video
    code, err = _main(capsys, "--checkpoint=unused", f"--video={root / 'JPEGImages' / 'vid'}",
                      f"--init_mask={root / 'init.png'}", "--init_frame=2", f"--output={tmp_path / 'video'}")
    assert code == 2 and "frame 00002: the predictor's outputs: NaN or Inf in 1 tensor(s):\n  logits" in err, err
    assert not (tmp_path / "video").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


class _Tracker:
    """Every object on every frame reached, forward from the prompt frame."""

    def propagate_iter(self, frames, prompts, frame_idx, direction):
        h, w = frames.size
        for t in range(frame_idx, len(frames)):
            yield FrameResult(t, np.ones((len(prompts), h, w), bool), np.ones((len(prompts), h, w), np.float32),
                              np.ones(len(prompts), np.float32))


def test_a_killed_predict_video_leaves_nothing_the_next_run_keeps(tmp_path, monkeypatch, capsys,
                                                                  davis_video):  # noqa: F811
    """What a run killed mid-propagation leaves (its output's temporary directory, its overlay's temporary
    file) is removed by the next run writing there."""
    from sam3_jax import fileio

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tag = f"tmp-{fileio._HOST}-{int(dead.stdout)}-abcd1234"
    (tmp_path / f".out.{tag}").mkdir()
    (tmp_path / f".out.{tag}" / "00002.png").write_bytes(b"half")
    (tmp_path / f".o.gif.{tag}.gif").write_bytes(b"half")
    root, _ = davis_video
    monkeypatch.setattr(VideoPredictor, "from_checkpoint", classmethod(lambda cls, d: _Tracker()))
    code, err = _main(capsys, "--checkpoint=unused", f"--video={root / 'JPEGImages' / 'vid'}",
                      f"--init_mask={root / 'init.png'}", "--init_frame=2", "--direction=forward",
                      f"--output={tmp_path / 'out'}", f"--overlay={tmp_path / 'o.gif'}")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["o.gif", "out"]


def test_overlay_is_checked_before_the_work_and_never_costs_the_masks(tmp_path, monkeypatch, capsys,
                                                                     davis_video):  # noqa: F811
    root, _ = davis_video
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.mp4").mkdir()
    args = ["--checkpoint=unused", f"--video={root / 'JPEGImages' / 'vid'}", f"--init_mask={root / 'init.png'}",
            "--init_frame=2", f"--output={tmp_path / 'out'}"]
    monkeypatch.setattr(VideoPredictor, "from_checkpoint", classmethod(lambda cls, d: pytest.fail("work started")))
    for overlay, message in [(tmp_path / "file" / "o.mp4", "Not a directory"), (tmp_path / "dir.mp4", "is not a file")]:
        code, err = _main(capsys, *args, f"--overlay={overlay}", "--overwrite")
        assert code == 2 and err.count("\n") == 1 and message.lower() in err.lower(), err
    assert not (tmp_path / "out").exists()
    # An overlay that fails all the same (here: the disk fills) leaves the finished masks in place.
    from sam3_jax.infer import video_io

    def full(*a):
        raise OSError(28, "No space left on device", str(tmp_path / "o.mp4"))

    monkeypatch.setattr(VideoPredictor, "from_checkpoint", classmethod(lambda cls, d: _Tracker()))
    monkeypatch.setattr(video_io, "write_overlay", full)
    code, err = _main(capsys, *args, f"--overlay={tmp_path / 'o.mp4'}", "--direction=forward")
    assert code == 2 and f"no space left on device: {tmp_path / 'o.mp4'}" in err and "are complete" in err, err
    assert sorted(os.listdir(tmp_path / "out")) == ["00002.png", "00003.png", "00004.png", "results.json"]
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())) > 0
