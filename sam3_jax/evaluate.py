"""Score saved predictions against ground truth: DAVIS J&F, COCO box/mask AP or YouTube-VIS mAP.

  python -m sam3_jax.evaluate --metric=jf --predictions=RESULTS_DIR --gt=DAVIS_ROOT [--output=m.json]
  python -m sam3_jax.evaluate --metric=jf --predictions=RESULTS_DIR --gt=DAVIS_ROOT --videos=val.txt
  python -m sam3_jax.evaluate --metric=coco --predictions=dets.json --gt=instances_val.json
  python -m sam3_jax.evaluate --metric=ytvis --predictions=results.json --gt=valid.json

jf: DIR/<video>/<frame>.png palette PNGs of object ids (0 background, 255 void) for both sides;
--gt may also be a DAVIS root (its Annotations/480p is used); --videos scores a subset (a list, or
a file of names such as ImageSets/2017/val.txt). As davis2017-evaluation's semi-supervised task:
a video's objects are ids 1..N, N the highest id of its first ground-truth frame (an id absent
from it still counts, J = F = 1 where neither side has it); only frames 1..T-2 are scored, so
predictions for the first and last frames may be absent (they are not read); a predicted id
above N (255 included) in a scored frame is refused; void pixels count as background.
coco / ytvis: JSON files (or a directory holding one). As pycocotools: a `segm` detection's area
(for the small/medium/large ranges) is its mask's pixel count and a `bbox` one's its box's w*h,
whatever `area` the file gives, while a ground-truth instance keeps its `area` field (COCO's is
the polygon's area); ytvis recomputes every prediction's per-frame areas from its masks.

Prints the table; --output writes the numbers as JSON. Bad input: one line naming the file, exit 2.
"""
import json
import os
import sys

import numpy as np
from absl import app, flags

from sam3_jax.data.errors import DataError
from sam3_jax.data.sources.base import read_name_list

FLAGS = flags.FLAGS


def annotation_dir(root: str) -> str:
    """The directory of per-video folders: a DAVIS root's Annotations/480p (or Annotations), or
    `root` itself."""
    for sub in (("Annotations", "480p"), ("Annotations",)):
        if os.path.isdir(os.path.join(root, *sub)):
            return os.path.join(root, *sub)
    return root


def _pngs(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))


def video_names(gt_dir: str, videos: str | None) -> list[str]:
    """The videos to score: every folder of PNG frames under gt_dir, or those `videos` names (a
    comma-separated list or a file of one name per line); an unknown name is a DataError."""
    names = sorted(n for n in os.listdir(gt_dir)
                   if os.path.isdir(os.path.join(gt_dir, n)) and _pngs(os.path.join(gt_dir, n)))
    if not names:
        raise DataError(gt_dir, "videos", "no video folders of PNG frames")
    if videos is None:
        return names
    if os.path.isfile(videos):
        wanted = read_name_list(videos)
    elif os.sep in videos or videos.endswith(".txt"):
        raise DataError(videos, "--videos", "no such file of video names")
    else:
        wanted = [v.strip() for v in videos.split(",") if v.strip()]
    if not wanted:
        raise DataError(videos or "''", "--videos", "no video names given")
    unknown = [v for v in wanted if v not in names]
    if unknown:
        raise DataError(gt_dir, "--videos", f"unknown video(s) {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}: not a folder of ground-truth PNGs here")
    return list(dict.fromkeys(wanted))


