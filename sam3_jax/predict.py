"""Detect and segment what a text (and optionally box) prompt names in one image.

  python -m sam3_jax.predict --checkpoint=DIR --image=photo.jpg --prompt="a dog" \
      [--box=cx,cy,w,h] --output=out.npz [--overlay=out.png]

The npz holds the image model's raw outputs (pred_logits (200,), pred_boxes (200, 4) normalised
cxcywh, presence_logit (), pred_masks (200, 288, 288) logits) and the kept instances (scores,
boxes in pixels xyxy, masks at the image size). Boxes given with --box are normalised cxcywh.
"""
import os

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory (convert_torch_ckpt.py).")
flags.DEFINE_string("image", None, "Input image file.")
flags.DEFINE_string("prompt", "", "Text prompt (noun phrase). May be empty when --box is given.")
flags.DEFINE_multi_string("box", [], "Box prompt as normalised cx,cy,w,h; repeat for several.")
flags.DEFINE_multi_integer("box_label", [], "1 (positive, default) or 0 (negative) per --box.")
flags.DEFINE_float("threshold", 0.5, "Keep instances with sigmoid(score) * sigmoid(presence) above this.")
flags.DEFINE_string("output", None, "Where to write the .npz.")
flags.DEFINE_string("overlay", None, "Optional PNG with masks and boxes drawn on the image.")


def parse_box(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise app.UsageError(f"--box expects four comma-separated numbers cx,cy,w,h; got {text!r}")
    return values


def main(argv):
    del argv
    from PIL import Image

    from sam3_jax.infer import image_io, overlay
    from sam3_jax.infer.image_predictor import ImagePredictor

    boxes = [parse_box(b) for b in FLAGS.box]
    image = image_io.load_image(FLAGS.image)
    predictor = ImagePredictor.from_checkpoint(FLAGS.checkpoint)
    pred = predictor.predict(image, FLAGS.prompt, boxes, FLAGS.box_label, FLAGS.threshold)
    out_dir = os.path.dirname(os.path.abspath(FLAGS.output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = FLAGS.output + ".tmp.npz"
    np.savez_compressed(tmp, **pred.as_dict())
    os.replace(tmp, FLAGS.output)
    if FLAGS.overlay:
        Image.fromarray(overlay.draw(image, pred.masks, pred.boxes, pred.scores)).save(FLAGS.overlay)
    print(f"{len(pred.scores)} instance(s) above {FLAGS.threshold}; wrote {FLAGS.output}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "image", "output"])
    app.run(main)
