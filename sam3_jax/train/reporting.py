"""What the trainer reports: ``metrics.jsonl`` + TensorBoard (``MetricsWriter``), a console line with
an ETA (``Progress``) and overlays of the top predictions on a few frames (``overlay_clip``).

Steps here are counted as the trainer's checkpoints count them: the metrics of step s are those of
the s-th completed train step, so a checkpoint at step s covers every logged step <= s, and a run
resumed from it logs s + 1 next.

``metrics.jsonl``: one JSON object per ``MetricsWriter.scalars`` call, ``step`` first, then the
keys as given, values as plain ints and floats. Non-finite values (a diverged loss) are written as
``null`` so that every line stays strict JSON (``json.dumps`` would write the invalid ``NaN``);
TensorBoard keeps the exact value.

TensorBoard tags are the keys verbatim; '/' in a key groups the plots (``lr/vision``,
``loss/loss_ce``).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping

import numpy as np
import tensorboardX

from sam3_jax.evaluation import overlay
from sam3_jax.nn import ops

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(key: str, value) -> int | float:
    """A Python int/float from a Python, numpy or jax scalar (bools become 0/1)."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {key!r} is not a scalar: shape {array.shape}")
    item = array.item()
    if isinstance(item, (bool, int)):
        return int(item)
    if isinstance(item, float):
        return item
    raise TypeError(f"metric {key!r} is not a number: {item!r}")


def _kept(line: str, start_step: int) -> bool:
    """Whether a line of an earlier run's metrics.jsonl belongs before ``start_step``'s checkpoint.

    A line without its newline or that does not parse is the one a crash cut short: dropped too.
    """
    if not line.endswith("\n"):
        return False
    try:
        return json.loads(line)["step"] <= start_step
    except (ValueError, KeyError, TypeError):
        return False