def load_video(pred_dir: str, gt_dir: str, name: str):
    """(pred, gt) bool (T-2, O, H, W) of the scored frames 1..T-2 and the object ids 1..N of one
    video, or None when its first ground-truth frame has no objects."""
    from sam3_jax.data.sources.davis import LabelMapAnnotation

    frames = _pngs(os.path.join(gt_dir, name))
    if len(frames) < 3:
        raise DataError(os.path.join(gt_dir, name), "frames",
                        f"{len(frames)} frame(s); J&F drops the first and last, so needs 3 or more")
    first_path = os.path.join(gt_dir, name, frames[0])
    first = LabelMapAnnotation(first_path)
    ids = list(range(1, max(first.visible_ids(), default=0) + 1))
    if not ids:
        return None
    scored = frames[1:-1]
    pred = np.zeros((len(scored), len(ids)) + first.size, bool)
    gt = np.zeros_like(pred)
    for t, frame in enumerate(scored):
        gt_path, pred_path = os.path.join(gt_dir, name, frame), os.path.join(pred_dir, name, frame)
        g = LabelMapAnnotation(gt_path)
        if g.size != first.size:
            raise DataError(gt_path, "size", f"{g.size} differs from the video's first frame {first.size}")
        if not os.path.isfile(pred_path):
            raise DataError(pred_path, "frame", f"missing prediction for ground-truth frame {gt_path}")
        p = LabelMapAnnotation(pred_path)
        if p.size != g.size:
            raise DataError(pred_path, "size", f"prediction {p.size} != ground truth {g.size} ({gt_path})")
        top = int(p.label_map().max())
        if top > ids[-1]:
            raise DataError(pred_path, "id", f"object id {top} is above {ids[-1]}, the highest id of the "
                            f"first ground-truth frame {first_path} (the DAVIS evaluation refuses it)")
        gt[t], pred[t] = g.masks(ids), p.masks(ids)
    return pred, gt, ids


def run_jf(pred_root: str, gt_root: str, videos: str | None = None) -> dict:
    """J&F of the videos under gt_root (all, or those `videos` names) against pred_root: the
    DAVIS table plus per-video and per-object values."""
    from sam3_jax.evaluation import jf

    gt_dir = annotation_dir(gt_root)
    for path, what in ((gt_dir, "ground truth"), (pred_root, "predictions")):
        if not os.path.isdir(path):
            raise DataError(path, "directory", f"{what} directory does not exist")
    names = video_names(gt_dir, videos)
    all_scores, per_video = [], {}
    for name in names:
        if not os.path.isdir(os.path.join(pred_root, name)):
            raise DataError(os.path.join(pred_root, name), "video", "missing prediction folder")
        loaded = load_video(pred_root, gt_dir, name)
        if loaded is None:
            print(f"warning: {name}: no objects in the first ground-truth frame, skipped", file=sys.stderr)
            continue
        pred, gt, ids = loaded
        scores = jf.evaluate_video(pred, gt, skip_first_last=False)  # load_video kept 1..T-2
        all_scores.append(scores)
        per = jf.per_object(scores)
        objects = {str(i): {k.replace("-Mean", ""): float(v[n]) for k, v in per.items()}
                   for n, i in enumerate(ids)}
        j, f = float(np.mean(per["J-Mean"])), float(np.mean(per["F-Mean"]))
        per_video[name] = {"J": j, "F": f, "J&F": (j + f) / 2, "objects": objects}
    if not all_scores:
        raise DataError(gt_dir, "objects", "no video to score has objects in its first ground-truth frame")
    table = jf.summarize(all_scores)
    return {"J": table["J-Mean"], "F": table["F-Mean"], "J&F": table["J&F-Mean"],
            **{k: table[k] for k in ("J-Recall", "J-Decay", "F-Recall", "F-Decay")},
            "videos": per_video}


