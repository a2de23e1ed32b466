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

from absl import app, flags

from sam3_jax.data.errors import DataError

FLAGS = flags.FLAGS


def run_jf(pred_root: str, gt_root: str, videos: str | None = None) -> dict:
    """J&F of the videos under gt_root (all, or those `videos` names) against the palette PNGs under
    pred_root (`evaluation.davis`): the DAVIS table plus per-video and per-object values."""
    from sam3_jax.evaluation import davis

    if not os.path.isdir(pred_root):
        raise DataError(pred_root, "directory", "predictions directory does not exist")
    return davis.score(davis.PngFolders(pred_root), gt_root, videos)


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
