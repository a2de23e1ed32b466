"""Text- and box-prompted detection on images, post-processed like the reference's Sam3Processor.

``ImagePredictor.from_checkpoint(DIR)`` loads a converted checkpoint. ``predict(image, text,
boxes, box_labels)`` answers one prompt on one image; ``predict_batch(images, prompts)`` answers
several `Prompt`s, each on one of several images, in one jitted forward: every image is encoded
once, every prompt is grounded on its image's features. A prompt's answer does not depend on the
others in the call (the reference's Sam3Processor likewise answers one text prompt at a time;
its box exemplars, positive or negative, join that prompt). Image and prompt counts are padded to
powers of two, so calls with similar counts reuse one compiled forward.

Each answer holds the image model's raw outputs and the instances that pass the threshold:
score = sigmoid(logit) * sigmoid(presence) > threshold, boxes in pixels (xyxy), binary masks at the
image's size (bilinear upsampling of the 288x288 logits, then > 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax.checkpoint import weights
from sam3_jax.data import image_io
from sam3_jax.model import detector
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tokenizer import SimpleTokenizer
from sam3_jax.nn import compiler, ops

VISUAL_PROMPT = "visual"  # the reference's text for box-only prompting


@dataclass(frozen=True)
class Prompt:
    """One detection query: a noun phrase and/or box exemplars on one image of a batched call."""
    text: str = ""
    boxes: Sequence[Sequence[float]] = ()  # normalised cx, cy, w, h
    box_labels: Sequence[int] = ()  # 1 positive, 0 negative per box; empty: all positive
    image: int = 0  # index into the call's images


@dataclass
class Prediction:
    pred_logits: np.ndarray  # (Q,) raw scores
    pred_boxes: np.ndarray  # (Q, 4) normalised cxcywh
    presence_logit: np.ndarray  # ()
    pred_masks: np.ndarray  # (Q, 288, 288) logits
    scores: np.ndarray  # (N,) kept instances, descending
    boxes: np.ndarray  # (N, 4) xyxy pixels of the original image
    masks: np.ndarray  # (N, H, W) bool

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ImagePredictor:
    def __init__(self, cfg: ModelConfig, params, tokenizer: SimpleTokenizer | None = None, max_boxes: int = 8):
        self.cfg = cfg
        self.params = params
        self.tokenizer = tokenizer or SimpleTokenizer()
        self.max_boxes = max_boxes
        model = detector.Sam3Detector(cfg)

        def forward(params, images, token_ids, boxes, box_mask, box_labels, img_ids):
            variables = {"params": params}
            feats = model.apply(variables, images, method=detector.Sam3Detector.encode_image)
            text, text_mask = model.apply(variables, token_ids, method=detector.Sam3Detector.encode_text)
            return model.apply(variables, feats, text, text_mask, boxes, box_mask, box_labels, img_ids=img_ids,
                               method=detector.Sam3Detector.ground)

        self._forward = jax.jit(forward, compiler_options=compiler.encoder_options(cfg))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str, **kwargs) -> "ImagePredictor":
        read = weights.read(checkpoint_dir, tracker=False)
        return cls(read.model_cfg, read.params["detector"], SimpleTokenizer(read.vocab), **kwargs)

    def _geometry(self, prompt: Prompt, where: str) -> tuple[str, np.ndarray, np.ndarray]:
        """(text, boxes (max_boxes, 4), labels (max_boxes,)) of one prompt, checked."""
        boxes, text = prompt.boxes, prompt.text
        if len(boxes) > self.max_boxes:
            raise ValueError(f"{where}at most {self.max_boxes} box prompts are supported, got {len(boxes)}")
        if not text.strip():
            if not len(boxes):
                raise ValueError(f"{where}give a text prompt, a box prompt, or both")
            text = VISUAL_PROMPT
        labels = list(prompt.box_labels) if len(prompt.box_labels) else [1] * len(boxes)
        if len(labels) != len(boxes):
            raise ValueError(f"{where}{len(boxes)} boxes but {len(labels)} box labels")
        box_arr = np.zeros((self.max_boxes, 4), np.float32)
        label_arr = np.zeros((self.max_boxes,), np.int32)
        for i, (box, label) in enumerate(zip(boxes, labels)):
            box = np.asarray(box, np.float32)
            if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
                raise ValueError(f"{where}box {i}: expected normalised cx,cy,w,h with w, h > 0, got {box.tolist()}")
            box_arr[i] = box
            label_arr[i] = int(bool(label))
        return text, box_arr, label_arr

    def raw_outputs(self, images_uint8: Sequence[np.ndarray], prompts: Sequence[Prompt]) -> dict:
        """The model's outputs for each prompt (a row each, in order) on its image (any size, uint8 RGB)."""
        if not len(images_uint8) or not len(prompts):
            raise ValueError("give at least one image and one prompt")
        n_img, n_q = ops.power_of_two_at_least(len(images_uint8)), ops.power_of_two_at_least(len(prompts))
        images = np.zeros((n_img, self.cfg.image_size, self.cfg.image_size, 3), np.float32)
        for i, image in enumerate(images_uint8):
            images[i] = ops.normalize_pixels(image_io.resize_square(image, self.cfg.image_size))
        rows = []
        for k, prompt in enumerate(prompts):
            where = f"prompt {k}: " if len(prompts) > 1 else ""
            if not 0 <= prompt.image < len(images_uint8):
                raise ValueError(f"{where}image {prompt.image} is not among the {len(images_uint8)} images")
            rows.append((*self._geometry(prompt, where), prompt.image, len(prompt.boxes)))
        rows += [rows[-1]] * (n_q - len(rows))  # padding rows repeat the last prompt; their answers are dropped
        texts, boxes, labels, img_ids, n_boxes = zip(*rows)
        box_mask = np.arange(self.max_boxes)[None] >= np.array(n_boxes)[:, None]
        ids = self.tokenizer(list(texts), context_length=self.cfg.text.context_length)
        out = self._forward(self.params, jnp.asarray(images), ids, np.stack(boxes), box_mask, np.stack(labels),
                            np.asarray(img_ids, np.int32))
        return jax.tree.map(lambda x: x[:len(prompts)], out)

    def predict_batch(self, images_uint8: Sequence[np.ndarray], prompts: Sequence[Prompt],
                      threshold: float = 0.5) -> list[Prediction]:
        """One `Prediction` per prompt, in order, from one forward over all images and prompts."""
        out = jax.device_get(self.raw_outputs(images_uint8, prompts))
        return [self._postprocess({k: v[i] for k, v in out.items()}, images_uint8[p.image].shape[:2], threshold)
                for i, p in enumerate(prompts)]

    def predict(self, image_uint8: np.ndarray, prompt: str, boxes: Sequence[Sequence[float]] = (),
                box_labels: Sequence[int] = (), threshold: float = 0.5) -> Prediction:
        """One prompt (text and/or box exemplars, positive or negative) on one image."""
        return self.predict_batch([image_uint8], [Prompt(prompt, boxes, box_labels)], threshold)[0]

    @staticmethod
    def _postprocess(out: dict, size: tuple[int, int], threshold: float) -> Prediction:
        """One prompt's outputs -> the instances above ``threshold`` at the image's ``size`` (h, w)."""
        logits = np.asarray(out["pred_logits"][:, 0])
        presence = np.asarray(out["presence_logit_dec"][0])
        pred_boxes = np.asarray(out["pred_boxes"])
        pred_masks = np.asarray(out["pred_masks"])
        probs = np.asarray(jax.nn.sigmoid(logits) * jax.nn.sigmoid(presence))
        keep = np.flatnonzero(probs > threshold)
        keep = keep[np.argsort(-probs[keep], kind="stable")]
        h, w = size
        cx, cy, bw, bh = pred_boxes[keep].T
        boxes_px = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * np.array([w, h, w, h], np.float32)
        masks = np.zeros((len(keep), h, w), bool)
        if len(keep):
            up = ops.resize_bilinear(jnp.asarray(pred_masks[keep])[..., None], (h, w))
            masks = np.asarray(up[..., 0] > 0)
        return Prediction(pred_logits=logits, pred_boxes=pred_boxes, presence_logit=presence, pred_masks=pred_masks,
                          scores=probs[keep], boxes=boxes_px.reshape(-1, 4), masks=masks)
