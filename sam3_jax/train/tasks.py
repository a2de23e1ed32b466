"""The training tasks: what a run trains and how it is scored, one object per task.

``config.mode`` only picks the tasks (`tasks_for`): "detector" the `DetectorTask`, "tracker" the
`TrackerTask`, "joint" both. Each task names the models (parameter trees) it needs, gives its part of
the train step's loss (`step.make_loss_fn`'s arguments) and builds its held-out `Evaluation` (its eval
step and the val_* metrics it writes). `program.build` composes the tasks' losses into one train step
(one backbone pass), and the trainer runs their evaluations on the same held-out clips.
"""
from __future__ import annotations

import collections

import jax
import numpy as np

from sam3_jax.data import schema
from sam3_jax.evaluation import jf
from sam3_jax.train import config as config_lib
from sam3_jax.train import metrics, reporting, tracker_stage, video_eval
from sam3_jax.train import step as step_lib
from sam3_jax.train.losses.tracker import TrackerLossConfig
from sam3_jax.train.tracker_prompts import PromptConfig

# The tracker's held-out J&F per eval.jf_protocol, written as val_<prefix>{j,f,jf}: "clips" scores the eval
# pipeline's clips with the training-time tracker, "videos" whole held-out videos as predict_video and
# evaluate --metric=jf do (train/video_eval.py).
JF_PREFIX = {"clips": "", "videos": "video_"}
JF = ("j", "f", "jf")


class Evaluation:
    """One task's held-out evaluation, run at each of the trainer's evaluations: where ``reads_clips``,
    ``start()``, then for each batch of the eval pipeline's clips ``add(dispatch(params, sharded),
    batch)`` (every task's ``dispatch`` runs before any ``add`` reads back); then ``result(params)``,
    {metric name without "val_": value}, and ``images(params, first batch)`` for TensorBoard."""

    reads_clips = True

    def images(self, params, batch) -> dict[str, np.ndarray]:
        return {}


class DetectorTask:
    """Text-prompted detection of every (frame, phrase) query: the detector's losses on the local frames
    of each shard; held out, its loss, detection rates and COCO AP, and an overlay of its predictions."""

    name = "detector"
    models = ("detector",)
    splits_objects = False  # its work is split over "frame" by frames only

    def metric_names(self, config) -> list[str]:
        return ["loss", *metrics.RATES, *(metrics.COCO_AP if config.eval.coco_max_detections else ())]

    def check(self, config) -> None:
        """Nothing of the evaluation config is the detector's alone."""

    def loss_parts(self, config, model_cfgs: dict) -> dict:
        return {"detect": True}

    def evaluation(self, prog) -> Evaluation:
        return DetectorEvaluation(prog)


class DetectorEvaluation(Evaluation):
    """The eval step's loss, loss terms and detection counts summed over the batches (the loss per batch
    and `metrics.rates` reported), COCO AP over each query's ``eval.coco_max_detections`` best
    predictions (at most the decoder's queries; 0: none), and ``overlays/clip0``."""

    def __init__(self, prog):
        self.config, self.mesh = prog.config, prog.mesh
        self.top_k = min(prog.config.eval.coco_max_detections, prog.model_cfg.decoder.num_queries)
        with jax.set_mesh(prog.mesh):
            self.step = jax.jit(step_lib.make_eval_fn(prog.model_cfg, prog.loss_cfg, prog.mesh, top_k=self.top_k))
        self.predict = jax.jit(step_lib.make_predict_fn(prog.model_cfg))

    def start(self) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.coco_images: list[dict] = []  # one per query

    def dispatch(self, params, batch):
        return self.step(params, batch, jax.random.key(0))

    def add(self, out, batch) -> None:
        sums, detections = out
        for k, v in jax.device_get(sums).items():
            self.totals[k] += float(v)
        if self.top_k:
            self.coco_images += metrics.coco_images(jax.device_get(detections), batch)

    def result(self, params) -> dict[str, float]:
        out = {"loss": self.totals["loss"] / self.config.eval.num_batches, **metrics.rates(self.totals)}
        if self.top_k:
            out.update(metrics.coco_ap(self.coco_images))
        return out

    def images(self, params, batch) -> dict[str, np.ndarray]:
        return {"overlays/clip0": self.overlay(params, batch)}

    def overlay(self, params, batch) -> np.ndarray:
        """Predictions for the first phrase of the batch's first clip, over its frames (GT below)."""
        clip = {k: np.asarray(v[:1]) for k, v in batch.items()}
        with jax.set_mesh(self.mesh):
            masks, scores = jax.device_get(self.predict(params, clip))
        p = clip["phrase_valid"].shape[1]
        gt = schema.unpack_masks(clip["masks"][0]) & clip["query_positives"][0, :, 0, :, None, None]
        return reporting.overlay_clip(clip["frames"][0], masks[::p] > 0, scores[::p], gt_masks=gt,
                                      score_threshold=self.config.eval.overlay_score_threshold)


