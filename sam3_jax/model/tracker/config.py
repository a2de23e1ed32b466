"""``TrackerConfig``: every size and switch of the SAM 3 tracker (docs/reference_model.md, 'Sizes').

``official()`` equals ``model_builder.build_tracker``; ``tiny()`` keeps every code path at sizes that
run in seconds on a CPU (an 8x8 feature grid from a 112 px image) and is what the parity tests build
the reference modules with.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class TrackerConfig:
    d_model: int = 256  # hidden_dim: backbone features, SAM heads, object pointers
    mem_dim: int = 64  # spatial memory channels (maskmem_backbone.out_proj)
    image_size: int = 1008
    backbone_stride: int = 14
    num_maskmem: int = 7  # 1 conditioning slot + 6 previous frames
    max_obj_ptrs: int = 16
    max_cond_frames_in_attn: int = 4
    max_points: int = 16  # the predictor's max_point_num_in_prompt_enc

    # Memory attention (transformer.encoder): pre-norm self- then cross-attention with 2-D RoPE.
    mem_attn_layers: int = 4
    mem_attn_heads: int = 1
    mem_attn_ffn: int = 2048
    mem_attn_dropout: float = 0.1
    rope_theta: float = 10000.0

    # Memory encoder (maskmem_backbone).
    mask_interpol_size: int = 1152  # masks are resized to this before the down-sampler
    mask_ds_kernel: int = 3
    mask_ds_stride: int = 2
    mask_ds_padding: int = 1
    mask_ds_total_stride: int = 16
    fuser_layers: int = 2
    fuser_kernel: int = 7
    layer_scale_init: float = 1e-6  # CXBlock gamma at init

    # SAM prompt encoder and mask decoder.
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    two_way_depth: int = 2
    two_way_heads: int = 8
    two_way_mlp: int = 2048
    attention_downsample_rate: int = 2
    iou_head_depth: int = 3
    iou_head_hidden: int = 256
    use_multimask_token_for_obj_ptr: bool = True
    dynamic_multimask_via_stability: bool = True
    stability_delta: float = 0.05
    stability_thresh: float = 0.98

    # track_step switches.
    multimask_output_in_sam: bool = True
    multimask_output_for_tracking: bool = True
    multimask_min_pt_num: int = 0
    multimask_max_pt_num: int = 1
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    use_memory_selection: bool = True  # SAM2Long-style frame filter (apply_temporal_disambiguation)
    mf_threshold: float = 0.01

    # Training memory: recompute each frame's tracker step in the backward pass (``jax.checkpoint``
    # over the body of `train.tracker_clip`'s scan), so the scan keeps its carry (the memory bank)
    # per frame, not every activation of every frame.
    remat: bool = True

    @property
    def grid(self) -> int:
        """Side of the tracker's feature map (72 official)."""
        return self.image_size // self.backbone_stride

    @property
    def low_res_mask_size(self) -> int:
        """Side of the SAM decoder's mask logits (288 official)."""
        return self.grid * 4

    @property
    def input_mask_size(self) -> int:
        """Side of mask prompts given to track_step (1152 official): 4x the low-res mask."""
        return self.low_res_mask_size * 4

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    @classmethod
    def official(cls) -> TrackerConfig:
        return cls()

    @classmethod
    def tiny(cls) -> TrackerConfig:
        """d_model 64, memory dim 16, 8x8 grid (112 px), masks resized to 128 before the down-sampler,
        3 memory frames, 4 object pointers, 2 conditioning frames in attention."""
        # The SAM heads keep their official widths: the reference hard-codes them in _build_sam_heads.
        return cls(
            d_model=64, mem_dim=16, image_size=112, num_maskmem=3, max_obj_ptrs=4, max_cond_frames_in_attn=2,
            max_points=4, mem_attn_layers=2, mem_attn_ffn=128, mask_interpol_size=128,
        )

    def replace(self, **changes) -> TrackerConfig:
        return dataclasses.replace(self, **changes)
