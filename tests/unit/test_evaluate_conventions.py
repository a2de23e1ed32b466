"""`evaluate` follows the official evaluators' conventions: --videos subsets, DAVIS's object ids
1..max of the first frame, unread first/last predictions and refused ids, YouTube-VIS prediction
areas from the masks, COCO `segm` detection areas from the masks."""
import json
import os

import numpy as np
import pytest
from test_evaluation import (davis_dirs, prediction, run_cli, square, two_object_frames,  # noqa: F401
                             write_label_png, write_video, ytvis_gt)

from sam3_jax import evaluate
from sam3_jax.data.errors import DataError
from sam3_jax.evaluation import coco, jf, ytvis


def one_line_exit_2(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


# ------------------------------------------------------------------------------------- --videos

def test_videos_subset_as_list_or_file(davis_dirs, tmp_path):
    gt_root, pred = davis_dirs
    full = evaluate.run_jf(pred, gt_root)
    only_b = evaluate.run_jf(pred, gt_root, "b")
    assert set(only_b["videos"]) == {"b"}
    assert only_b["videos"]["b"] == full["videos"]["b"]
    assert only_b["J"] == pytest.approx((1 + 70 / 130) / 2)  # b's two objects alone
    assert evaluate.run_jf(pred, gt_root, " a , b ")["J"] == full["J"]
    # A DAVIS ImageSets file: one name a line; videos outside it need no predictions.
    os.rename(os.path.join(pred, "a"), os.path.join(pred, "not_a"))
    sets = tmp_path / "davis" / "ImageSets" / "2017"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("b\n\n")
    assert evaluate.run_jf(pred, gt_root, str(sets / "val.txt"))["videos"] == only_b["videos"]


def test_videos_unknown_name_or_missing_file_is_one_line(davis_dirs, tmp_path):
    gt_root, pred = davis_dirs
    ann = os.path.join(gt_root, "Annotations", "480p")
    with pytest.raises(DataError, match="unknown video.*zebra"):
        evaluate.run_jf(pred, gt_root, "b,zebra")
    with pytest.raises(DataError, match="no video names"):
        evaluate.run_jf(pred, gt_root, " , ")
    r = run_cli("--metric=jf", f"--predictions={pred}", f"--gt={gt_root}", "--videos=b,zebra")
    one_line_exit_2(r, ann, "--videos", "zebra")
    missing = str(tmp_path / "ImageSets" / "val.txt")
    r = run_cli("--metric=jf", f"--predictions={pred}", f"--gt={gt_root}", f"--videos={missing}")
    one_line_exit_2(r, missing, "no such file")
    r = run_cli("--metric=ytvis", f"--predictions={pred}", f"--gt={gt_root}", "--videos=b")
    one_line_exit_2(r, "--videos", "only --metric=jf")


def test_flag_mistakes_are_one_line_exit_2(davis_dirs):
    gt_root, pred = davis_dirs
    one_line_exit_2(run_cli("--metric=jf", f"--predictions={pred}"), "--gt")
    one_line_exit_2(run_cli("--metric=jff", f"--predictions={pred}", f"--gt={gt_root}"), "jff")
    one_line_exit_2(run_cli("--metric=jf", f"--predictions={pred}", f"--gt={gt_root}", "--vidoes=a"), "vidoes")
    one_line_exit_2(run_cli("--metric=jf", f"--predictions={pred}", f"--gt={gt_root}", "a"), "unexpected")


# ---------------------------------------------------------------------------------------- DAVIS

def test_videos_without_first_frame_objects_are_skipped(davis_dirs):
    gt_root, pred = davis_dirs
    write_label_png(os.path.join(gt_root, "Annotations", "480p", "a", "00000.png"), np.zeros((32, 32), np.uint8))
    assert set(evaluate.run_jf(pred, gt_root)["videos"]) == {"b"}
    with pytest.raises(DataError, match="no video to score has objects"):
        evaluate.run_jf(pred, gt_root, "a")


def test_first_and_last_predictions_are_optional_and_unread(davis_dirs):
    gt_root, pred = davis_dirs
    full = evaluate.run_jf(pred, gt_root)
    for name in ("a", "b"):
        os.remove(os.path.join(pred, name, "00000.png"))
        write_label_png(os.path.join(pred, name, "00004.png"), np.full((32, 32), 9, np.uint8))  # id 9: unread
    assert evaluate.run_jf(pred, gt_root) == full


def test_objects_are_ids_one_to_the_first_frames_max(tmp_path):
    """First frame: ids 1 and 3 (2 absent); id 4 appears later. Scored: 1, 2, 3; id 2, absent on
    both sides, scores J = F = 1 as in DAVIS; id 4 is not scored."""
    gt_dir, pred = str(tmp_path / "gt"), str(tmp_path / "pred")
    frames = []
    for t in range(5):
        label = np.zeros((32, 32), np.uint8)
        label[2:12, 2:12] = 1
        label[18:28, 18:28] = 3
        if t >= 2:
            label[2:8, 20:30] = 4
        frames.append(label)
    write_video(gt_dir, "v", frames)
    shifted = [f.copy() for f in frames]
    for f in shifted:
        f[(f == 3) | (f == 4)] = 0  # a predicted 4 would be refused (see below)
        f[18:28, 21:31] = 3  # object 3 shifted 3 columns: J = 70 / 130
    write_video(pred, "v", shifted)
    objects = evaluate.run_jf(pred, gt_dir)["videos"]["v"]["objects"]
    assert list(objects) == ["1", "2", "3"]
    assert objects["1"]["J"] == objects["1"]["F"] == objects["2"]["J"] == objects["2"]["F"] == 1.0
    assert objects["3"]["J"] == pytest.approx(70 / 130)
    want = jf.per_object(jf.evaluate_video(
        np.stack([[f == i for i in (1, 2, 3)] for f in shifted]),
        np.stack([[f == i for i in (1, 2, 3)] for f in frames])))
    np.testing.assert_allclose([o["F"] for o in objects.values()], want["F-Mean"])


@pytest.mark.parametrize("bad_id", [3, 255])
def test_predicted_id_above_the_first_frames_max_is_refused(davis_dirs, bad_id):
    """DAVIS refuses a result whose scored frames hold an id above the ground truth's objects; 255
    is no void in a result, just such an id. In the first frame (never read) it is harmless."""
    gt_root, pred = davis_dirs
    label = two_object_frames()[0]
    label[0, 0] = bad_id
    write_label_png(os.path.join(pred, "b", "00000.png"), label)
    evaluate.run_jf(pred, gt_root)
    bad = os.path.join(pred, "b", "00002.png")
    write_label_png(bad, label)
    with pytest.raises(DataError, match=f"object id {bad_id} is above 2"):
        evaluate.run_jf(pred, gt_root)
    r = run_cli("--metric=jf", f"--predictions={pred}", f"--gt={gt_root}")
    one_line_exit_2(r, bad, f"object id {bad_id}", os.path.join("b", "00000.png"))


# ---------------------------------------------------------------------------------- COCO and VIS

def test_ytvis_prediction_areas_come_from_the_masks():
    """A small false positive scored above the hit: APs 0.5 (precision 1/2 at recall 1). Trusting
    its claimed `areas` (large) would move it out of the small range and report APs 1."""
    hit, miss = square(64, 2, 2), square(64, 40, 40)
    gt = ytvis_gt([[hit, hit]], size=64)
    fp = {**prediction(1, [miss, miss], score=0.9), "areas": [300.0 ** 2] * 2}
    honest = prediction(1, [miss, miss], score=0.9)
    for false_positive in (fp, honest):
        stats = ytvis.evaluate(gt, [false_positive, prediction(1, [hit, hit], score=0.5)])
        assert stats["APs"] == pytest.approx(0.5) and stats["APl"] == -1.0
    # The ground truth's own `areas` still decide its range, as in ytvoseval.
    gt["annotations"][0]["areas"] = [300.0 ** 2] * 2
    assert ytvis.evaluate(gt, [prediction(1, [hit, hit])])["APl"] == pytest.approx(1)


def test_coco_segm_detection_area_is_the_mask_area():
    """As pycocotools' loadRes: a segm detection's area is its mask's pixel count, whatever `area`
    the results file says (here the small false positive stays in the small range)."""
    hit, miss = square(64, 2, 2)[None], square(64, 40, 40)[None]
    gt = coco.gt_from_arrays([np.array([1])], masks=[hit])
    dets = coco.detections_from_arrays([np.array([0.9, 0.5])], [np.array([1, 1])],
                                       masks=[np.concatenate([miss, hit])])
    want = coco.evaluate(gt, dets, "segm")
    claimed = [{**dets[0], "area": 300.0 ** 2}, dets[1]]
    assert coco.evaluate(json.loads(json.dumps(gt)), claimed, "segm") == want
    assert want["APs"] == pytest.approx(0.5)