class TrackerTask:
    """Semi-supervised tracking of each clip's objects (SAM 2's recipe): the tracker's losses as the
    step's clip-level stage, on the features of the detector's backbone (which the tracker recipe
    freezes); held out, the J&F of ``eval.jf_protocol``."""

    name = "tracker"
    models = ("detector", "tracker")
    splits_objects = True  # the clip's objects are split over "frame" (data.max_objects a multiple of it)

    def metric_names(self, config) -> list[str]:
        return [JF_PREFIX[config.eval.jf_protocol] + name for name in JF]

    def check(self, config) -> None:
        """The "videos" protocol reads held-out videos in DAVIS layout: other eval sources are refused."""
        if config.eval.jf_protocol == "videos":
            video_eval.check_sources(config.eval.sources)

    def loss_parts(self, config, model_cfgs: dict) -> dict:
        stage = tracker_stage.make_tracker_stage(
            model_cfgs["tracker"], PromptConfig(**config.tracker.prompts.to_dict()),
            TrackerLossConfig(**config.tracker.loss.to_dict()), dtype=model_cfgs["detector"].compute_dtype)
        return {"clip_stage": stage}

    def evaluation(self, prog) -> Evaluation:
        if prog.config.eval.jf_protocol == "videos":
            return VideoJF(prog)
        return ClipJF(prog)


class ClipJF(Evaluation):
    """J&F of the eval pipeline's clips, tracked by the training-time tracker from their first frame's
    ground-truth masks (`tracker_stage.make_tracker_predict`); none where no clip could be scored."""

    def __init__(self, prog):
        predict = tracker_stage.make_tracker_predict(prog.tracker_cfg, dtype=prog.model_cfg.compute_dtype)
        with jax.set_mesh(prog.mesh):
            self.step = jax.jit(step_lib.make_tracker_eval_fn(prog.model_cfg, predict, prog.mesh))

    def start(self) -> None:
        self.videos: list[jf.VideoScores] = []

    def dispatch(self, params, batch):
        return self.step(params, batch)

    def add(self, out, batch) -> None:
        self.videos += video_scores(*jax.device_get(out), batch["frame_valid"])

    def result(self, params) -> dict[str, float]:
        return jf_means(self.videos) if self.videos else {}


class VideoJF(Evaluation):
    """J&F of every held-out video whole, as ``predict_video`` + ``evaluate --metric=jf`` give it for
    the step's checkpoint (`video_eval.VideoEvaluator`)."""

    reads_clips = False

    def __init__(self, prog):
        self.evaluator = video_eval.VideoEvaluator(prog.config.eval.sources, prog.model_cfg, prog.tracker_cfg,
                                                   prog.mesh)

    def result(self, params) -> dict[str, float]:
        return {JF_PREFIX["videos"] + k: v for k, v in self.evaluator(params).items()}


def jf_means(videos: list[jf.VideoScores]) -> dict[str, float]:
    """{"j", "f", "jf"}: DAVIS's means over the videos."""
    table = jf.summarize(videos)
    return {"j": table["J-Mean"], "f": table["F-Mean"], "jf": table["J&F-Mean"]}


def video_scores(pred, gt, tracked, frame_valid) -> list[jf.VideoScores]:
    """DAVIS J and F per clip, over its tracked objects and valid frames; pred, gt (B, N, T, M, M)."""
    scores = []
    for b in range(pred.shape[0]):
        objects, frames = np.flatnonzero(tracked[b]), int(frame_valid[b].sum())
        if objects.size and frames >= 3:  # DAVIS scores the frames between the first and the last
            scores.append(jf.evaluate_video(np.swapaxes(pred[b, objects, :frames], 0, 1),
                                            np.swapaxes(gt[b, objects, :frames], 0, 1)))
    return scores


# The tasks of each of `config.MODES`.
_TASKS = {"detector": (DetectorTask,), "tracker": (TrackerTask,), "joint": (DetectorTask, TrackerTask)}


def tasks_for(mode: str) -> tuple[DetectorTask | TrackerTask, ...]:
    """The tasks ``config.mode`` trains, the detector's first."""
    if mode not in _TASKS:
        raise ValueError(f"mode={mode!r}: one of {', '.join(config_lib.MODES)}")
    return tuple(task() for task in _TASKS[mode])


def models(tasks) -> tuple[str, ...]:
    """The models (parameter trees) the tasks need together, in the order they first name them."""
    return tuple(dict.fromkeys(name for task in tasks for name in task.models))


def loss_parts(tasks, config, model_cfgs: dict) -> dict:
    """`step.make_loss_fn`'s arguments for the tasks together: the detector's per-query losses
    (``detect``) and the clip-level stage (one task at most has one)."""
    parts = {"detect": False, "clip_stage": None}
    for task in tasks:
        parts.update(task.loss_parts(config, model_cfgs))
    return parts
