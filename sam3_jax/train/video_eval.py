"""Held-out J&F of whole videos, as ``predict_video`` and ``evaluate --metric=jf`` compute it
(``eval.jf_protocol="videos"``).

Each held-out video of the DAVIS-layout eval sources is tracked whole by the inference
`VideoPredictor`, at the video's own size, from its first ground-truth frame's masks (every id on it,
as ``predict_video --init_mask``), forward; each frame becomes the map of ids ``predict_video`` writes
(`video_outputs.label_map`), and `evaluation.davis` scores the maps with ``evaluate``'s conventions
(ids 1..N of the first frame, frames 1..T-2). The parameters are those of the step evaluated, laid
out as the predictors read a checkpoint (every stack scanned), so the figure is the one those two
programs give for that step's checkpoint.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from sam3_jax.data.sources.davis import LabelMapAnnotation
from sam3_jax.evaluation import davis, jf
from sam3_jax.infer import video_outputs
from sam3_jax.infer.video_inputs import ImageFolderFrames
from sam3_jax.infer.video_predictor import VideoPredictor
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.train import mesh as mesh_lib


def check_sources(sources) -> None:
    """The "videos" protocol reads videos in DAVIS layout (frames, palette PNGs of ids, a split): an
    eval source of another kind is refused, naming it."""
    if not sources:
        raise ValueError('eval.jf_protocol="videos" needs eval.sources: the held-out videos (DAVIS layout)')
    for name, src in sources.items():
        if src.kind != "davis":
            raise ValueError(f'eval.jf_protocol="videos" scores held-out videos in DAVIS layout, as predict_video '
                             f'and evaluate --metric=jf read them: eval.sources.{name} has kind={src.kind!r}; give '
                             f'it kind="davis" (image_dir, annotations, file_list) or use eval.jf_protocol="clips"')


def track_video(predictor: VideoPredictor, frame_dir: str, first_gt: str) -> dict[str, np.ndarray]:
    """The maps of ids ``predict_video --init_mask=first_gt`` writes for the frames of ``frame_dir``,
    by PNG name (``00003.png``)."""
    first = LabelMapAnnotation(first_gt)
    ids_map = first.label_map()
    prompts = {i: ids_map == i for i in first.visible_ids()}
    if not prompts:  # nothing to track; the evaluation skips the video
        return {}
    frames = ImageFolderFrames(frame_dir)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in frames.paths]
    return {stems[r.frame_idx] + ".png": video_outputs.label_map(r, list(prompts))
            for r in predictor.propagate_iter(frames, prompts, 0, "forward")}


class VideoEvaluator:
    """``evaluator(params) -> {"j", "f", "jf"}``: DAVIS J&F over every object of every held-out video of
    ``sources`` (eval sources of kind "davis"), tracked with ``params`` (the run's, on ``mesh``). The
    predictor is built at the first evaluation and its compiled steps serve every later one."""

    def __init__(self, sources, model_cfg: ModelConfig, tracker_cfg: TrackerConfig, mesh):
        check_sources(sources)
        self.sources = sources
        self.model_cfg, self.tracker_cfg = model_cfg, tracker_cfg
        self.predictor: VideoPredictor | None = None
        self._gather = jax.jit(lambda p: p, out_shardings=mesh_lib.replicated(mesh))

    def predictor_params(self, params: dict) -> dict:
        """The run's parameters whole on one local device."""
        return jax.tree.map(lambda x: x.addressable_data(0), self._gather(params))

    def scores(self, params: dict) -> list[jf.VideoScores]:
        """Each held-out video's per-frame J and F, in the order of the sources and their splits."""
        params = self.predictor_params(params)
        if self.predictor is None:
            self.predictor = VideoPredictor(params, self.model_cfg, self.tracker_cfg)
        self.predictor.params = params
        scores = []
        for src in self.sources.values():
            gt_dir = davis.annotation_dir(src.annotations)
            names = davis.video_names(gt_dir, src.file_list or None)
            maps = {name: track_video(self.predictor, os.path.join(src.image_dir, name),
                                      os.path.join(gt_dir, name, davis.pngs(os.path.join(gt_dir, name))[0]))
                    for name in names}
            scored = davis.score_videos(davis.LabelMaps(maps), gt_dir, src.file_list or None)
            scores += [s for s, _ in scored.values()]
        return scores

    def __call__(self, params: dict) -> dict[str, float]:
        table = jf.summarize(self.scores(params))
        return {"j": table["J-Mean"], "f": table["F-Mean"], "jf": table["J&F-Mean"]}