def json_file(path: str, flag: str) -> str:
    """`path` if a file, else the one JSON file in directory `path` (results.json if several)."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".json"))
        if len(found) == 1 or "results.json" in found:
            return os.path.join(path, found[0] if len(found) == 1 else "results.json")
        raise DataError(path, flag, f"expected a JSON file or a directory holding one; found {found}")
    raise DataError(path, flag, "does not exist")


def _renamed(e: DataError, names: dict[str, str]) -> DataError:
    """The in-memory placeholders the metric modules name, replaced by the files they came from."""
    return DataError(names.get(e.path, e.path), e.field, e.message)


def run_coco(pred_path: str, gt_path: str, iou_type: str) -> dict:
    from sam3_jax.evaluation import coco

    gt, dets = coco.load_json(gt_path), coco.load_json(pred_path)
    types = [iou_type]
    if iou_type == "auto":
        masks = isinstance(dets, list) and dets and all(isinstance(d, dict) and "segmentation" in d
                                                         for d in dets)
        types = ["bbox", "segm"] if masks else ["bbox"]
    try:
        return {t: coco.evaluate(gt, dets, t) for t in types}
    except DataError as e:
        raise _renamed(e, {"<ground truth>": gt_path, "<detections>": pred_path}) from e


def run_ytvis(pred_path: str, gt_path: str) -> dict:
    from sam3_jax.evaluation import coco, ytvis

    gt, preds = coco.load_json(gt_path), coco.load_json(pred_path)
    try:
        return ytvis.evaluate(gt, preds)
    except DataError as e:
        raise _renamed(e, {"<ground truth>": gt_path, "<predictions>": pred_path}) from e


def format_table(metric: str, result: dict) -> str:
    if metric == "jf":
        cols = ["J&F", "J", "J-Recall", "J-Decay", "F", "F-Recall", "F-Decay"]
        lines = ["  ".join(f"{c:>8}" for c in cols), "  ".join(f"{result[c]:8.3f}" for c in cols), "",
                 f"{'object':<24}  {'J':>6}  {'F':>6}"]
        for name, video in result["videos"].items():
            for obj, v in video["objects"].items():
                lines.append(f"{name + '_' + obj:<24}  {v['J']:6.3f}  {v['F']:6.3f}")
        return "\n".join(lines)
    groups = result.items() if metric == "coco" else [("segm", result)]
    return "\n".join(f"{t:<5} " + "  ".join(f"{k} {v:.3f}" for k, v in stats.items())
                     for t, stats in groups)


def write_json(path: str, value: dict) -> None:
    """Atomically: readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def define_flags() -> None:
    """The command line's flags: defined when run as a program, so that importing the module (the
    library functions above) defines none that another entry point defines too."""
    flags.DEFINE_string("predictions", None, "Predictions: a directory of PNG videos (jf) or a JSON file.")
    flags.DEFINE_string("gt", None, "Ground truth: a directory of PNG videos or DAVIS root (jf), or a JSON file.")
    flags.DEFINE_enum("metric", None, ["jf", "coco", "ytvis"], "Which benchmark to compute.")
    flags.DEFINE_string("output", None, "Optional JSON file for the numbers.")
    flags.DEFINE_string("videos", None, "jf: score only these videos: comma-separated names, or a file "
                        "of one name per line (e.g. DAVIS's ImageSets/2017/val.txt).")
    flags.DEFINE_enum("coco_iou_type", "auto", ["auto", "bbox", "segm"],
                      "coco: box AP, mask AP, or auto (box AP, plus mask AP when every detection has "
                      "a segmentation).")


def parse_flags(argv):
    """absl's flag errors (a missing, unknown or mistyped flag) as one line, exit code 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    try:
        if FLAGS.videos is not None and FLAGS.metric != "jf":
            raise DataError("--videos", "metric", "only --metric=jf scores a subset of videos")
        if FLAGS.metric == "jf":
            result = run_jf(FLAGS.predictions, FLAGS.gt, FLAGS.videos)
        elif FLAGS.metric == "coco":
            result = run_coco(json_file(FLAGS.predictions, "predictions"), json_file(FLAGS.gt, "gt"),
                              FLAGS.coco_iou_type)
        else:
            result = run_ytvis(json_file(FLAGS.predictions, "predictions"), json_file(FLAGS.gt, "gt"))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(FLAGS.metric, result))
    if FLAGS.output:
        write_json(FLAGS.output, {"metric": FLAGS.metric, **result})
        print(f"wrote {FLAGS.output}")
    return 0


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["predictions", "gt", "metric"])
    app.run(main, flags_parser=parse_flags)
