"""The SAM 3 tracker (``sam3_tracker_base.py:Sam3TrackerBase``) and ``track_step`` as a pure function.

``Tracker`` mirrors the torch ``tracker.*`` tree: ``transformer`` (memory attention), ``maskmem_backbone``
(memory encoder), ``sam_prompt_encoder``, ``sam_mask_decoder``, ``obj_ptr_proj``, ``obj_ptr_tpos_proj``,
``mask_downsample`` and the raw parameters ``maskmem_tpos_enc``, ``no_mem_embed``, ``no_obj_ptr``,
``no_obj_embed_spatial``. (``no_mem_pos_enc`` is never read by the reference's forward pass.)

``Tracker.track_step`` processes one frame for a batch of objects (docs/reference_model.md, 'Tracker') with
static shapes:
the memory it attends to is a ``SelectedMemory`` (fixed numbers of spatial-memory slots and object
pointers with validity masks; ``memory_bank.select_memory`` builds it as the reference selects), and
the per-object path is chosen with masks, not Python branches:
  * mask input (``has_mask_input``): the mask is the output; the SAM heads only make the pointer;
  * initial conditioning frame (``is_init_cond_frame``): features + ``no_mem_embed``, no memory;
  * otherwise: memory attention over the selected memories;
then one SAM heads pass for all objects (``frame_heads``: the points (padded, ``point_valid``), or the
mask input as the dense prompt on the raw features), and the memory encoder on the final mask.

Shape conventions that differ from the reference, on mask-input frames only: ``pred_masks`` and
``pred_masks_high_res`` are the input mask resized to the usual 4h and image sizes (the reference
returns it at input_mask_size // stride * 4 and input_mask_size); the memory is encoded from the mask
at its input size, exactly as the reference does.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from sam3_jax.model import init
from sam3_jax.model.tracker import memory_score
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.mask_decoder import MaskDecoder, best_multimask_index
from sam3_jax.model.tracker.memory_attention import MemoryTransformer
from sam3_jax.model.tracker.memory_encoder import MemoryEncoder
from sam3_jax.model.tracker.prompt_encoder import PromptEncoder
from sam3_jax.nn import ops
from sam3_jax.nn.layers import MLP
from sam3_jax.nn.position import sine_1d, sine_map

NO_OBJ_SCORE = -1024.0  # mask logits of an object predicted absent
MASK_LOGIT_SCALE, MASK_LOGIT_BIAS = 20.0, -10.0  # binary mask inputs as logits (+-10)


class SelectedMemory(struct.PyTreeNode):
    """What one frame attends to, per object (leading axis B)."""

    feats: jax.Array  # (B, S, h, w, mem_dim) spatial memories
    tpos: jax.Array  # (B, S) int32 row of maskmem_tpos_enc (num_maskmem - 1 for conditioning frames)
    valid: jax.Array  # (B, S) bool
    ptrs: jax.Array  # (B, P, d_model) object pointers
    ptr_tpos: jax.Array  # (B, P) float32 signed frame offset / (max pointers - 1)
    ptr_valid: jax.Array  # (B, P) bool


def _take(x, idx):
    """x (B, K, ...) at idx (B,) -> (B, ...)."""
    return jnp.take_along_axis(x, idx.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


def use_multimask(cfg: TrackerConfig, is_init_cond_frame, num_points):
    """``_use_multimask``, per object (B,): several candidate masks for ambiguous prompts (few points)."""
    return (cfg.multimask_output_in_sam & (is_init_cond_frame | cfg.multimask_output_for_tracking)
            & (num_points >= cfg.multimask_min_pt_num) & (num_points <= cfg.multimask_max_pt_num))


class Tracker(nn.Module):
    """Initialise with ``method=Tracker.all_paths`` so that every parameter exists."""

    cfg: TrackerConfig
    dtype: jnp.dtype | None = None

    def setup(self):
        cfg, dt = self.cfg, self.dtype
        c, d = cfg.d_model, cfg.mem_dim
        self.transformer = MemoryTransformer(cfg, dtype=dt)
        self.maskmem_backbone = MemoryEncoder(cfg, dtype=dt)
        self.sam_prompt_encoder = PromptEncoder(cfg, dtype=dt)
        self.sam_mask_decoder = MaskDecoder(cfg, dtype=dt)
        self.obj_ptr_proj = MLP(c, c, 3, dtype=dt)
        self.obj_ptr_tpos_proj = nn.Dense(d, dtype=dt)
        self.mask_downsample = nn.Conv(1, (4, 4), strides=4, padding="VALID", dtype=dt)
        init = nn.initializers.truncated_normal(0.02)
        self.maskmem_tpos_enc = self.param("maskmem_tpos_enc", init, (cfg.num_maskmem, 1, 1, d))
        self.no_mem_embed = self.param("no_mem_embed", init, (1, 1, c))
        self.no_obj_ptr = self.param("no_obj_ptr", init, (1, c))
        self.no_obj_embed_spatial = self.param("no_obj_embed_spatial", init, (1, d))

    # ------------------------------------------------------------------------------------- pieces
    def project_high_res(self, fpn0, fpn1):
        """Once per frame: the backbone's 4x and 2x tracker levels through conv_s0 / conv_s1."""
        return self.sam_mask_decoder.project_high_res(fpn0, fpn1)

    def memory_conditioned_features(self, pix, memory: SelectedMemory, deterministic: bool):
        """pix (B, h, w, C) after memory attention over the selected spatial memories and pointers."""
        b, h, w, c = pix.shape
        d = self.cfg.mem_dim
        s, p, k = memory.feats.shape[1], memory.ptrs.shape[1], c // d
        spatial = memory.feats.reshape(b, s * h * w, d).astype(pix.dtype)
        tpos = jnp.take(self.maskmem_tpos_enc, memory.tpos, axis=0).reshape(b, s, 1, d)
        spatial_pos = (sine_map(h, w, d).reshape(1, 1, h * w, d) + tpos).reshape(b, s * h * w, d)
        # A pointer is split into k = C / mem_dim consecutive tokens that share its temporal encoding.
        ptrs = memory.ptrs.reshape(b, p * k, d).astype(pix.dtype)
        ptr_pos = jnp.repeat(self.obj_ptr_tpos_proj(sine_1d(memory.ptr_tpos.astype(jnp.float32), c)), k, axis=1)
        padding = jnp.concatenate([jnp.repeat(~memory.valid, h * w, axis=1), jnp.repeat(~memory.ptr_valid, k, axis=1)],
                                  axis=1)
        curr_pos = jnp.broadcast_to(sine_map(h, w, c).reshape(1, h * w, c), (b, h * w, c))
        out = self.transformer(pix.reshape(b, h * w, c), curr_pos, jnp.concatenate([spatial, ptrs], axis=1),
                               jnp.concatenate([spatial_pos, ptr_pos.astype(spatial_pos.dtype)], axis=1), padding,
                               num_spatial_frames=s, deterministic=deterministic)
        return out.reshape(b, h, w, c)

    def sam_heads(self, feats, high_res, coords, labels, point_valid, multimask, mask_prompt=None,
                  deterministic: bool = True, mask_valid=None):
        """``_forward_sam_heads``: prompts -> the output mask, its IoU, the object pointer and score.

        multimask (B,) bool: use the best of the multimask outputs (else token 0, or its stable
        fallback at eval). mask_prompt (B, 4h, 4w) optional dense prompt, used where ``mask_valid``
        (B,) (default: everywhere). Returns a dict: ``masks``
        low-res logits (B, 4h, 4w) with absent objects at NO_OBJ_SCORE, ``iou`` (B,), ``obj_ptr``
        (B, C), ``score`` (B, 1), and what training supervises: ``all_masks`` (B, K, 4h, 4w) every
        mask token's logits (absent objects at NO_OBJ_SCORE, as the reference's multimasks),
        ``all_ious`` (B, K) and ``candidates`` (B, K) bool, the tokens the output chose among
        (1..K-1 for multimask output, else 0).
        """
        decoder = self.sam_mask_decoder
        # No point at all: the reference feeds one real "not a point" (label -1).
        filler = ~jnp.any(point_valid, axis=1, keepdims=True) & (jnp.arange(labels.shape[1]) == 0)
        labels, point_valid = jnp.where(filler, -1, labels), point_valid | filler
        sparse, sparse_padding, dense = self.sam_prompt_encoder(coords, labels, ~point_valid, mask_prompt, mask_valid)
        masks, iou, tokens, score = decoder.predict_masks(
            feats, self.sam_prompt_encoder.get_dense_pe(), sparse, dense, high_res, sparse_padding)
        best = best_multimask_index(iou)
        mask_idx = jnp.where(multimask, best, decoder.single_mask_index(masks, iou, deterministic))
        token_idx = best if self.cfg.use_multimask_token_for_obj_ptr else jnp.zeros_like(best)
        token_idx = jnp.where(multimask, token_idx, 0)
        present = score > 0  # (B, 1)
        all_masks = ops.where_rows(present[:, 0], masks.astype(jnp.float32), NO_OBJ_SCORE)
        obj_ptr = self.obj_ptr_proj(_take(tokens, token_idx))
        obj_ptr = jnp.where(present, obj_ptr, self.no_obj_ptr.astype(obj_ptr.dtype))
        token = jnp.arange(masks.shape[1])
        candidates = jnp.where(multimask[:, None], token > 0, token == 0)
        return {"masks": _take(all_masks, mask_idx), "iou": _take(iou, mask_idx), "obj_ptr": obj_ptr, "score": score,
                "all_masks": all_masks, "all_ious": iou, "candidates": candidates}

    def frame_heads(self, pix, feats, high_res, coords, labels, point_valid, multimask, mask_inputs=None,
                    has_mask_input=None, deterministic: bool = True):
        """A frame's SAM heads, one pass for every object: its point prompts on ``feats`` or, where
        ``has_mask_input`` (default: all, when ``mask_inputs`` (B, Sm, Sm) is given), what
        ``_use_mask_as_output`` runs to make the pointer: no point, the mask input down-sampled to the
        low-res grid as the dense prompt, on the raw features ``pix``."""
        if mask_inputs is None:
            return self.sam_heads(feats, high_res, coords, labels, point_valid, multimask, deterministic=deterministic)
        if has_mask_input is None:
            has_mask_input = jnp.ones(mask_inputs.shape[:1], bool)
        prompt = self.mask_downsample(mask_inputs.astype(jnp.float32)[..., None])[..., 0]
        prompt = ops.resize_masks(prompt, (self.cfg.low_res_mask_size,) * 2, antialias=True)
        return self.sam_heads(ops.where_rows(has_mask_input, pix.astype(feats.dtype), feats), high_res, coords, labels,
                              point_valid & ~has_mask_input[:, None], multimask & ~has_mask_input, prompt,
                              deterministic, mask_valid=has_mask_input)

    def mask_as_output(self, mask_inputs, obj_ptr):
        """``_use_mask_as_output``: a mask input (B, Sm, Sm) is the prediction (logits +-10, score +-10);
        ``obj_ptr`` is the pointer ``frame_heads`` made from it, mixed with ``no_obj_ptr`` a second time,
        by the mask's own presence (as the reference)."""
        m = mask_inputs.astype(jnp.float32)
        present = jnp.any(m > 0, axis=(1, 2))[:, None]
        obj_ptr = jnp.where(present, obj_ptr, self.no_obj_ptr.astype(obj_ptr.dtype))
        score = jnp.where(present, MASK_LOGIT_SCALE + MASK_LOGIT_BIAS, MASK_LOGIT_BIAS)
        return m * MASK_LOGIT_SCALE + MASK_LOGIT_BIAS, obj_ptr, score

    def mask_for_memory(self, mask_logits, binarize):
        """The memory encoder's mask input: sigmoid (or, where ``binarize`` (B,), the thresholded mask
        of a click-made prediction at eval) rescaled to +-10, at the logits' resolution."""
        cfg = self.cfg
        prob = jnp.where(binarize[:, None, None], (mask_logits > 0).astype(jnp.float32), jax.nn.sigmoid(mask_logits))
        return prob * cfg.sigmoid_scale_for_mem_enc + cfg.sigmoid_bias_for_mem_enc

    def encode_memory(self, pix, mem_masks, object_score_logits):
        """``_encode_new_memory``: (B, h, w, mem_dim) from the frame's raw features and ``mask_for_memory``
        (B, S, S); absent objects (score <= 0) get ``no_obj_embed_spatial``."""
        feats, _ = self.maskmem_backbone(pix, mem_masks)
        absent = (object_score_logits <= 0).astype(feats.dtype)  # (B, 1)
        return feats + absent[:, :, None, None] * self.no_obj_embed_spatial.astype(feats.dtype)

    # ---------------------------------------------------------------------------------- track_step
    def track_step(self, pix, high_res, memory: SelectedMemory | None, is_init_cond_frame, point_coords,
                   point_labels, point_valid, mask_inputs=None, has_mask_input=None, *, run_mem_encoder: bool = True,
                   deterministic: bool = True):
        """One frame for B objects.

        pix (B, h, w, C): the tracker's 1x features (raw); high_res: ``project_high_res`` outputs;
        memory: the selected memories (None when every object is on an initial conditioning frame);
        is_init_cond_frame (B,) bool; point_coords (B, P, 2) pixel (x, y) of the image_size input,
        point_labels (B, P) (0 neg, 1 pos, 2/3 box corners), point_valid (B, P); mask_inputs
        (B, input_mask_size, input_mask_size) optional with has_mask_input (B,) (default: all).
        ``deterministic`` is the reference's eval mode (also: stability fallback, binarised click
        masks for memory). Dropout (rng "dropout") applies in the memory attention otherwise.

        Returns a dict: pred_masks (B, 4h, 4w), pred_masks_high_res (B, image_size, image_size),
        obj_ptr (B, C), object_score_logits (B, 1), iou_score (B,), memory_score (B,) (the memory
        selection's per-object score; the reference averages it over the objects it tracks
        together), and maskmem_features (B, h, w, mem_dim) when run_mem_encoder.
        """
        if point_coords.shape[1] > self.cfg.max_points:
            raise ValueError(f"{point_coords.shape[1]} point slots, more than max_points={self.cfg.max_points}")
        feats = self.conditioned_features(pix, memory, is_init_cond_frame, deterministic)
        num_points = jnp.sum(point_valid, axis=1)
        heads = self.frame_heads(pix, feats, high_res, point_coords, point_labels, point_valid,
                                 use_multimask(self.cfg, is_init_cond_frame, num_points), mask_inputs,
                                 has_mask_input, deterministic)
        return self.frame_outputs(pix, heads, num_points, mask_inputs, has_mask_input,
                                  run_mem_encoder=run_mem_encoder, deterministic=deterministic)

    def conditioned_features(self, pix, memory: SelectedMemory | None, is_init_cond_frame, deterministic: bool):
        """What the SAM heads see: ``pix + no_mem_embed`` on initial conditioning frames (and
        everywhere when ``memory`` is None), the memory-attended features elsewhere."""
        no_mem = pix + self.no_mem_embed.astype(pix.dtype)
        if memory is None:
            return no_mem
        return ops.where_rows(is_init_cond_frame, no_mem, self.memory_conditioned_features(pix, memory, deterministic))

    def frame_outputs(self, pix, heads: dict, num_points, mask_inputs=None, has_mask_input=None, *,
                      run_mem_encoder: bool = True, deterministic: bool = True):
        """A frame's outputs from its final ``sam_heads`` result (``heads``) or, where ``has_mask_input``,
        from its mask input (``heads`` then from ``frame_heads`` with it); the memory is encoded from the
        final mask (see ``track_step``)."""
        cfg = self.cfg
        b = pix.shape[0]
        low_res, iou, obj_ptr, score = heads["masks"], heads["iou"], heads["obj_ptr"], heads["score"]
        high_res_masks = ops.resize_masks(low_res, (cfg.image_size,) * 2)
        mem_masks = self.mask_for_memory(high_res_masks, (num_points > 0) & deterministic)
        if mask_inputs is not None:
            if has_mask_input is None:
                has_mask_input = jnp.ones((b,), bool)
            m_logits, m_ptr, m_score = self.mask_as_output(mask_inputs, obj_ptr)
            low_res = ops.where_rows(has_mask_input, ops.resize_masks(m_logits, (cfg.low_res_mask_size,) * 2, True),
                                     low_res)
            high_res_masks = ops.where_rows(has_mask_input, ops.resize_masks(m_logits, (cfg.image_size,) * 2, True),
                                            high_res_masks)
            iou = jnp.where(has_mask_input, 1.0, iou)
            obj_ptr = ops.where_rows(has_mask_input, m_ptr, obj_ptr)
            score = ops.where_rows(has_mask_input, m_score, score)
            # Both memory inputs at the size the memory encoder resizes to (its first step) so one call serves both.
            size = cfg.mask_interpol_size
            m_mem = self.mask_for_memory(m_logits, jnp.zeros((b,), bool))
            mem_masks = ops.where_rows(has_mask_input, ops.resize_masks(m_mem, (size, size), True),
                                       ops.resize_masks(mem_masks, (size, size), True))
        out = {"pred_masks": low_res, "pred_masks_high_res": high_res_masks, "obj_ptr": obj_ptr,
               "object_score_logits": score, "iou_score": iou,
               "memory_score": memory_score.presence(score[:, 0]) * iou}
        if run_mem_encoder:
            out["maskmem_features"] = self.encode_memory(pix, mem_masks, score)
        return out

    def __call__(self, *args, **kwargs):
        return self.track_step(*args, **kwargs)

    def all_paths(self):
        """Every path once, on zeros at the configured sizes (one object): ``Tracker(cfg).init(rng,
        method=Tracker.all_paths)`` creates every parameter (a plain init may skip some)."""
        cfg = self.cfg
        g, c, d = cfg.grid, cfg.d_model, cfg.mem_dim
        high_res = self.project_high_res(jnp.zeros((1, 4 * g, 4 * g, c)), jnp.zeros((1, 2 * g, 2 * g, c)))
        ones = jnp.ones((1, 1), bool)
        memory = SelectedMemory(feats=jnp.zeros((1, 1, g, g, d)), tpos=jnp.zeros((1, 1), jnp.int32), valid=ones,
                                ptrs=jnp.zeros((1, 1, c)), ptr_tpos=jnp.zeros((1, 1)), ptr_valid=ones)
        m = cfg.input_mask_size
        return self.track_step(jnp.zeros((1, g, g, c)), high_res, memory, jnp.zeros((1,), bool), jnp.zeros((1, 1, 2)),
                               jnp.zeros((1, 1), jnp.int32), ones, jnp.zeros((1, m, m)))


def init_params(cfg: TrackerConfig, rng, dtype=None):
    """Every parameter of the tracker (``Tracker.all_paths`` reaches them all), initialised as the
    reference's modules are (`init.reference_init`)."""
    return init.reference_init(Tracker(cfg, dtype=dtype).init(rng, method=Tracker.all_paths)["params"], rng)


def abstract_params(cfg: TrackerConfig):
    """The tracker's parameter tree as shapes and dtypes only."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
