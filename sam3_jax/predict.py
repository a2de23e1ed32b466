"""Detect and segment what text (and optionally box) prompts name in images.

  python -m sam3_jax.predict --checkpoint=DIR --image=photo.jpg --prompt="a dog" \
      [--box=cx,cy,w,h [--box_label=0]] --output=out.npz [--overlay=out.png]

The npz holds the image model's raw outputs (pred_logits (200,), pred_boxes (200, 4) normalised
cxcywh, presence_logit (), pred_masks (200, 288, 288) logits) and the kept instances (scores,
boxes in pixels xyxy, masks at the image size). Boxes given with --box are normalised cxcywh
exemplars, positive unless their --box_label is 0; they join the text prompt (or stand alone).

--image and --prompt may be repeated: every prompt is answered on every image, all in one batched
forward, and each answer is written to OUTPUT_<image index>_<prompt index>.npz (and the overlay
likewise) instead of OUTPUT.npz. Box exemplars belong to one image: --box takes a single --image.

Errors (an image that cannot be read or is beyond ``image_io.MAX_PIXELS``, a checkpoint whose weights
hold NaN or Inf, raw outputs that are not finite, an output folder that cannot be written) print one
message, exit code 2, and nothing is written.
"""
import os
import sys

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A converted checkpoint (convert_torch_ckpt.py) or a training run's workdir "
                    "(its newest step), WORKDIR/checkpoints_best or WORKDIR/checkpoints/STEP.")
flags.DEFINE_multi_string("image", None, "Input image file; repeat for several.")
flags.DEFINE_multi_string("prompt", [], "Text prompt (noun phrase); repeat for several. May be left out when "
                          "--box is given.")
flags.DEFINE_multi_string("box", [], "Box prompt as normalised cx,cy,w,h; repeat for several.")
flags.DEFINE_multi_integer("box_label", [], "1 (positive, default) or 0 (negative) per --box.")
flags.DEFINE_float("threshold", 0.5, "Keep instances with sigmoid(score) * sigmoid(presence) above this.")
flags.DEFINE_string("output", None, "Where to write the .npz (OUTPUT_<image>_<prompt>.npz for several).")
flags.DEFINE_string("overlay", None, "Optional PNG with masks and boxes drawn on the image (likewise numbered).")

RAW_OUTPUTS = ("pred_logits", "pred_boxes", "presence_logit", "pred_masks")


def parse_box(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise app.UsageError(f"--box expects four comma-separated numbers cx,cy,w,h; got {text!r}")
    return values


def output_paths(path: str, image: int, prompt: int, several: bool) -> str:
    """``path`` itself for a single answer, else ``<stem>_<image>_<prompt><ext>``."""
    if not several:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{image}_{prompt}{ext}"


def main(argv):
    """Bad input (an image, a checkpoint, an output path), weights or outputs that are not finite: one
    message, exit code 2, nothing written."""
    del argv
    from sam3_jax import fileio
    from sam3_jax.checkpoint.finite import NonFiniteError
    from sam3_jax.data.image_io import ImageError

    try:
        run()
    except (ImageError, NonFiniteError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # missing files, unwritable outputs, disk full
        print(f"predict: error: {fileio.describe_os_error(e)}", file=sys.stderr)
        sys.exit(2)


def run():
    from PIL import Image

    from sam3_jax import fileio
    from sam3_jax.checkpoint import finite
    from sam3_jax.data import image_io
    from sam3_jax.evaluation import overlay
    from sam3_jax.infer.image_predictor import ImagePredictor, Prompt

    boxes = [parse_box(b) for b in FLAGS.box]
    if boxes and len(FLAGS.image) > 1:
        raise app.UsageError("--box exemplars belong to one image: give a single --image with them")
    for path in [FLAGS.output] + ([FLAGS.overlay] if FLAGS.overlay else []):
        fileio.check_writable(os.path.dirname(os.path.abspath(path)))
    texts = FLAGS.prompt or [""]
    images = [image_io.load_image(path) for path in FLAGS.image]
    queries = [(i, j) for i in range(len(images)) for j in range(len(texts))]
    predictor = ImagePredictor.from_checkpoint(FLAGS.checkpoint)
    preds = predictor.predict_batch(images, [Prompt(texts[j], boxes, FLAGS.box_label, image=i) for i, j in queries],
                                    FLAGS.threshold)
    for (i, j), pred in zip(queries, preds):  # all checked before anything is written
        raw = {k: getattr(pred, k) for k in RAW_OUTPUTS}
        finite.check_finite(raw, f"{FLAGS.image[i]} | {texts[j] or '(boxes)'}: the model's outputs")
    several = len(queries) > 1
    for (i, j), pred in zip(queries, preds):
        path = output_paths(FLAGS.output, i, j, several)
        with fileio.atomic_file(path) as tmp:
            np.savez_compressed(tmp, **pred.as_dict())
        if FLAGS.overlay:
            with fileio.atomic_file(output_paths(FLAGS.overlay, i, j, several)) as tmp:
                Image.fromarray(overlay.draw(images[i], pred.masks, pred.boxes, pred.scores)).save(tmp)
        print(f"{FLAGS.image[i]} | {texts[j] or '(boxes)'}: {len(pred.scores)} instance(s) above "
              f"{FLAGS.threshold}; wrote {path}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "image", "output"])
    app.run(main)
