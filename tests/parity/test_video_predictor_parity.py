"""The video predictor (``infer/video_predictor.py``) against the reference's ``Sam3TrackerPredictor``.

Both sides are the tiny model (``ModelConfig.tiny()`` detector, ``TrackerConfig.tiny()`` tracker, 112 px)
with the same seeded random weights: the reference is built from its own classes with the switches of
``model_builder.build_tracker`` (memory selection on, as ``build_sam3_video_model`` builds it), its
backbone is the reference image model's ``SAM3VLBackbone``; ours is the same weights written to a
``sam3.pt`` and converted (``VideoPredictor.from_checkpoint``). The reference is driven through its own
API end to end: ``init_state`` (frames prepared as ``io_utils`` does: PIL resize, float16, mean/std 0.5),
``add_new_mask`` / ``add_new_points_or_box`` per object, ``propagate_in_video_preflight``,
``propagate_in_video`` (forward, reverse, or forward then reverse as its ``propagation_direction="both"``).

Compared on every frame and object: the masks at the video's size (IoU >= 0.99; both empty counts as 1)
and the object score logits. On the prompt frame our output is compared with what ``add_new_*``
returned (the reference's propagation re-yields that frame from its low-res copy). ``select_memory``
in reverse is checked against the reference's choice in ``test_tracker_modules_parity.py``.
"""
import numpy as np
import pytest

from sam3_jax.data.synthetic import render_video
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig

pytestmark = pytest.mark.parity

MCFG, TCFG = ModelConfig.tiny(), TrackerConfig.tiny()
SCORE_BIAS = -0.2  # added to the object-score head: with random weights objects then come and go
MIN_IOU, SCORE_TOL = 0.99, 1e-3
FIGURES = {"min_iou": 1.0, "max_score_diff": 0.0}


@pytest.fixture(scope="module")
def predictors(ref, tmp_path_factory):
    from sam3_jax.infer.video_predictor import VideoPredictor
    from sam3_jax.testing import reference
    from sam3_jax.testing.parity import randomize_

    torch = ref.torch
    image_model = reference.build_image_model(MCFG)
    randomize_(image_model, seed=3)
    base = reference.build_tracker(TCFG, seed=7)
    with torch.no_grad():
        base.sam_mask_decoder.pred_obj_score_head.layers[2].bias += SCORE_BIAS
    converted = reference.convert_video_models(image_model, base, tmp_path_factory.mktemp("video_ckpt"), MCFG, TCFG)
    theirs = reference.build_tracker_predictor(image_model, base, TCFG)
    # Two objects a tracker call: the three objects of every case are tracked as a chunk and a remainder.
    return VideoPredictor.from_checkpoint(converted, objects_per_step=2), theirs


def _video(num_frames, seed=0):
    frames, labels, _ = render_video(np.random.default_rng(seed), num_frames, 80)  # 60 x 80 frames
    return np.stack([np.asarray(f) for f in frames]), np.stack(labels)