def _truncate(path: str, start_step: int) -> None:
    """Drop the lines logged after ``start_step`` by a run that died after its last checkpoint.

    The file is rewritten through a temporary file and ``os.replace`` so that it is never left
    half-written if this process dies too.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line for line in lines if _kept(line, start_step)]
    if kept == lines:
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """``workdir/metrics.jsonl`` and TensorBoard event files under ``workdir/tensorboard/``.

    ``start_step`` is the step of the checkpoint the run starts from (0 for a fresh run): what an
    earlier run in the same workdir logged after it is dropped from metrics.jsonl and purged from
    TensorBoard's view, so that both show each step once.
    """

    def __init__(self, workdir: str, start_step: int = 0):
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        _truncate(path, start_step)
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115  (open until close())
        # TensorBoard hides the events at steps >= purge_step of the event files read before this
        # one. Event files are named by the second they were opened in and opened with "wb": the
        # suffix keeps a run restarted within the same second from overwriting the last one's file,
        # and still sorts it (TensorBoard reads them in name order) after it.
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                              purge_step=start_step + 1,
                                              filename_suffix=f".{time.time_ns()}")

    def scalars(self, step: int, values: Mapping[str, object]) -> None:
        """One metrics.jsonl line and one TensorBoard scalar per key; flushed, so a crash loses at
        most the line being written."""
        if "step" in values:
            raise ValueError("'step' is the step argument, not a metric")
        step = int(step)
        plain = {key: _plain(key, value) for key, value in values.items()}
        record = {"step": step}
        record.update({k: v if math.isfinite(v) else None for k, v in plain.items()})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        for key, value in plain.items():
            self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8 (H, W, 3) images (e.g. from ``overlay_clip``) to TensorBoard, tagged by key."""
        for key, image in images.items():
            self._tb.add_image(key, np.asarray(image), int(step), dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()


def format_duration(seconds: float) -> str:
    """45 -> '45s', 250 -> '4m10s', 7380 -> '2h03m': short enough for a progress line."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """The console progress line, with an ETA from the wall-clock rate of this run's steps.

    The rate is measured from the first ``line`` call on, so that the first step's compilation (and
    the data pipeline's warm-up) does not drag it down; the first line has no ETA.
    """

    def __init__(self, total_steps: int, clock: Callable[[], float] = time.monotonic):
        self._total = int(total_steps)
        self._clock = clock
        self._anchor: tuple[int, float] | None = None

    def line(self, step: int, values: Mapping[str, object]) -> str:
        """'step 120/1000 (12%) | loss 1.234 | 3.2 frames/s | ETA 4m10s' for ``step`` done.

        ``frames_per_s`` in ``values`` is shown as 'N frames/s', every other key as 'key value'.
        """
        step, now = int(step), self._clock()
        if self._anchor is None:
            self._anchor = (step, now)
        steps, elapsed = step - self._anchor[0], now - self._anchor[1]
        eta = format_duration(max(self._total - step, 0) * elapsed / steps) if steps > 0 and elapsed > 0 else "?"
        parts = [f"step {step}/{self._total} ({100 * step // max(self._total, 1)}%)"]
        for key, value in values.items():
            value = _plain(key, value)
            parts.append(f"{value:.1f} frames/s" if key == "frames_per_s" else f"{key} {value:.4g}")
        parts.append(f"ETA {eta}")
        return " | ".join(parts)


def _binary(masks, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) bool, or numbers such as probabilities (> 0.5 is in), as bool masks at ``size``
    (nearest, as ``F.interpolate``)."""
    if masks.dtype != bool:
        masks = masks > 0.5
    return ops.resize_nearest(masks, size)


def _draw_top(frame, masks, scores, boxes, shown, top_k: int, score_threshold: float) -> np.ndarray:
    """One frame's ``top_k`` best-scoring queries among ``shown``, each with its mask, box and score:
    those at or over the threshold solid, those under it faint (so that a model still learning
    shows where it looks); the best is drawn last, on top. masks (Q, H, W) bool, scores (Q,),
    boxes (Q, 4) pixels, shown (Q,) bool."""
    candidates = np.flatnonzero(shown)
    top = candidates[np.argsort(-scores[candidates], kind="stable")[:top_k]][::-1]
    faint, solid = top[scores[top] < score_threshold], top[scores[top] >= score_threshold]
    out = frame
    for picked, alpha, width in ((faint, 0.2, 1), (solid, 0.5, 2)):
        if picked.size:
            out = overlay.draw(out, masks[picked], boxes[picked], scores[picked], alpha=alpha, ids=picked,
                               width=width)
    return out


def overlay_clip(frames, pred_masks, pred_scores, gt_masks=None, max_frames: int = 4,
                 score_threshold: float = 0.5, pred_boxes=None, top_k: int = 3, title: str = "predictions"
                 ) -> np.ndarray:
    """Each frame's ``top_k`` best predictions (mask, box, score; solid at or over
    ``score_threshold``, faint under it) over up to ``max_frames`` frames, spread evenly over the
    clip and laid side by side under a caption naming the row (``overlay.caption``, C pixels high):
    uint8 (C + H, n * W, 3).

    frames: uint8 (T, H, W, 3); pred_masks: bool or float probabilities (T, Q, h, w), at any
    resolution; pred_scores: (T, Q) probabilities; pred_boxes: optional (T, Q, 4) xyxy in [0, 1]
    (without them each mask's extent is its box, as the caption says, and an empty mask is not
    shown); gt_masks: optional (T, N, H', W') drawn as a second, captioned row below. Query q keeps
    one colour over the frames, so that a tracked object can be followed; ground-truth colours are
    by annotation index and need not match.
    """
    frames, pred_masks = np.asarray(frames), np.asarray(pred_masks)
    t, h, w = frames.shape[:3]
    picks = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    scores = np.asarray(pred_scores)
    gt_masks = None if gt_masks is None else np.asarray(gt_masks)
    pred_row, gt_row = [], []
    for i in picks:
        masks = _binary(pred_masks[i], (h, w))
        if pred_boxes is None:  # a mask without a pixel then has nothing to show
            boxes, shown = overlay.mask_boxes(masks), masks.any((1, 2))
        else:
            boxes, shown = np.asarray(pred_boxes[i]) * [w, h, w, h], np.ones(len(masks), bool)
        pred_row.append(_draw_top(frames[i], masks, scores[i], boxes, shown, top_k, score_threshold))
        if gt_masks is not None:
            gt_row.append(overlay.draw(frames[i], _binary(gt_masks[i], (h, w))))
    boxes_from = " (mask boxes)" if pred_boxes is None else ""
    rows = [overlay.caption(np.concatenate(pred_row, axis=1),
                            f"{title}: top {top_k}, faint < {score_threshold:.2f}{boxes_from}")]
    if gt_masks is not None:
        rows.append(overlay.caption(np.concatenate(gt_row, axis=1), "ground truth"))
    return np.concatenate(rows, axis=0)


# The headline figures of a finished run, in this order; every val_* key follows them.
SUMMARY_KEYS = ("loss", "grad_norm", "lr", "frames_per_s", "nonfinite_steps", "skipped_samples")


def summary(values: Mapping[str, float], step: int, total_steps: int, workdir: str) -> str:
    """The end of a run as a short table: the last logged headline figures and evaluation (the
    rest of each step's values are in metrics.jsonl and TensorBoard)."""
    keys = [k for k in SUMMARY_KEYS if k in values] + sorted(k for k in values if k.startswith("val_"))
    width = max((len(k) for k in keys), default=0)
    rows = [f"  {k:<{width}}  {values[k]:.4g}" for k in keys]
    head = f"finished at step {step} of {total_steps} in {workdir}"
    return "\n".join([head + (":" if rows else ""), *rows, f"  (every value: {os.path.join(workdir, METRICS_FILE)})"])
