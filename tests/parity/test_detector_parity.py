"""The whole detector against Meta's Sam3Image: same random weights (moved by our converter), same
image, caption and box prompt; every output compared.

The tiny config runs in seconds; the official-size model on a real photograph is marked slow.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.convert import keymap
from sam3_jax.convert.sam3_checkpoint import check_rope
from sam3_jax.data import image_io
from sam3_jax.model import detector
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tokenizer import SimpleTokenizer
from sam3_jax.nn import compiler, ops
from sam3_jax.testing import reference
from sam3_jax.testing.parity import randomize_, state_dict_numpy, t2n

pytestmark = pytest.mark.parity


def reference_outputs(ref, model, image, caption, boxes, labels):
    """Runs the reference like Sam3Processor (forward_image, forward_text, forward_grounding)."""
    from sam3.model.data_misc import FindStage
    from sam3.model.geometry_encoders import Prompt

    torch = ref.torch
    with torch.no_grad():
        img = torch.tensor(image).permute(0, 3, 1, 2)
        backbone_out = model.backbone.forward_image(img)
        backbone_out.update(model.backbone.forward_text([caption], device="cpu"))
        nb = len(boxes)
        prompt = Prompt(box_embeddings=torch.tensor(boxes, dtype=torch.float32).view(nb, 1, 4),
                        box_mask=torch.zeros(1, nb, dtype=torch.bool),
                        box_labels=torch.tensor(labels, dtype=torch.long).view(nb, 1))
        find = FindStage(img_ids=torch.tensor([0]), text_ids=torch.tensor([0]), input_boxes=None,
                         input_boxes_mask=None, input_boxes_label=None, input_points=None, input_points_mask=None)
        out = model.forward_grounding(backbone_out=backbone_out, find_input=find, find_target=None,
                                      geometric_prompt=prompt)
    return {k: t2n(out[k]) for k in ("pred_logits", "pred_boxes", "presence_logit_dec", "pred_masks", "semantic_seg")}


def jax_outputs(cfg, params, image, caption, boxes, labels, max_boxes=4):
    """Our detector on the same input, with the boxes padded to a static ``max_boxes``."""
    ids = SimpleTokenizer()([caption])
    nb = len(boxes)
    pad_boxes = np.zeros((1, max_boxes, 4), np.float32)
    pad_boxes[0, :nb] = boxes
    box_mask = np.arange(max_boxes)[None] >= nb
    box_labels = np.zeros((1, max_boxes), np.int32)
    box_labels[0, :nb] = labels
    fn = jax.jit(lambda p, *a: detector.Sam3Detector(cfg).apply({"params": p}, *a),
                 compiler_options=compiler.encoder_options(cfg))  # as the predictors compile it
    out = fn(params, jnp.asarray(image), ids, pad_boxes, box_mask, box_labels)
    return {
        "pred_logits": np.asarray(out["pred_logits"]),
        "pred_boxes": np.asarray(out["pred_boxes"]),
        "presence_logit_dec": np.asarray(out["presence_logit_dec"]),
        "pred_masks": np.asarray(out["pred_masks"]),
        "semantic_seg": np.asarray(out["semantic_seg"]).transpose(0, 3, 1, 2),
    }


def compare(cfg, image, caption, boxes, labels, seed=0):
    torch_model = reference.build_image_model(cfg, joint_box_scores=cfg.joint_box_scores)
    randomize_(torch_model, seed)
    sd = state_dict_numpy(torch_model)
    conversion = keymap.convert(sd, detector.abstract_params(cfg))
    assert check_rope(conversion.recomputed, cfg) == []
    want = reference_outputs(reference.load(), torch_model, image, caption, boxes, labels)
    del torch_model, sd
    got = jax_outputs(cfg, conversion.params, image, caption, boxes, labels)
    return {k: (float(np.max(np.abs(got[k] - want[k]))), float(np.max(np.abs(want[k])))) for k in want}


@pytest.mark.parametrize("joint_box_scores", [False, True], ids=["image_scores", "video_scores"])
def test_tiny_detector_matches_reference(ref, joint_box_scores):
    cfg = ModelConfig.tiny().replace(joint_box_scores=joint_box_scores)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, size=(1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    errors = compare(cfg, image, "a red circle", [[0.5, 0.4, 0.3, 0.2], [0.3, 0.6, 0.2, 0.5]], [1, 0])
    for key, (err, scale) in errors.items():
        assert err <= 1e-5 * max(1.0, scale), (key, err, scale)


@pytest.mark.slow
def test_official_detector_on_a_photograph(ref):
    """Parity targets: boxes, presence and scores <= 1e-4; mask logits <= 1e-3 of max."""
    from skimage import data

    cfg = ModelConfig.official()
    photo = image_io.resize_square(data.astronaut(), cfg.image_size)
    image = ops.normalize_pixels(photo)[None]
    errors = compare(cfg, image, "a person", [[0.5, 0.45, 0.4, 0.8]], [1])
    print("official-size parity errors (max abs, max |ref|):", errors)
    for key in ("pred_logits", "pred_boxes", "presence_logit_dec"):
        assert errors[key][0] <= 1e-4, (key, errors[key])
    for key in ("pred_masks", "semantic_seg"):
        err, scale = errors[key]
        assert err <= 1e-3 * scale, (key, err, scale)