def _run_reference(ref, pred, frames, prompts, frame_idx, direction):
    """Masks (T, O, H, W) and scores (T, O) from the reference's own API, plus the add_new_* output."""
    from PIL import Image

    from sam3_jax.infer.video_predictor import Clicks

    torch = ref.torch
    t, h, w = frames.shape[:3]
    s = pred.image_size
    images = torch.zeros(t, 3, s, s, dtype=torch.float16)  # io_utils: float16 storage, normalised in place
    for i, frame in enumerate(frames):
        resized = np.asarray(Image.fromarray(frame).resize((s, s), Image.BILINEAR))
        images[i] = torch.from_numpy(resized).permute(2, 0, 1).float() / 255.0
    images -= torch.tensor([0.5] * 3, dtype=torch.float16)[:, None, None]
    images /= torch.tensor([0.5] * 3, dtype=torch.float16)[:, None, None]
    state = pred.init_state(video_height=h, video_width=w, num_frames=t, offload_video_to_cpu=True,
                            offload_state_to_cpu=True)
    state["images"] = images
    scale = np.array([w, h], np.float32)
    for obj_id, p in prompts.items():
        if isinstance(p, np.ndarray):
            _, _, _, video_res = pred.add_new_mask(state, frame_idx, obj_id, torch.from_numpy(p))
        else:
            p = p if isinstance(p, Clicks) else Clicks(box=p)
            box = None if p.box is None else np.array([[p.box.x0, p.box.y0], [p.box.x1, p.box.y1]]) / scale
            points = np.asarray(p.points, np.float32).reshape(-1, 2) / scale if len(p.points) else None
            labels = np.asarray(p.labels, np.int32) if len(p.labels) else None
            _, _, _, video_res = pred.add_new_points_or_box(
                state, frame_idx, obj_id, points=points, labels=labels,
                box=None if box is None else box.reshape(-1).astype(np.float32))
    masks = np.zeros((t, len(prompts), h, w), bool)
    scores = np.full((t, len(prompts)), np.nan, np.float32)
    masks[frame_idx] = video_res[:, 0].numpy() > 0
    pred.propagate_in_video_preflight(state)
    for reverse in {"forward": [False], "backward": [True], "both": [False, True]}[direction]:
        for f, _, _, video, obj_scores in pred.propagate_in_video(state, start_frame_idx=frame_idx,
                                                                  max_frame_num_to_track=None, reverse=reverse,
                                                                  tqdm_disable=True):
            scores[f] = obj_scores[:, 0].numpy()
            if f != frame_idx:
                masks[f] = video[:, 0].numpy() > 0
    return masks, scores


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def _compare(case, got, want_masks, want_scores, frames_done):
    present = 0
    for f in frames_done:
        for o in range(want_masks.shape[1]):
            iou = _iou(got.masks[f, o], want_masks[f, o])
            diff = abs(float(got.scores[f, o]) - float(want_scores[f, o]))
            FIGURES["min_iou"] = min(FIGURES["min_iou"], iou)
            FIGURES["max_score_diff"] = max(FIGURES["max_score_diff"], diff)
            present += bool(want_masks[f, o].any())
            print(f"{case} frame {f} object {o}: IoU {iou:.4f} (area {want_masks[f, o].sum()}), "
                  f"score {got.scores[f, o]:+.4f} vs {want_scores[f, o]:+.4f}")
            assert iou >= MIN_IOU, (case, f, o, iou)
            assert diff <= SCORE_TOL, (case, f, o, diff)
    return present


CASES = {  # three objects, one or more given by a mask, in every case: the jitted functions are shared
    # name: (frames, prompt frame, direction, prompt kinds)
    "forward_masks": (6, 0, "forward", ("mask", "mask", "box")),
    "backward_from_last": (6, 5, "backward", ("mask", "clicks", "box_clicks")),
    "both_from_middle": (8, 2, "both", ("mask", "box", "clicks")),
}


def _prompts(kinds, label, height, width):
    from sam3_jax.infer.video_predictor import Box, Clicks

    prompts = {}
    for i, kind in enumerate(kinds):
        obj = label == (i % max(1, label.max())) + 1
        ys, xs = np.nonzero(obj) if obj.any() else (np.array([height // 2]), np.array([width // 2]))
        if kind == "mask":
            # Object 2's mask grows into object 1's: overlapping mask prompts (the later one wins).
            prompts[10 + i] = obj if i != 1 else np.pad(obj, 3, mode="edge")[3:-3, :-6] | obj
        elif kind == "box":
            prompts[10 + i] = Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        elif kind == "clicks":
            prompts[10 + i] = Clicks([(float(xs.mean()), float(ys.mean()))], [1])
        else:  # a box and two clicks: 4 points, at max_points of the tiny tracker
            box = Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            prompts[10 + i] = Clicks([(float(xs.mean()), float(ys.mean())), (2.0, 3.0)], [1, 0], box=box)
    return prompts


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_propagation_matches_reference(ref, predictors, case):
    ours, theirs = predictors
    num_frames, k, direction, kinds = CASES[case]
    frames, labels = _video(num_frames, seed=num_frames + k)
    prompts = _prompts(kinds, labels[k], *frames.shape[1:3])
    want_masks, want_scores = _run_reference(ref, theirs, frames, prompts, k, direction)
    got = ours.propagate(frames, prompts, frame_idx=k, direction=direction)
    assert got.obj_ids == list(prompts)
    done = np.flatnonzero(got.tracked)
    assert list(done) == list(np.flatnonzero(~np.isnan(want_scores[:, 0])))
    present = _compare(case, got, want_masks, want_scores, done)
    for o, p in enumerate(prompts.values()):  # the prompt frame gives the prompt back
        if isinstance(p, np.ndarray):
            later = [q for q in list(prompts.values())[o + 1:] if isinstance(q, np.ndarray)]
            np.testing.assert_array_equal(got.masks[k, o], p & ~np.any(later, axis=0) if later else p)
    assert present > 0
    if direction != "backward":  # with these seeds objects also disappear (absent-object paths)
        assert present < len(done) * len(prompts)
    print(f"figures so far: {FIGURES}")
