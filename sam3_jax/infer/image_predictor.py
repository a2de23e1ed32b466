"""Text- and box-prompted detection on one image, post-processed like the reference's Sam3Processor.

``ImagePredictor.from_checkpoint(DIR)`` loads a converted checkpoint; ``predict(image, prompt)``
returns the raw outputs of the image model and the instances that pass the threshold:
score = sigmoid(logit) * sigmoid(presence) > threshold, boxes in pixels (xyxy), binary masks at the
image's size (bilinear upsampling of the 288x288 logits, then > 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax.convert import checkpoint, sam3_checkpoint
from sam3_jax.infer import image_io
from sam3_jax.model import detector
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tokenizer import SimpleTokenizer
from sam3_jax.nn import ops

VISUAL_PROMPT = "visual"  # the reference's text for box-only prompting


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
        self._forward = jax.jit(lambda p, *a: model.apply({"params": p}, *a))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str, **kwargs) -> "ImagePredictor":
        manifest = checkpoint.read_manifest(checkpoint_dir)
        cfg, tracker_cfg = sam3_checkpoint.configs(manifest)
        params = checkpoint.read_params(checkpoint_dir, sam3_checkpoint.abstract_params(cfg, tracker_cfg))["detector"]
        vocab = f"{checkpoint_dir}/{checkpoint.VOCAB}"
        return cls(cfg, params, SimpleTokenizer(vocab), **kwargs)

    def raw_outputs(self, image_uint8: np.ndarray, prompt: str, boxes: Sequence[Sequence[float]] = (),
                    box_labels: Sequence[int] = ()) -> dict:
        """The model's outputs for one image (any size, uint8 RGB) and one prompt."""
        if len(boxes) > self.max_boxes:
            raise ValueError(f"at most {self.max_boxes} box prompts are supported, got {len(boxes)}")
        if not prompt.strip():
            if not len(boxes):
                raise ValueError("give a text prompt, a box prompt, or both")
            prompt = VISUAL_PROMPT
        labels = list(box_labels) if len(box_labels) else [1] * len(boxes)
        if len(labels) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(labels)} box labels")
        box_arr = np.zeros((1, self.max_boxes, 4), np.float32)
        label_arr = np.zeros((1, self.max_boxes), np.int32)
        for i, (box, label) in enumerate(zip(boxes, labels)):
            box = np.asarray(box, np.float32)
            if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
                raise ValueError(f"box {i}: expected normalised cx,cy,w,h with w, h > 0, got {box.tolist()}")
            box_arr[0, i] = box
            label_arr[0, i] = int(bool(label))
        box_mask = np.arange(self.max_boxes)[None] >= len(boxes)
        image = image_io.normalize(image_io.resize_square(image_uint8, self.cfg.image_size))[None]
        ids = self.tokenizer([prompt], context_length=self.cfg.text.context_length)
        return self._forward(self.params, jnp.asarray(image), ids, box_arr, box_mask, label_arr)

    def predict(self, image_uint8: np.ndarray, prompt: str, boxes: Sequence[Sequence[float]] = (),
                box_labels: Sequence[int] = (), threshold: float = 0.5) -> Prediction:
        out = self.raw_outputs(image_uint8, prompt, boxes, box_labels)
        logits = np.asarray(out["pred_logits"][0, :, 0])
        presence = np.asarray(out["presence_logit_dec"][0, 0])
        pred_boxes = np.asarray(out["pred_boxes"][0])
        pred_masks = np.asarray(out["pred_masks"][0])
        probs = jax.nn.sigmoid(logits) * jax.nn.sigmoid(presence)
        keep = np.flatnonzero(np.asarray(probs) > threshold)
        keep = keep[np.argsort(-np.asarray(probs)[keep], kind="stable")]
        h, w = image_uint8.shape[:2]
        cx, cy, bw, bh = pred_boxes[keep].T
        boxes_px = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * np.array([w, h, w, h], np.float32)
        masks = np.zeros((len(keep), h, w), bool)
        if len(keep):
            up = ops.resize_bilinear(jnp.asarray(pred_masks[keep])[..., None], (h, w))
            masks = np.asarray(up[..., 0] > 0)
        return Prediction(pred_logits=logits, pred_boxes=pred_boxes, presence_logit=presence, pred_masks=pred_masks,
                          scores=np.asarray(probs)[keep], boxes=boxes_px.reshape(-1, 4), masks=masks)
