"""Trainer reporting: metrics.jsonl (types, strict JSON with NaN, resume truncation), TensorBoard
events read back from disk, the progress line's ETA on a fake clock, and mask overlays.

Neither ``tensorboard`` (not a dependency) nor tensorboardX ships an event-file reader, so the event
files are read here over their TFRecord framing with tensorboardX's own protos and CRC, applying
TensorBoard's purge rule (a SessionLog.START at step s hides the events seen so far at steps >= s).
"""
import glob
import io
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from sam3_jax.evaluation import overlay
from sam3_jax.train import reporting


def _records(path):
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
        body = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
        pos += 16 + length
        yield event_pb2.Event.FromString(body)


def _tensorboard(workdir):
    """What TensorBoard shows: {tag: [(step, value)]} for scalars, {tag: [(step, image)]} for images,
    and the SessionLog.START steps."""
    files = sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")))
    assert files
    events, starts = [], []
    for path in files:
        for event in _records(path):
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                starts.append(event.step)
                events = [e for e in events if e.step < event.step]
            elif event.HasField("summary"):
                events.append(event)
    scalars, images = {}, {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("image"):
                image = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
                images.setdefault(value.tag, []).append((event.step, image))
            else:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, images, starts


def _jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n")

    def strict(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=strict) for line in text.splitlines()]


def _metrics(step):
    return {"loss": np.float32(1.0 / step), "loss_ce": jnp.float32(0.5), "lr/vision": 1e-4,
            "grad_norm": np.float64(2.5), "frames_per_s": 3.25, "step_time_s": 0.5,
            "skipped_samples": np.int64(step % 3)}


def test_metrics_jsonl_and_tensorboard(tmp_path):
    workdir = str(tmp_path)
    writer = reporting.MetricsWriter(workdir)
    for step in (1, 2, 3):
        writer.scalars(step, _metrics(step))
    writer.scalars(4, {"loss": float("nan"), "grad_norm": jnp.inf, "skipped_samples": 0})
    image = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    writer.images(3, {"overlays/clip0": image})
    writer.close()

    rows = _jsonl(workdir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert list(rows[0]) == ["step", "loss", "loss_ce", "lr/vision", "grad_norm", "frames_per_s",
                             "step_time_s", "skipped_samples"]
    assert rows[1] == {"step": 2, "loss": pytest.approx(0.5), "loss_ce": 0.5, "lr/vision": 1e-4,
                       "grad_norm": 2.5, "frames_per_s": 3.25, "step_time_s": 0.5, "skipped_samples": 2}
    assert type(rows[1]["skipped_samples"]) is int and type(rows[1]["loss"]) is float
    assert rows[3] == {"step": 4, "loss": None, "grad_norm": None, "skipped_samples": 0}

    scalars, images, starts = _tensorboard(workdir)
    assert starts == [1]
    assert set(scalars) == set(_metrics(1))
    assert scalars["loss"][:3] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert np.isnan(scalars["loss"][3][1]) and scalars["grad_norm"][3] == (4, np.inf)
    assert scalars["lr/vision"] == [(s, pytest.approx(1e-4)) for s in (1, 2, 3)]
    assert scalars["skipped_samples"] == [(1, 1), (2, 2), (3, 0), (4, 0)]
    (step, read), = images["overlays/clip0"]
    assert step == 3 and np.array_equal(read, image)


def test_resume_drops_steps_after_checkpoint(tmp_path):
    workdir = str(tmp_path)
    writer = reporting.MetricsWriter(workdir)
    for step in range(1, 11):
        writer.scalars(step, {"loss": float(step)})
    writer.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"step": 11, "lo')  # the line a crash cut short

    writer = reporting.MetricsWriter(workdir, start_step=6)
    assert [row["step"] for row in _jsonl(workdir)] == [1, 2, 3, 4, 5, 6]
    for step in (7, 8):
        writer.scalars(step, {"loss": 100.0 + step})
    writer.close()
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl.tmp"))

    rows = _jsonl(workdir)
    assert [(row["step"], row["loss"]) for row in rows] == [(s, float(s)) for s in range(1, 7)] + [
        (7, 107.0), (8, 108.0)]
    scalars, _, starts = _tensorboard(workdir)
    assert starts == [1, 7]
    assert scalars["loss"] == [(row["step"], row["loss"]) for row in rows]


def test_scalars_rejects_non_scalars(tmp_path):
    writer = reporting.MetricsWriter(str(tmp_path))
    with pytest.raises(ValueError, match="not a scalar"):
        writer.scalars(1, {"loss": np.zeros(2)})
    with pytest.raises(ValueError, match="step"):
        writer.scalars(1, {"step": 1})
    writer.close()


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (45, "45s"), (59.6, "1m00s"), (250, "4m10s"),
                                           (7380, "2h03m"), (100 * 3600 + 59, "100h00m")])
def test_format_duration(seconds, text):
    assert reporting.format_duration(seconds) == text


def test_progress_eta_ignores_first_step():
    times = iter([10.0, 11.0, 12.0])
    progress = reporting.Progress(total_steps=1000, clock=lambda: next(times))
    # First line: only the compile-heavy step to go by, so no ETA.
    assert progress.line(101, {"loss": 1.23456}).endswith("loss 1.235 | ETA ?")
    progress.line(102, {})
    line = progress.line(103, {"loss": 1.23456, "frames_per_s": 3.21, "skipped_samples": 3})
    # From step 101 on: 2 steps in 2 s -> 897 s to go.
    assert line == "step 103/1000 (10%) | loss 1.235 | 3.2 frames/s | skipped_samples 3 | ETA 14m57s"


def test_progress_without_elapsed_steps():
    progress = reporting.Progress(total_steps=10, clock=lambda: 5.0)
    assert progress.line(10, {}) == "step 10/10 (100%) | ETA ?"


