"""J&F, COCO AP and YouTube-VIS AP on hand-computed cases, cross-checked against pycocotools and a
brute-force disk dilation; the evaluate CLI end to end on small files."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from sam3_jax.data.errors import DataError
from sam3_jax.evaluation import coco, jf, ytvis

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def square(size, top, left, side=10):
    m = np.zeros((size, size), bool)
    m[top:top + side, left:left + side] = True
    return m


# ----------------------------------------------------------------------------------------- J & F

def test_j_shifted_square_and_edge_cases():
    gt, pred = square(40, 10, 10), square(40, 12, 13)  # overlap 8 x 7 = 56, union 200 - 56 = 144
    assert jf.region_similarity(pred, gt) == pytest.approx(56 / 144)
    empty = np.zeros((40, 40), bool)
    assert jf.region_similarity(empty, empty) == 1.0
    assert jf.region_similarity(gt, empty) == 0.0
    # batched over leading axes
    np.testing.assert_allclose(jf.region_similarity(np.stack([pred, gt]), np.stack([gt, gt])), [56 / 144, 1])


def test_j_void_pixels_count_for_neither_side():
    gt = np.zeros((20, 20), bool)
    gt[:10, :10] = True
    pred = np.zeros((20, 20), bool)
    pred[:10, :15] = True  # 50 extra pixels in columns 10..14
    assert jf.region_similarity(pred, gt) == pytest.approx(100 / 150)
    void = np.zeros((20, 20), bool)
    void[:, 12:] = True  # hides 30 of the 50
    assert jf.region_similarity(pred, gt, void) == pytest.approx(100 / 120)


def test_boundary_map_of_a_square():
    """Rows/columns 10..19: inner right column and bottom row, outer left column and top row."""
    b = jf.boundary_map(square(40, 10, 10))
    expected = np.zeros((40, 40), bool)
    expected[10:20, 19] = expected[19, 10:20] = True  # inside: last column, last row
    expected[9:20, 9] = expected[9, 9:20] = True  # outside: column and row before the first
    np.testing.assert_array_equal(b, expected)
    assert b.sum() == 40


def test_boundary_radius():
    assert jf.boundary_radius((40, 40)) == 1  # ceil(0.008 * 56.6)
    assert jf.boundary_radius((480, 854)) == 8  # ceil(0.008 * 979.6), DAVIS 480p
    assert jf.boundary_radius((480, 854), bound_th=3) == 3


def half_plane(columns, size=40):
    m = np.zeros((size, size), bool)
    m[:, :columns] = True
    return m  # boundary: the single column `columns - 1`


def test_f_hand_computed_cases():
    gt = half_plane(10)
    empty = np.zeros_like(gt)
    assert jf.boundary_f(gt, gt) == 1.0  # boundaries coincide
    assert jf.boundary_f(half_plane(11), gt) == 1.0  # 1 pixel off, tolerance ceil(0.45) = 1
    assert jf.boundary_f(half_plane(12), gt) == 0.0  # 2 pixels off: beyond the tolerance
    assert jf.boundary_f(empty, empty) == 1.0  # neither has a boundary
    assert jf.boundary_f(empty, gt) == 0.0  # precision 1, recall 0
    assert jf.boundary_f(gt, empty) == 0.0  # precision 0, recall 1
    # A step: edge at column 9 on rows 0..19, at column 12 on rows 20..39. Its boundary has 43
    # pixels (19 at column 9 on rows 0..18, (19, 9..12), 20 at column 12 on rows 20..39), of
    # which 21 are within 1 pixel of column 9 (rows 0..18, (19, 9), (19, 10)); of the 40 gt
    # pixels, rows 0..20 are within 1 pixel of it. F = 2 * 21 / (43 + 40).
    step = half_plane(10)
    step[20:, :13] = True
    assert jf.boundary_map(step).sum() == 43
    assert jf.boundary_f(step, gt) == pytest.approx(42 / 83)


def f_by_dilation(pred, gt, bound_th=jf.BOUND_TH):
    """The DAVIS recipe spelled out with an explicit disk dilation (the reference's method)."""
    r = math.ceil(bound_th * np.linalg.norm(pred.shape))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    disk = x ** 2 + y ** 2 <= r ** 2
    pb, gb = jf.boundary_map(pred), jf.boundary_map(gt)
    if not pb.any() or not gb.any():
        return jf.boundary_f(pred, gt)
    p = np.sum(pb & ndimage.binary_dilation(gb, disk)) / pb.sum()
    r_ = np.sum(gb & ndimage.binary_dilation(pb, disk)) / gb.sum()
    return 0.0 if p + r_ == 0 else 2 * p * r_ / (p + r_)


def test_f_matches_disk_dilation_on_random_blobs():
    rng = np.random.default_rng(0)
    for _ in range(6):
        h, w = rng.integers(60, 260, size=2)  # radii 1..3
        blobs = [ndimage.gaussian_filter(rng.random((h, w)), 4) > 0.5 for _ in range(2)]
        assert jf.boundary_f(*blobs) == pytest.approx(f_by_dilation(*blobs), abs=1e-12)


def test_statistics_recall_and_decay():
    mean, recall, decay = jf.statistics(np.array([1.0, 0.8, 0.6, 0.4, 0.2]))
    # 5 frames: bins [0:2], [1:3], [2:4], [3:5]: decay = (1 + .8) / 2 - (.4 + .2) / 2
    assert (mean, recall, decay) == pytest.approx((0.6, 0.6, 0.6))
    # 8 frames: bounds 1, 2.75, 4.5, 6.25, 8 round (half up) to 1, 3, 5, 6, 8: bins [0:3] and [5:8]
    _, recall, decay = jf.statistics(np.arange(8) / 10)
    assert recall == pytest.approx(2 / 8)
    assert decay == pytest.approx(0.1 - 0.6)


def test_evaluate_video_drops_first_and_last_and_summarizes():
    """Frames 1..5 predict the top k rows of the gt square (J = k / 10); 0 and 6 predict nothing."""
    gt = np.repeat(square(40, 10, 10)[None, None], 7, axis=0)
    pred = np.zeros_like(gt)
    for t, k in zip(range(1, 6), (10, 8, 6, 4, 2)):
        pred[t, 0, 10:10 + k, 10:20] = True
    scores = jf.evaluate_video(pred, gt)
    assert scores.j.shape == scores.f.shape == (1, 5)
    np.testing.assert_allclose(scores.j[0], [1.0, 0.8, 0.6, 0.4, 0.2])
    assert scores.f[0, 0] == 1.0
    table = jf.summarize(scores)
    assert table["J-Mean"] == pytest.approx(0.6)
    assert table["J-Recall"] == pytest.approx(0.6)
    assert table["J-Decay"] == pytest.approx(0.6)
    assert table["J&F-Mean"] == pytest.approx((table["J-Mean"] + table["F-Mean"]) / 2)
    full = jf.evaluate_video(pred, gt, skip_first_last=False)
    assert full.j.shape == (1, 7) and full.j[0, 0] == 0.0
    with pytest.raises(ValueError, match="3 frames"):
        jf.evaluate_video(pred[:2], gt[:2])


def test_evaluate_video_void_and_object_pooling():
    gt = np.zeros((3, 2, 20, 20), bool)
    gt[:, 0, :10, :10] = True
    gt[:, 1, 10:, 10:] = True
    pred = gt.copy()
    pred[:, 1] = False  # object 1 missed entirely
    s = jf.evaluate_video(pred, gt)
    np.testing.assert_allclose(s.j, [[1.0], [0.0]])
    void = np.zeros((3, 20, 20), bool)
    void[:, 10:, 10:] = True  # hides object 1: nothing left to score, so J = F = 1
    s_void = jf.evaluate_video(pred, gt, void=void)
    np.testing.assert_allclose(s_void.j, [[1.0], [1.0]])
    np.testing.assert_allclose(s_void.f, [[1.0], [1.0]])
    # every object weighs the same across videos: (1 + 0 + 1) / 3
    one = jf.evaluate_video(gt[:, :1], gt[:, :1])
    assert jf.summarize([s, one])["J-Mean"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------ COCO

BOXES = [np.array([[0, 0, 10, 10], [20, 20, 50, 40]], float)]  # xyxy


def test_coco_perfect_detections():
    gt = coco.gt_from_arrays([np.array([1, 2])], boxes=BOXES)
    dets = coco.detections_from_arrays([np.array([0.9, 0.8])], [np.array([1, 2])], boxes=BOXES)
    stats = coco.evaluate(gt, dets, "bbox")
    assert list(stats) == list(coco.STAT_NAMES)
    assert [stats[k] for k in ("AP", "AP50", "AP75", "AR100")] == pytest.approx([1, 1, 1, 1])


def test_coco_one_of_two_missed():
    gt = coco.gt_from_arrays([np.array([1, 1])], boxes=BOXES)
    dets = coco.detections_from_arrays([np.array([0.9])], [np.array([1])], boxes=BOXES[0][:1][None])
    stats = coco.evaluate(gt, dets, "bbox")
    assert stats["AR100"] == pytest.approx(0.5)
    assert stats["AP"] == pytest.approx(51 / 101)  # precision 1 at the 51 recall points 0..0.5


def test_coco_false_positive_scored_above_the_true_one():
    gt = coco.gt_from_arrays([np.array([1])], boxes=[BOXES[0][:1]])
    boxes = [np.array([[30, 30, 40, 40], [0, 0, 10, 10]], float)]
    dets = coco.detections_from_arrays([np.array([0.9, 0.8])], [np.array([1, 1])], boxes=boxes)
    stats = coco.evaluate(gt, dets, "bbox")
    assert stats["AP"] == pytest.approx(0.5)  # precision 1/2 when recall reaches 1
    assert stats["AR100"] == 1.0 and stats["AR1"] == 0.0


def random_instances(rng, n_images, size=64):
    labels, masks = [], []
    for _ in range(n_images):
        n = rng.integers(1, 4)
        labels.append(rng.integers(1, 3, size=n))
        ms = np.zeros((n, size, size), bool)
        for k in range(n):
            y, x = rng.integers(0, size - 8, size=2)
            h, w = rng.integers(4, size - max(y, x), size=2)
            ms[k, y:y + h, x:x + w] = True
        masks.append(ms)
    return labels, masks


def test_coco_matches_pycocotools_called_directly():
    rng = np.random.default_rng(1)
    labels, masks = random_instances(rng, 4)
    gt = coco.gt_from_arrays(labels, masks=masks)
    d_labels, d_masks = random_instances(rng, 4)
    d_masks = [np.concatenate([m, dm]) for m, dm in zip(masks, d_masks)]  # some hits, some misses
    d_labels = [np.concatenate([a, b]) for a, b in zip(labels, d_labels)]
    scores = [rng.random(len(x)) for x in d_labels]
    dets = coco.detections_from_arrays(scores, d_labels, masks=d_masks)
    for iou_type in coco.IOU_TYPES:
        ours = coco.evaluate(gt, dets, iou_type)
        ref_gt = COCO()
        ref_gt.dataset = json.loads(json.dumps(gt))
        ref_gt.createIndex()
        ref_dets = json.loads(json.dumps(dets))
        if iou_type == "segm":
            for d in ref_dets:
                d.pop("bbox")
        ev = COCOeval(ref_gt, ref_gt.loadRes(ref_dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        np.testing.assert_allclose(list(ours.values()), ev.stats)
        assert 0 < ours["AP"] < 1


def test_coco_json_files_and_bad_input(tmp_path):
    gt = coco.gt_from_arrays([np.array([1])], boxes=[BOXES[0][:1]])
    dets = coco.detections_from_arrays([np.array([0.9])], [np.array([1])], boxes=[BOXES[0][:1]])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    assert coco.evaluate(str(tmp_path / "gt.json"), str(tmp_path / "dets.json"))["AP"] == pytest.approx(1)
    assert coco.evaluate(gt, [])["AP"] == 0.0
    with pytest.raises(DataError, match=r"\[0\].image_id"):
        coco.evaluate(gt, [{**dets[0], "image_id": 7}])
    with pytest.raises(DataError, match="missing.json"):
        coco.evaluate(str(tmp_path / "missing.json"), dets)


# --------------------------------------------------------------------------------------- YouTube-VIS

def ytvis_gt(masklets, size=32, category=1):
    """One video per masklet; masklet: list of (H, W) masks or None per frame."""
    videos, anns = [], []
    for i, frames in enumerate(masklets):
        videos.append({"id": i + 1, "height": size, "width": size, "length": len(frames)})
        anns.append({"id": i + 1, "video_id": i + 1, "category_id": category, "iscrowd": 0,
                     "segmentations": [None if m is None else coco.encode_mask(m) for m in frames]})
    return {"videos": videos, "annotations": anns, "categories": [{"id": category, "name": "thing"}]}


def prediction(video_id, frames, score=0.9, category=1):
    return {"video_id": video_id, "category_id": category, "score": score,
            "segmentations": [None if m is None else coco.encode_mask(m) for m in frames]}


def test_ytvis_perfect_prediction():
    frames = [square(32, 2, 2), square(32, 4, 4), None]
    stats = ytvis.evaluate(ytvis_gt([frames]), [prediction(1, frames)])
    assert [stats[k] for k in ("AP", "AP50", "AP75", "APs", "AR1")] == pytest.approx([1] * 5)
    assert stats["APm"] == stats["APl"] == -1.0  # 100-pixel masks: small objects only


def test_ytvis_half_the_frames():
    """Same mask on frames 0..3, none on 4 (nor predicted); predicted on frames 0..1 only:
    IoU = 2 * 100 / (4 * 100) = 0.5, a match at IoU threshold 0.5 alone."""
    m = square(32, 5, 5)
    gt = ytvis_gt([[m, m, m, m, None]])
    pred = [prediction(1, [m, m, None, None, None])]
    iou = ytvis.masklet_ious([pred[0]["segmentations"]], [gt["annotations"][0]["segmentations"]])
    assert iou.shape == (1, 1) and iou[0, 0] == 0.5
    stats = ytvis.evaluate(gt, pred)
    assert stats["AP50"] == pytest.approx(1) and stats["AP75"] == 0.0
    assert stats["AP"] == pytest.approx(0.1)  # 1 of the 10 thresholds .5:.05:.95


def test_ytvis_area_is_the_mean_over_non_empty_frames():
    """150² in one of 4 frames: 22500 (medium); counting empty frames would make it 5625 (small)."""
    big = square(160, 0, 0, side=150)
    frames = [big, None, None, None]
    stats = ytvis.evaluate(ytvis_gt([frames], size=160), [prediction(1, frames)])
    assert stats["APm"] == pytest.approx(1) and stats["APs"] == -1.0


def test_masklet_ious_match_numpy():
    rng = np.random.default_rng(2)
    t, h, w = 5, 24, 20

    def masklet():
        masks = rng.random((t, h, w)) < rng.random()
        present = rng.random(t) < 0.7
        return masks * present[:, None, None], [coco.encode_mask(m) if p else None
                                                for m, p in zip(masks, present)]

    dts, gts = [masklet() for _ in range(4)], [masklet() for _ in range(3)]
    ours = ytvis.masklet_ious([d[1] for d in dts], [g[1] for g in gts])
    for i, (dm, _) in enumerate(dts):
        for j, (gm, _) in enumerate(gts):
            union = np.sum(dm | gm)
            assert ours[i, j] == pytest.approx(np.sum(dm & gm) / union if union else 0.0)


def test_ytvis_single_frame_videos_agree_with_coco_segm():
    """With one frame per video, video AP is mask AP (area ranges aside: compare the rest)."""
    rng = np.random.default_rng(3)
    labels, masks = random_instances(rng, 4)
    d_labels, d_masks = random_instances(rng, 4)
    d_masks = [np.concatenate([m, dm]) for m, dm in zip(masks, d_masks)]
    d_labels = [np.concatenate([a, b]) for a, b in zip(labels, d_labels)]
    scores = [rng.random(len(x)) for x in d_labels]
    want = coco.evaluate(coco.gt_from_arrays(labels, masks=masks),
                         coco.detections_from_arrays(scores, d_labels, masks=d_masks), "segm")
    gt = {"videos": [{"id": i + 1, "height": 64, "width": 64, "length": 1} for i in range(4)],
          "categories": [{"id": 1}, {"id": 2}], "annotations": []}
    preds = []
    for i in range(4):
        gt["annotations"] += [{"video_id": i + 1, "category_id": int(c),
                               "segmentations": [coco.encode_mask(m)]}
                              for c, m in zip(labels[i], masks[i])]
        preds += [{"video_id": i + 1, "category_id": int(c), "score": float(s),
                   "segmentations": ytvis.encode_masklet(m[None])}
                  for c, m, s in zip(d_labels[i], d_masks[i], scores[i])]
    got = ytvis.evaluate(gt, preds)
    for k in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert got[k] == pytest.approx(want[k]), k


def test_ytvis_bad_input_names_the_key():
    m = square(32, 5, 5)
    gt = ytvis_gt([[m, m]])
    with pytest.raises(DataError, match=r"\[0\].segmentations.*1 frames, but video 1 has 2"):
        ytvis.evaluate(gt, [prediction(1, [m])])
    with pytest.raises(DataError, match=r"\[0\].video_id.*video 5"):
        ytvis.evaluate(gt, [prediction(5, [m, m])])
    with pytest.raises(DataError, match=r"\[0\].score"):
        ytvis.evaluate(gt, [{k: v for k, v in prediction(1, [m, m]).items() if k != "score"}])
    bad = prediction(1, [m, m])
    bad["segmentations"][1] = {"size": [16, 16], "counts": "abc"}
    with pytest.raises(DataError, match=r"segmentations\[1\]"):
        ytvis.evaluate(gt, [bad])


# ------------------------------------------------------------------------------------------- CLI

def write_label_png(path, label):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [255] * (256 * 3 - 9))
    img.save(path)


def write_video(root, name, labels):
    for t, label in enumerate(labels):
        write_label_png(os.path.join(root, name, f"{t:05d}.png"), label)


def two_object_frames(n=5, size=32, shift=0):
    frames = []
    for _ in range(n):
        label = np.zeros((size, size), np.uint8)
        label[2:12, 2 + shift:12 + shift] = 1
        label[18:28, 18:28] = 2
        frames.append(label)
    return frames


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sam3_jax.evaluate", *args], cwd=REPO,
                          capture_output=True, check=False, text=True, timeout=120)


@pytest.fixture
def davis_dirs(tmp_path):
    """A DAVIS root (Annotations/480p) with two videos, and predictions: `a` exact, `b` with
    object 1 shifted 3 columns (J = 7 * 10 / 130 on the 3 scored frames) and object 2 exact."""
    gt_root, pred = str(tmp_path / "davis"), str(tmp_path / "pred")
    ann = os.path.join(gt_root, "Annotations", "480p")
    write_video(ann, "a", two_object_frames())
    write_video(ann, "b", two_object_frames())
    write_video(pred, "a", two_object_frames())
    write_video(pred, "b", two_object_frames(shift=3))
    return gt_root, pred


def test_cli_jf_end_to_end(davis_dirs, tmp_path):
    gt_root, pred = davis_dirs
    out = str(tmp_path / "out" / "metrics.json")
    r = run_cli("--metric=jf", f"--predictions={pred}", f"--gt={gt_root}", f"--output={out}")
    assert r.returncode == 0, r.stderr
    assert "J&F" in r.stdout and "b_1" in r.stdout
    result = coco.load_json(out)
    for key in ("J", "F", "J&F", "J-Recall", "J-Decay", "F-Recall", "F-Decay", "videos"):
        assert key in result
    assert set(result["videos"]) == {"a", "b"}
    a, b = result["videos"]["a"], result["videos"]["b"]
    assert a["J"] == a["F"] == a["J&F"] == 1.0
    assert set(b["objects"]) == {"1", "2"}
    assert b["objects"]["1"]["J"] == pytest.approx(70 / 130)
    assert b["objects"]["2"]["J"] == b["objects"]["2"]["F"] == 1.0
    assert result["J"] == pytest.approx((3 + 70 / 130) / 4)
    assert result["J&F"] == pytest.approx((result["J"] + result["F"]) / 2)
    assert not os.path.exists(out + ".tmp")
    # a plain directory of videos works as the ground truth too
    r2 = run_cli("--metric=jf", f"--predictions={pred}", f"--gt={gt_root}/Annotations/480p")
    assert r2.returncode == 0 and r2.stdout.splitlines()[:2] == r.stdout.splitlines()[:2]


def test_cli_jf_missing_frame(davis_dirs):
    gt_root, pred = davis_dirs
    missing = os.path.join(pred, "b", "00003.png")
    os.remove(missing)
    r = run_cli("--metric=jf", f"--predictions={pred}", f"--gt={gt_root}")
    assert r.returncode != 0 and missing in r.stderr


def test_cli_jf_size_mismatch(davis_dirs):
    gt_root, pred = davis_dirs
    wrong = os.path.join(pred, "a", "00002.png")
    write_label_png(wrong, np.zeros((16, 32), np.uint8))
    r = run_cli("--metric=jf", f"--predictions={pred}", f"--gt={gt_root}")
    assert r.returncode != 0 and wrong in r.stderr


def test_cli_coco_and_ytvis(tmp_path):
    gt = coco.gt_from_arrays([np.array([1])], masks=[square(32, 2, 2)[None]])
    dets = coco.detections_from_arrays([np.array([0.9])], [np.array([1])], masks=[square(32, 2, 2)[None]])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets").mkdir()
    (tmp_path / "dets" / "results.json").write_text(json.dumps(dets))
    out = str(tmp_path / "coco.json")
    r = run_cli("--metric=coco", f"--predictions={tmp_path / 'dets'}", f"--gt={tmp_path / 'gt.json'}",
                f"--output={out}")
    assert r.returncode == 0, r.stderr
    result = coco.load_json(out)
    assert result["bbox"]["AP"] == pytest.approx(1) and result["segm"]["AP"] == pytest.approx(1)

    frames = [square(32, 2, 2), None]
    (tmp_path / "vis.json").write_text(json.dumps(ytvis_gt([frames])))
    (tmp_path / "preds.json").write_text(json.dumps([{**prediction(1, frames), "video_id": 9}]))
    r = run_cli("--metric=ytvis", f"--predictions={tmp_path / 'preds.json'}", f"--gt={tmp_path / 'vis.json'}")
    assert r.returncode != 0 and "preds.json" in r.stderr and "video_id" in r.stderr
