"""The detect-and-track bookkeeping on hand-worked cases, and detection in blocks sharded over 8 host
devices against one frame at a time (no PyTorch; agreement with the reference's functions on random
inputs and end to end: tests/parity/test_detect_track_parity.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.checkpoint import converted
from sam3_jax.data.synthetic import render_video
from sam3_jax.infer import detect_track as dt
from sam3_jax.model import stacking
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.memory_bank import MemoryBank

CFG = dt.DetectTrackConfig()


def _box(y0, y1, x0, x1, size=10):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_iou_counts_pixels():
    a = np.stack([_box(0, 2, 0, 2), _box(0, 0, 0, 0)])  # 4 px, empty
    b = np.stack([_box(0, 2, 0, 4), _box(5, 6, 5, 6)])  # 8 px (covers a[0]), 1 px elsewhere
    np.testing.assert_allclose(dt.mask_iou(a, b), [[0.5, 0.0], [0.0, 0.0]])


def test_nms_keeps_the_best_of_overlapping_detections():
    masks = np.stack([_box(0, 4, 0, 4), _box(0, 4, 0, 3), _box(6, 9, 6, 9), _box(0, 4, 0, 4)])
    logits = np.where(masks, 5.0, -5.0)
    probs = np.array([0.6, 0.9, 0.7, 0.3])  # 0: IoU 0.75 with 1 (better) -> dropped; 3: below threshold
    np.testing.assert_array_equal(dt.nms_keep(probs, logits, 0.5, 0.5), [False, True, True, False])
    np.testing.assert_array_equal(dt.nms_keep(probs, logits, 0.5, 0.8), [True, True, True, False])


def test_association_without_tracks_takes_every_detection():
    """With no track the reference makes every kept detection an object, whatever new_det_thresh says."""
    det = np.stack([_box(0, 3, 0, 3), _box(5, 8, 5, 8)])
    a = dt.associate(det, np.array([0.55, 0.6]), np.zeros((0, 10, 10), bool), np.zeros(0), CFG)
    np.testing.assert_array_equal(a.new_det, [0, 1])
    assert a.det_to_trk == {} and a.recondition == {}


def test_association_hand_worked():
    det = np.stack([_box(0, 4, 0, 4), _box(6, 10, 6, 10), _box(0, 4, 5, 9)])
    trk = np.stack([_box(0, 4, 0, 4), _box(6, 10, 7, 10), _box(0, 0, 0, 0), _box(0, 2, 5, 9)])
    ids = np.array([3, 5, 8, 9])
    # IoU det0-trk3 = 1, det1-trk5 = 0.75, det2-trk9 = 0.5; det2 (prob 0.75) overlaps trk9: not new.
    a = dt.associate(det, np.array([0.9, 0.85, 0.75]), trk, ids, CFG)
    assert a.new_det.tolist() == []
    assert a.unmatched_ids.tolist() == [] and a.empty_ids.tolist() == [8]
    assert {k: v.tolist() for k, v in a.det_to_trk.items()} == {0: [3], 1: [5], 2: [9]}
    assert a.recondition == {3: 0}  # det1: IoU 0.75 < 0.8; det2: prob < 0.8
    # A confident detection on empty ground is new; a track with no detection is unmatched.
    a = dt.associate(det[1:2], np.array([0.75]), trk[[0]], ids[[0]], CFG)
    assert a.new_det.tolist() == [0] and a.unmatched_ids.tolist() == [3]
    a = dt.associate(det[1:2], np.array([0.65]), trk[[0]], ids[[0]], CFG)
    assert a.new_det.tolist() == []  # below new_det_thresh


def _assoc(unmatched=(), det_to_trk=None):
    return dt.Association(np.zeros(0, np.int64), np.array(unmatched, np.int64), np.zeros(0, np.int64),
                          {k: np.array(v, np.int64) for k, v in (det_to_trk or {}).items()}, {})


def test_hotstart_removes_young_unmatched_objects_only():
    cfg = dt.DetectTrackConfig(hotstart_delay=4, hotstart_unmatch_thresh=2, hotstart_dup_thresh=2)
    hot = dt.Hotstart(cfg)
    assert hot.update(0, _assoc(), [0]) == set()
    assert hot.update(1, _assoc(unmatched=[0]), []) == set()
    assert hot.update(2, _assoc(unmatched=[0]), [1]) == {0}  # first seen at 0 > 2 - 4: still young
    for f in range(3, 8):
        hot.update(f, _assoc(det_to_trk={0: [1]}), [])
    assert hot.update(8, _assoc(unmatched=[1]), []) == set()
    assert hot.update(9, _assoc(unmatched=[1]), []) == set()  # first seen at 2 <= 9 - 4: past hot-start
    assert hot.removed == {0}


def test_hotstart_removes_the_younger_duplicate():
    cfg = dt.DetectTrackConfig(hotstart_delay=5, hotstart_unmatch_thresh=3, hotstart_dup_thresh=2)
    hot = dt.Hotstart(cfg)
    hot.update(0, _assoc(), [0])
    hot.update(1, _assoc(), [1])
    assert hot.update(2, _assoc(det_to_trk={0: [0, 1]}), []) == set()
    assert hot.update(3, _assoc(det_to_trk={0: [0, 1]}), []) == {1}
    assert hot.overlaps == {(0, 1): [2, 3]}


def test_keep_alive_suppression_when_enabled():
    cfg = dt.DetectTrackConfig(hotstart_delay=0, hotstart_unmatch_thresh=5, init_trk_keep_alive=1,
                               suppress_unmatched_only_within_hotstart=False)
    hot = dt.Hotstart(cfg)
    hot.update(0, _assoc(), [0])
    hot.update(1, _assoc(unmatched=[0]), [])  # keep-alive 1 -> 0: hidden on this frame
    assert hot.suppressed[1] == {0} and not hot.removed


def test_occlusion_suppresses_the_more_recently_occluded():
    masks = np.stack([_box(0, 5, 0, 5), _box(0, 5, 0, 4), _box(7, 9, 7, 9)])
    # 0 and 1 overlap (IoU 0.8): 1 was occluded later than 0 -> 1 suppressed.
    np.testing.assert_array_equal(dt.occlusion_suppression(masks, np.array([2, 6, -1]), 0.7), [False, True, False])
    # A never-occluded object suppresses nothing (the reference asks the suppressing one to have been
    # occluded at some point too).
    np.testing.assert_array_equal(dt.occlusion_suppression(masks, np.array([-1, 6, -1]), 0.7), [False] * 3)
    np.testing.assert_array_equal(dt.occlusion_suppression(masks, np.array([4, -1, -1]), 0.7), [False] * 3)
    np.testing.assert_array_equal(dt.occlusion_suppression(masks, np.array([2, 6, -1]), 0.9), [False] * 3)
    np.testing.assert_array_equal(dt.occlusion_suppression(masks, np.array([-1, -1, -1]), 0.7), [False] * 3)


def test_object_wise_non_overlap_and_boxes():
    masks = np.stack([_box(0, 4, 0, 4), _box(2, 6, 2, 6), _box(8, 9, 8, 9)])
    out = dt.object_wise_non_overlap(masks, np.array([0.5, 0.9, 0.0]))
    assert not out[0, 2:4, 2:4].any() and out[1, 2:4, 2:4].all() and out[0, 0, 0]
    assert not out[2].any()  # a score of 0 keeps nothing
    np.testing.assert_allclose(dt.boxes_xywh(masks[:2]), [[0, 0, 0.3, 0.3], [0.2, 0.2, 0.3, 0.3]])


def test_fill_holes_hand_worked():
    logits = np.where(_box(1, 9, 1, 9), 2.0, -2.0)
    logits[4, 4] = -1.0  # a one-pixel hole
    logits[0, 9] = 3.0  # a one-pixel sprinkle (touches the square only diagonally: same 8-component)
    logits = np.stack([logits, np.where(_box(0, 1, 0, 1), 2.0, -2.0)])  # a tiny object: half its area is 0
    out = np.asarray(dt.fill_holes(jnp.asarray(logits), 4))
    assert out[0, 4, 4] == np.float32(0.1) and out[0, 0, 9] == 3.0  # diagonal contact keeps it
    assert out[1, 0, 0] == 2.0  # min(area // 2, max_area) = 0: not removed
    areas = np.asarray(dt.component_areas(jnp.asarray(logits > 0)))
    assert areas[0, 0, 9] == 63 + 1 and areas[0, 4, 4] == 0
    speck = np.where(_box(3, 9, 3, 9), 2.0, -2.0)
    speck[0, 0] = 3.0  # a separate one-pixel component: removed
    out = np.asarray(dt.fill_holes(jnp.asarray(speck[None]), 4))
    assert out[0, 0, 0] == np.float32(-0.1) and out[0, 5, 5] == 2.0


def test_commit_slot_policy():
    """Conditioning frames fill the first max_cond slots, the oldest replaced; tracked frames go to the
    other slots; reset rows start empty."""
    tcfg = TrackerConfig.tiny()  # max_cond_frames_in_attn 2
    pred = dt.DetectTrackPredictor.__new__(dt.DetectTrackPredictor)
    pred.tcfg, pred.num_cond = tcfg, tcfg.max_cond_frames_in_attn
    slots = pred.num_cond + 3
    bank = MemoryBank.empty(tcfg, 2, slots)
    g, d, c = tcfg.grid, tcfg.mem_dim, tcfg.d_model

    def commit(bank, f, cond, write=(True, True), reset=(False, False)):
        return pred._commit_fn(bank, jnp.full((2, g, g, d), f), jnp.full((2, c), f), jnp.full((2,), 0.5), f,
                               jnp.asarray(cond), jnp.asarray(write), jnp.asarray(reset))

    bank = commit(bank, 0, [True, True])
    for f in (1, 2):
        bank = commit(bank, f, [False, False])
    bank = commit(bank, 3, [True, False])
    bank = commit(bank, 4, [True, False], write=(True, False))
    frames = np.asarray(bank.frame)
    assert frames[0, :2].tolist() == [4, 3] and frames[0, 2:].tolist() == [1, 2, -1]
    assert frames[1, :2].tolist() == [0, -1] and frames[1, 2:].tolist() == [1, 2, 3]
    assert np.asarray(bank.is_cond)[0].tolist() == [True, True, False, False, False]
    bank = commit(bank, 5, [True, True], write=(False, True), reset=(False, True))
    assert np.asarray(bank.frame)[1].tolist() == [5, -1, -1, -1, -1]


def test_group_mean_over_valid_members():
    v = jnp.array([1.0, 3.0, 5.0, 7.0])
    out = dt.group_mean(v, jnp.array([0, 0, 1, 1]), jnp.array([True, True, True, False]))
    np.testing.assert_allclose(np.asarray(out), [2.0, 2.0, 5.0, 5.0])


def _random_params(mcfg, tcfg, seed=0, score_bias=2.0):
    """Seeded noise for the tiny detector + tracker (scaled by fan-in, as ``parity.randomize_``), drawn
    layer by layer in the torch layout, then stacked as the models hold them; the tracker's
    object-score bias raised so that tracks live on."""
    rng = np.random.default_rng(seed)

    def init(path, s):
        if len(s.shape) >= 2:
            x = max(0.02, 1 / np.sqrt(np.prod(s.shape[:-1]))) * rng.standard_normal(s.shape)
        else:
            x = (path[-1].key == "scale") + 0.1 * rng.standard_normal(s.shape)
        return jnp.asarray(x, s.dtype)

    abstract = converted.abstract_params(mcfg, tcfg)
    params = stacking.stacked_like(jax.tree_util.tree_map_with_path(init, stacking.unrolled_shapes(abstract)), abstract)
    head = params["tracker"]["sam_mask_decoder"]["pred_obj_score_head"]["layers_2"]
    head["bias"] = head["bias"] + score_bias
    return params


@pytest.fixture(scope="module")
def scenario():
    """The tiny models with random weights, thresholds around their scores (about 0.36) and a 10-frame
    video: objects start on frame 0, duplicates of the first are removed by hot-start, the first is
    tracked to the end. -> (params, configs, frames, the frames' results one frame at a time on one
    device with the default capacity, the (object rows, live objects) of each tracker call)."""
    mcfg, tcfg = ModelConfig.tiny().replace(joint_box_scores=True), TrackerConfig.tiny()
    params = _random_params(mcfg, tcfg)
    cfg = dt.DetectTrackConfig(score_threshold_detection=0.362, det_nms_thresh=0.95, new_det_thresh=0.362,
                               trk_assoc_iou_thresh=0.15, hotstart_delay=4, hotstart_unmatch_thresh=3,
                               hotstart_dup_thresh=3, occlusion_iou_thresh=0.3, recondition_every_nth_frame=3,
                               high_conf_thresh=0.37, high_iou_thresh=0.45, recondition_score_thresh=0.005,
                               detection_block=1)
    frames, _, _ = render_video(np.random.default_rng(4), 10, 80)
    frames = np.stack([np.asarray(f) for f in frames])
    pred = dt.DetectTrackPredictor(params, mcfg, tcfg, cfg)
    calls, track = [], pred._track

    def spy(params, pix, high_res, bank, valid, *args, **kwargs):
        calls.append((bank.frame.shape[0], int(valid.sum())))
        return track(params, pix, high_res, bank, valid, *args, **kwargs)

    pred._track = spy
    return params, (mcfg, tcfg, cfg), frames, list(pred.propagate_iter(frames, "a red ball")), calls


def _assert_same_results(want, got):
    assert [r.frame_idx for r in got] == [r.frame_idx for r in want]
    for a, b in zip(want, got):
        assert b.obj_ids.tolist() == a.obj_ids.tolist(), a.frame_idx
        for x, y in zip(a.masks, b.masks):
            assert (x & y).sum() >= 0.999 * (x | y).sum(), a.frame_idx
        np.testing.assert_allclose(b.probs, a.probs, atol=1e-5)


def test_detection_blocks_sharded_over_devices_change_nothing(scenario):
    """10 frames in blocks of 8 over 8 devices (the last block: 2 frames and 6 blanks) give what one frame
    at a time on one device gives."""
    assert jax.local_device_count() == 8  # tests/conftest.py
    params, (mcfg, tcfg, cfg), frames, want, _ = scenario
    pred = dt.DetectTrackPredictor(params, mcfg, tcfg, dataclasses.replace(cfg, detection_block=8))
    assert pred.mesh.size == 8
    got = list(pred.propagate_iter(frames, "a red ball"))
    assert pred._detect._cache_size() == 1  # the padded last block reuses the compiled call
    assert [r.frame_idx for r in got] == list(range(10))
    _assert_same_results(want, got)
    assert all(r.obj_ids.tolist() == [0] and r.masks[0].any() for r in want)


def test_padded_rows_are_powers_of_two_and_three_times_powers_of_two():
    assert [dt.padded_rows(n) for n in range(0, 26)] == [1, 1, 2, 3, 4, 6, 6, 8, 8] + [12] * 4 + [16] * 4 + [24] * 8 + [32]
    assert dt.padded_rows(200) == 256 and dt.padded_rows(192) == 192 and dt.padded_rows(97) == 128


def test_tracked_rows_follow_the_live_count(scenario):
    """The tracker runs over the live objects padded to `padded_rows`: the rows grow as objects start and
    shrink as hot-start removes them, and the results equal those of a fixed capacity of 16."""
    params, (mcfg, tcfg, cfg), frames, want, calls = scenario
    live = [n for _, n in calls]
    assert [rows for rows, _ in calls] == [dt.padded_rows(n) for n in live]
    assert max(live) > 2 and live[-1] == 1  # objects came, then went
    pred = dt.DetectTrackPredictor(params, mcfg, tcfg, dataclasses.replace(cfg, capacity=16))
    _assert_same_results(want, list(pred.propagate_iter(frames, "a red ball")))
    assert pred.capacity == 16


def test_two_calls_at_once_keep_their_own_state(scenario):
    """Two ``propagate_iter`` generators of one predictor, advanced in turn, give what each gives alone. With
    outputs not held back (``hotstart_delay`` 1) each step is one frame; the calls track 3 and 4 objects at
    once (different padded rows), one with a seed bank for its backward pass."""
    params, (mcfg, tcfg, cfg), frames, _, _ = scenario
    pred = dt.DetectTrackPredictor(params, mcfg, tcfg, dataclasses.replace(cfg, hotstart_delay=1))
    args = ((frames, "a red ball"), (frames[::-1], "a red ball", 5, "both"))
    alone = [list(pred.propagate_iter(*a)) for a in args]
    rows, track = [], pred._track

    def spy(params, pix, high_res, bank, *args, **kwargs):
        rows.append(bank.frame.shape[0])
        return track(params, pix, high_res, bank, *args, **kwargs)

    pred._track = spy
    calls = {k: pred.propagate_iter(*a) for k, a in enumerate(args)}
    together = {k: [] for k in calls}
    while calls:
        for k in list(calls):
            result = next(calls[k], None)
            if result is None:
                del calls[k]
            else:
                together[k].append(result)
    assert any(a != b for a, b in zip(rows, rows[1:]))  # the two calls' steps alternated at different sizes
    for want, got in zip(alone, together.values()):
        assert [r.frame_idx for r in got] == [r.frame_idx for r in want]
        for a, b in zip(want, got):
            assert b.obj_ids.tolist() == a.obj_ids.tolist() and np.array_equal(b.masks, a.masks)
            np.testing.assert_array_equal(b.probs, a.probs)