def _clip():
    frames = np.full((6, 40, 48, 3), 100, np.uint8)
    masks = np.zeros((6, 3, 20, 24), np.float32)  # half resolution, probabilities
    masks[:, 0, :10] = 0.9  # query 0: top half
    masks[:, 1, 10:] = 0.9  # query 1: bottom half, scored under the threshold
    masks[:, 2] = 0.2  # query 2: scored highest, but no pixel in its mask
    scores = np.tile(np.array([0.8, 0.3, 0.9], np.float32), (6, 1))
    return frames, masks, scores


def _tinted(k, alpha):
    """A grey-100 pixel under palette colour k at ``alpha``, as overlay.draw blends it."""
    return ((1 - alpha) * np.float32(100) + alpha * overlay.PALETTE[k].astype(np.float32)).astype(np.uint8)


def _band(text, width):
    """The caption band ``overlay.caption`` puts over a row ``width`` wide: (lines * 13, width, 3)."""
    band = overlay.caption(np.zeros((0, width, 3), np.uint8), text)
    assert (band >= 200).all(-1).sum() > 20  # white text on the dark band
    assert (band == overlay.CAPTION_BACKGROUND).all(-1).mean() > 0.5
    return band


def test_caption_wraps_to_the_width():
    assert _band("ground truth", 200).shape == (overlay.CAPTION_HEIGHT, 200, 3)
    assert _band("predictions: top 3, faint < 0.50 (mask boxes)", 100).shape == (3 * overlay.CAPTION_HEIGHT, 100, 3)


def test_overlay_clip_draws_the_top_predictions_solid_and_faint_with_a_caption():
    frames, masks, scores = _clip()
    out = reporting.overlay_clip(frames, masks, scores, max_frames=4)
    band = _band("predictions: top 3, faint < 0.50 (mask boxes)", 4 * 48)  # the row is labelled
    c = len(band)
    assert out.dtype == np.uint8 and out.shape == (c + 40, 4 * 48, 3) and np.array_equal(out[:c], band)
    row = out[c:].reshape(40, 4, 48, 3)
    # Inside each mask, away from its box outline and its score: query 0 (0.8) solid, query 1 (0.3)
    # faint; query 2 has no pixel, so neither mask nor box.
    assert (row[15, :, 40] == _tinted(0, 0.5)).all() and (row[30, :, 40] == _tinted(1, 0.2)).all()
    # Each box (the mask's extent) outlined in its query's colour: query 0's top-left corner, query 1's left edge.
    assert (row[0, :, 0] == overlay.PALETTE[0]).all() and (row[30, :, 0] == overlay.PALETTE[1]).all()
    # The score is written in the box's colour: "0.80" at query 0's top-left corner.
    near = np.abs(row[2:14, 0, 2:28].astype(int) - overlay.PALETTE[0]).max(-1) <= 30
    assert near.sum() > 10


def test_overlay_clip_top_k_and_given_boxes():
    frames, masks, scores = _clip()
    only_best = reporting.overlay_clip(frames, masks, scores, max_frames=1, top_k=1)
    c = len(_band("predictions: top 1, faint < 0.50 (mask boxes)", 48))
    assert (only_best[c + 22:] == 100).all()  # query 1 is not among the top 1 of the drawable ones
    boxes = np.tile(np.array([[0, 0, 1, .5], [0, .5, 1, 1], [.5, .5, 1, 1]], np.float32), (6, 1, 1))
    out = reporting.overlay_clip(frames, masks, scores, pred_boxes=boxes, max_frames=2, score_threshold=0.85)
    band = _band("predictions: top 3, faint < 0.85", 2 * 48)  # the model's boxes: no "(mask boxes)"
    c = len(band)
    assert np.array_equal(out[:c], band)
    # Query 2 (0.9) shows with its given box although its mask is empty, solid, drawn last.
    assert (out[c + 20, 30:46] == overlay.PALETTE[2]).all()
    assert (out[c + 15, 40] == _tinted(0, 0.2)).all()  # query 0 (0.8) is faint under 0.85


def test_overlay_clip_with_ground_truth_and_few_frames():
    frames, masks, scores = _clip()
    frames[1] = 50  # picked frames are spread over the clip: 0 and 5 of 6 with max_frames=2
    gt = np.zeros((6, 2, 40, 48), bool)
    gt[:, 1, :, :24] = True  # annotation 1 (palette colour 1): left half
    out = reporting.overlay_clip(jnp.asarray(frames), jnp.asarray(masks > 0.5), scores,
                                 gt_masks=gt, max_frames=2)
    c = len(_band("predictions: top 3, faint < 0.50 (mask boxes)", 2 * 48))
    g = _band("ground truth", 2 * 48)
    assert out.shape == (c + 40 + len(g) + 40, 2 * 48, 3)
    assert not (out[c:c + 40] == 50).all(-1).any()  # frame 1 is not picked
    assert np.array_equal(out[c + 40:c + 40 + len(g)], g)
    gt_row = out[c + 40 + len(g):].reshape(40, 2, 48, 3)
    assert (gt_row[:, :, :24] == _tinted(1, 0.5)).all() and (gt_row[:, :, 24:] == 100).all()
    one = reporting.overlay_clip(frames[:1], masks[:1], scores[:1])
    assert one.shape == (len(_band("predictions: top 3, faint < 0.50 (mask boxes)", 48)) + 40, 48, 3)


def test_mask_boxes():
    masks = np.zeros((2, 6, 8), bool)
    masks[0, 1:3, 2:7] = True
    assert overlay.mask_boxes(masks).tolist() == [[2, 1, 7, 3], [0, 0, 0, 0]]
