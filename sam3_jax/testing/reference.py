"""Meta's SAM 3 (PyPI ``sam3==0.1.4``) on CPU, as the parity oracle.

Install it with ``scripts/install_reference.sh``. ``load()`` imports it once; on a machine without
CUDA it applies the shims its CUDA-only code paths need: position-encoding caches and decoder coordinates built
on CPU, ``Tensor.pin_memory``/``Tensor.cuda`` as identities, and stub packages for torchvision,
triton and decord (see ``stubs/README.md``). The CLIP vocabulary comes from our own package data.
"""
from __future__ import annotations

import functools
import os
import sys
import types

STUBS = os.path.join(os.path.dirname(__file__), "stubs")
COMMON_STUBS = os.path.join(STUBS, "common")  # torchvision, decord: needed by timm and sam3 imports
LATE_STUBS = os.path.join(STUBS, "after_torch")  # triton: must not be seen by torch's inductor
INSTALL_HINT = "the PyTorch reference is not installed: run `bash scripts/install_reference.sh`"


@functools.cache
def load() -> types.SimpleNamespace:
    """Imports torch and sam3 with the CPU shims; returns a namespace of the modules tests need."""
    if COMMON_STUBS not in sys.path:
        sys.path.append(COMMON_STUBS)
    try:
        import torch
        import timm  # noqa: F401  (before the triton stub: timm probes for triton)
        import torch._dynamo  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    # After torch/timm/dynamo so torch's inductor never sees the fake triton.
    if LATE_STUBS not in sys.path:
        sys.path.append(LATE_STUBS)
    try:
        import sam3.model.position_encoding as position_encoding
        import sam3.model.decoder as decoder
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"{INSTALL_HINT} ({e})") from e

    init = position_encoding.PositionEmbeddingSine.__init__
    # On a GPU the reference's own device handling stands (its caches are built on CUDA); the shims
    # below only stand in for it on a CPU-only machine.
    if not torch.cuda.is_available() and not getattr(init, "_cpu_shim", False):
        def cpu_init(self, *args, precompute_resolution=None, **kwargs):
            init(self, *args, precompute_resolution=None, **kwargs)
        cpu_init._cpu_shim = True
        position_encoding.PositionEmbeddingSine.__init__ = cpu_init
        get_coords = decoder.TransformerDecoder._get_coords
        decoder.TransformerDecoder._get_coords = staticmethod(lambda h, w, device: get_coords(h, w, "cpu"))
        torch.Tensor.pin_memory = lambda self, *a, **k: self
        torch.Tensor.cuda = lambda self, *a, **k: self
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    import sam3.model_builder as model_builder

    return types.SimpleNamespace(torch=torch, model_builder=model_builder)


def install_loss_shims(torch) -> None:
    """CPU stand-ins for what ``sam3.train.loss.loss_fns`` imports: the Triton focal-loss kernels
    (the formula of their docstring, so the reference's own reductions and normalisation still run)
    and torchmetrics (only a logged F1). Call before importing ``sam3.train.loss``."""
    F = torch.nn.functional

    def focal(inputs, targets, alpha=0.25, gamma=2):
        prob = inputs.sigmoid()
        p_t = prob * targets + (1 - prob) * (1 - targets)
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        return alpha_t * F.binary_cross_entropy_with_logits(inputs, targets, reduction="none") * (1 - p_t) ** gamma

    kernels = types.ModuleType("sam3.train.loss.sigmoid_focal_loss")
    kernels.triton_sigmoid_focal_loss = focal
    kernels.triton_sigmoid_focal_loss_reduce = lambda *args: focal(*args).sum()
    sys.modules.setdefault("sam3.train.loss.sigmoid_focal_loss", kernels)
    metrics = types.ModuleType("torchmetrics")
    metrics.functional = types.SimpleNamespace(f1_score=lambda *a, **k: torch.zeros(()))
    sys.modules.setdefault("torchmetrics", metrics)


def bpe_path() -> str:
    from sam3_jax.model.tokenizer import DEFAULT_BPE_PATH

    return DEFAULT_BPE_PATH


def build_image_model(cfg, *, joint_box_scores: bool = False):
    """The reference ``Sam3Image`` at the sizes of a ``ModelConfig``, built like ``model_builder``.

    ``model_builder`` hard-codes the official sizes; this mirrors its ``_create_*`` functions with
    sizes taken from ``cfg`` so that small configs can be checked end to end.
    """
    load()
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring, MultiheadAttentionWrapper, TransformerWrapper
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT
    import torch

    d, v, t = cfg.d_model, cfg.vit, cfg.text
    pos = PositionEmbeddingSine(num_pos_feats=d, normalize=True, temperature=10000)
    trunk = ViT(img_size=v.img_size, pretrain_img_size=v.pretrain_img_size, patch_size=v.patch_size,
                embed_dim=v.embed_dim, depth=v.depth, num_heads=v.num_heads, mlp_ratio=v.mlp_ratio,
                norm_layer="LayerNorm", drop_path_rate=v.drop_path_rate, qkv_bias=True, use_abs_pos=True,
                tile_abs_pos=True, global_att_blocks=v.global_att_blocks, rel_pos_blocks=(), use_rope=True,
                use_interp_rope=True, window_size=v.window_size, pretrain_use_cls_token=True,
                retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False,
                bias_patch_embed=False)
    neck = Sam3DualViTDetNeck(position_encoding=pos, d_model=d, scale_factors=[4.0, 2.0, 1.0, 0.5], trunk=trunk,
                              add_sam2_neck=cfg.neck.add_sam2_neck)
    text = VETextEncoder(tokenizer=SimpleTokenizer(bpe_path=bpe_path()), d_model=d, width=t.width, heads=t.heads,
                         layers=t.layers)
    from sam3.model.vl_combiner import SAM3VLBackbone

    backbone = SAM3VLBackbone(visual=neck, text=text, scalp=1)

    e = cfg.encoder
    enc_layer = TransformerEncoderLayer(
        activation="relu", d_model=d, dim_feedforward=e.dim_feedforward, dropout=e.dropout, pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
        self_attention=MultiheadAttentionWrapper(num_heads=e.num_heads, dropout=e.dropout, embed_dim=d, batch_first=True),
        cross_attention=MultiheadAttentionWrapper(num_heads=e.num_heads, dropout=e.dropout, embed_dim=d, batch_first=True))
    encoder = TransformerEncoderFusion(layer=enc_layer, num_layers=e.num_layers, d_model=d, num_feature_levels=1,
                                       frozen=False, use_act_checkpoint=False, add_pooled_text_to_img_feat=False,
                                       pool_text_with_mask=True)
    dc = cfg.decoder
    dec_layer = TransformerDecoderLayer(
        activation="relu", d_model=d, dim_feedforward=dc.dim_feedforward, dropout=dc.dropout,
        cross_attention=MultiheadAttentionWrapper(num_heads=dc.num_heads, dropout=dc.dropout, embed_dim=d),
        n_heads=dc.num_heads, use_text_cross_attention=True)
    decoder = TransformerDecoder(layer=dec_layer, num_layers=dc.num_layers, num_queries=dc.num_queries,
                                 return_intermediate=True, box_refine=True, num_o2m_queries=0, dac=dc.dac,
                                 boxRPB=dc.box_rpb, d_model=d, frozen=False, interaction_layer=None,
                                 dac_use_selfatt_ln=True, resolution=v.img_size, stride=v.patch_size,
                                 use_act_checkpoint=False, presence_token=dc.presence_token)
    transformer = TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d)

    prompt_mlp = MLP(input_dim=d, hidden_dim=dc.scoring_mlp_dim, output_dim=d, num_layers=2, dropout=dc.dropout,
                     residual=True, out_norm=torch.nn.LayerNorm(d))
    scoring = DotProductScoring(d_model=d, d_proj=d, prompt_mlp=prompt_mlp)
    seg_head = UniversalSegmentationHead(
        hidden_dim=d, upsampling_stages=cfg.seg.upsampling_stages, aux_masks=False, presence_head=False,
        dot_product_scorer=None, act_ckpt=False,
        cross_attend_prompt=MultiheadAttentionWrapper(num_heads=cfg.seg.num_heads, dropout=0, embed_dim=d),
        pixel_decoder=PixelDecoder(num_upsampling_stages=cfg.seg.upsampling_stages, interpolation_mode="nearest",
                                   hidden_dim=d))
    g = cfg.geometry
    geo_layer = TransformerEncoderLayer(
        activation="relu", d_model=d, dim_feedforward=g.dim_feedforward, dropout=g.dropout, pos_enc_at_attn=False,
        pre_norm=True, pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
        self_attention=MultiheadAttentionWrapper(num_heads=g.num_heads, dropout=g.dropout, embed_dim=d, batch_first=False),
        cross_attention=MultiheadAttentionWrapper(num_heads=g.num_heads, dropout=g.dropout, embed_dim=d, batch_first=False))
    geometry = SequenceGeometryEncoder(
        pos_enc=PositionEmbeddingSine(num_pos_feats=d, normalize=True, temperature=10000),
        encode_boxes_as_points=False, points_direct_project=True, points_pool=True, points_pos_enc=True,
        boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True, d_model=d, num_layers=g.num_layers,
        layer=geo_layer, use_act_ckpt=False, add_cls=True, add_post_encode_proj=True)
    model = Sam3Image(backbone=backbone, transformer=transformer, input_geometry_encoder=geometry,
                      segmentation_head=seg_head, num_feature_levels=1, o2m_mask_predict=True,
                      dot_prod_scoring=scoring, use_instance_query=False, multimask_output=True,
                      inst_interactive_predictor=None, matcher=None)
    if joint_box_scores:
        model.supervise_joint_box_scores = True
    return model.eval()


def build_tracker(cfg, seed: int = 7, *, randomize: bool = True):
    """The reference's ``Sam3TrackerBase`` at a ``TrackerConfig``'s sizes, built as
    ``model_builder.build_tracker`` builds it (same classes and switches), with seeded random weights
    (``randomize=False``: the reference's own initialisation)."""
    ref = load()
    from sam3.model.decoder import TransformerDecoderLayerv2, TransformerEncoderCrossAttention
    from sam3.model.memory import CXBlock, SimpleFuser, SimpleMaskDownSampler, SimpleMaskEncoder
    from sam3.model.model_misc import TransformerWrapper
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_tracker_base import Sam3TrackerBase
    from sam3.sam.transformer import RoPEAttention

    from sam3_jax.testing.parity import randomize_

    def rope_attn(**kw):
        return RoPEAttention(embedding_dim=cfg.d_model, num_heads=cfg.mem_attn_heads, downsample_rate=1,
                             dropout=cfg.mem_attn_dropout, rope_theta=cfg.rope_theta, feat_sizes=[cfg.grid, cfg.grid],
                             use_fa3=False, use_rope_real=False, **kw)

    layer = TransformerDecoderLayerv2(
        cross_attention_first=False, activation="relu", dim_feedforward=cfg.mem_attn_ffn, dropout=cfg.mem_attn_dropout,
        pos_enc_at_attn=False, pre_norm=True, self_attention=rope_attn(), d_model=cfg.d_model,
        pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
        cross_attention=rope_attn(kv_in_dim=cfg.mem_dim, rope_k_repeat=True))
    encoder = TransformerEncoderCrossAttention(
        remove_cross_attention_layers=[], batch_first=True, d_model=cfg.d_model, frozen=False, pos_enc_at_input=True,
        layer=layer, num_layers=cfg.mem_attn_layers, use_act_checkpoint=False)
    size = cfg.mask_interpol_size
    maskmem = SimpleMaskEncoder(
        out_dim=cfg.mem_dim, in_dim=cfg.d_model,
        position_encoding=PositionEmbeddingSine(num_pos_feats=cfg.mem_dim, normalize=True, scale=None, temperature=10000),
        mask_downsampler=SimpleMaskDownSampler(embed_dim=cfg.d_model, kernel_size=3, stride=2, padding=1,
                                               interpol_size=[size, size]),
        fuser=SimpleFuser(layer=CXBlock(dim=cfg.d_model, kernel_size=7, padding=3, layer_scale_init_value=1e-6,
                                        use_dwconv=True), num_layers=cfg.fuser_layers))
    ref.torch.manual_seed(seed)  # the prompt encoder's gaussian matrix is drawn at construction
    trk = Sam3TrackerBase(
        backbone=None, transformer=TransformerWrapper(encoder, None, cfg.d_model), maskmem_backbone=maskmem,
        num_maskmem=cfg.num_maskmem, image_size=cfg.image_size, backbone_stride=cfg.backbone_stride,
        max_cond_frames_in_attn=cfg.max_cond_frames_in_attn, max_obj_ptrs_in_encoder=cfg.max_obj_ptrs,
        forward_backbone_per_frame_for_eval=True, multimask_output_in_sam=cfg.multimask_output_in_sam,
        multimask_output_for_tracking=cfg.multimask_output_for_tracking,
        multimask_min_pt_num=cfg.multimask_min_pt_num, multimask_max_pt_num=cfg.multimask_max_pt_num,
        sam_mask_decoder_extra_args={"dynamic_multimask_via_stability": cfg.dynamic_multimask_via_stability,
                                     "dynamic_multimask_stability_delta": cfg.stability_delta,
                                     "dynamic_multimask_stability_thresh": cfg.stability_thresh},
        use_memory_selection=cfg.use_memory_selection, mf_threshold=cfg.mf_threshold).eval()
    if randomize:
        randomize_(trk, seed=seed)
    return trk


def build_tracker_predictor(image_model, base, cfg, *, keep_autocast: bool = False):
    """``Sam3TrackerPredictor`` as ``model_builder.build_tracker`` configures it, with ``image_model``'s
    backbone and ``base``'s (a ``build_tracker`` model's) tracker weights. It enters a bf16 autocast
    for good at construction (CUDA's); ``keep_autocast=False`` leaves it, for fp32 comparisons."""
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor

    pred = Sam3TrackerPredictor(
        backbone=image_model.backbone, transformer=base.transformer, maskmem_backbone=base.maskmem_backbone,
        num_maskmem=cfg.num_maskmem, image_size=cfg.image_size, backbone_stride=cfg.backbone_stride,
        max_cond_frames_in_attn=cfg.max_cond_frames_in_attn, max_obj_ptrs_in_encoder=cfg.max_obj_ptrs,
        multimask_output_in_sam=True, forward_backbone_per_frame_for_eval=True, trim_past_non_cond_mem_for_eval=False,
        multimask_output_for_tracking=True, multimask_min_pt_num=0, multimask_max_pt_num=1,
        always_start_from_first_ann_frame=False, non_overlap_masks_for_mem_enc=False,
        non_overlap_masks_for_output=False, offload_output_to_cpu_for_eval=False,
        sam_mask_decoder_extra_args={"dynamic_multimask_via_stability": True,
                                     "dynamic_multimask_stability_delta": cfg.stability_delta,
                                     "dynamic_multimask_stability_thresh": cfg.stability_thresh},
        clear_non_cond_mem_around_input=True, fill_hole_area=0, use_memory_selection=cfg.use_memory_selection,
        max_point_num_in_prompt_enc=cfg.max_points)
    if not keep_autocast:
        pred.bf16_context.__exit__(None, None, None)
    missing, unexpected = pred.load_state_dict(base.state_dict(), strict=False)
    if unexpected or not all(k.startswith("backbone.") for k in missing):
        raise ValueError(f"tracker weights do not fit: missing {missing}, unexpected {unexpected}")
    return pred.eval()


def convert_video_models(image_model, tracker, directory, cfg, tracker_cfg) -> str:
    """The two reference models' weights as one video-model ``sam3.pt`` (``detector.*`` and
    ``tracker.*`` keys) in ``directory``, converted by our converter; returns the converted path."""
    import numpy as np

    from sam3_jax.convert.sam3_checkpoint import convert_file
    from sam3_jax.testing.parity import state_dict_numpy

    torch = load().torch
    sd = {"detector." + k: v for k, v in state_dict_numpy(image_model).items()}
    sd.update({"tracker." + k: v for k, v in state_dict_numpy(tracker).items()})
    path, out = os.path.join(directory, "sam3.pt"), os.path.join(directory, "converted")
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}}, path)
    convert_file(path, out, cfg=cfg, tracker_cfg=tracker_cfg)
    return out


def detect_track_kwargs(cfg):
    """A ``DetectTrackConfig``'s fields under the reference video model's constructor names."""
    return {
        "score_threshold_detection": cfg.score_threshold_detection,
        "det_nms_thresh": cfg.det_nms_thresh,
        "assoc_iou_thresh": cfg.assoc_iou_thresh,
        "trk_assoc_iou_thresh": cfg.trk_assoc_iou_thresh,
        "new_det_thresh": cfg.new_det_thresh,
        "hotstart_delay": cfg.hotstart_delay,
        "hotstart_unmatch_thresh": cfg.hotstart_unmatch_thresh,
        "hotstart_dup_thresh": cfg.hotstart_dup_thresh,
        "suppress_unmatched_only_within_hotstart": cfg.suppress_unmatched_only_within_hotstart,
        "init_trk_keep_alive": cfg.init_trk_keep_alive,
        "max_trk_keep_alive": cfg.max_trk_keep_alive,
        "min_trk_keep_alive": cfg.min_trk_keep_alive,
        "suppress_overlapping_based_on_recent_occlusion_threshold": cfg.occlusion_iou_thresh,
        "fill_hole_area": cfg.fill_hole_area,
        "recondition_every_nth_frame": cfg.recondition_every_nth_frame,
        "max_num_objects": cfg.max_num_objects,
    }


def allow_empty_connected_components():
    """CPU shim: the reference's CPU connected-components fallback cannot take zero masks (torch.stack
    of an empty list), which its hole filling passes whenever a frame has no new detection."""
    import sam3.perflib.connected_components as cc

    if getattr(cc.connected_components_cpu, "_empty_ok", False):
        return
    orig = cc.connected_components_cpu

    def connected_components_cpu(x):
        if x.shape[0] == 0:
            return x.long(), x.long()
        return orig(x)

    connected_components_cpu._empty_ok = True
    cc.connected_components_cpu = connected_components_cpu


def build_detect_track_model(image_model, base, tracker_cfg, dt_cfg, *, cuda: bool = False):
    """The reference's ``Sam3VideoInference`` in one process from an image model and a ``build_tracker``
    model, with a ``DetectTrackConfig``'s thresholds. Without CUDA, the CPU shims: the detector's bf16
    tracker features go back to float32 where they are used, tracker states stay on the CPU (the
    default storage device is CUDA), and empty hole-filling batches are allowed."""
    from sam3.model.sam3_image import Sam3ImageOnVideoMultiGPU
    from sam3.model.sam3_video_inference import Sam3VideoInference

    tracker = build_tracker_predictor(image_model, base, tracker_cfg, keep_autocast=cuda)
    image_model.__class__ = Sam3ImageOnVideoMultiGPU  # the video model's detector class, one process
    image_model.rank, image_model.world_size = 0, 1
    image_model.async_all_gather, image_model.gather_backbone_out = False, True
    model = Sam3VideoInference(detector=image_model, tracker=tracker, image_size=tracker_cfg.image_size,
                               **detect_track_kwargs(dt_cfg)).eval()
    if cuda:
        return model.cuda()
    to_float = lambda module, args: tuple(a.float() for a in args)
    tracker.sam_mask_decoder.conv_s0.register_forward_pre_hook(to_float)
    tracker.sam_mask_decoder.conv_s1.register_forward_pre_hook(to_float)
    detect = model.run_backbone_and_detection

    def run_backbone_and_detection(**kwargs):
        det_out = detect(**kwargs)
        cache = kwargs["feature_cache"][kwargs["frame_idx"]][1]["tracker_backbone_out"]
        cache["backbone_fpn"] = [x.float() for x in cache["backbone_fpn"]]
        cache["vision_features"] = cache["backbone_fpn"][-1]
        return det_out

    model.run_backbone_and_detection = run_backbone_and_detection
    init_state = tracker.init_state
    tracker.init_state = lambda **kw: init_state(offload_video_to_cpu=True, offload_state_to_cpu=True, **kw)
    allow_empty_connected_components()
    return model


def start_text_prompt(model, images, orig_hw: tuple[int, int], prompt: str) -> dict:
    """A ``Sam3VideoInference`` state for ``images`` (T, 3, S, S), normalised, with a text prompt: what
    ``init_state`` + ``add_prompt`` set, without ``add_prompt``'s extra pass over the prompt frame."""
    state = {"image_size": model.image_size, "num_frames": images.shape[0], "orig_height": orig_hw[0],
             "orig_width": orig_hw[1], "constants": {}}
    model._construct_initial_input_batch(state, images)
    state.update(tracker_inference_states=[], tracker_metadata={}, feature_cache={}, cached_frame_outputs={},
                 action_history=[], is_image_only=False)
    state["text_prompt"] = prompt
    state["input_batch"].find_text_batch[0] = prompt
    for stage in state["input_batch"].find_inputs:
        stage.text_ids[...] = model.TEXT_ID_FOR_TEXT
    return state
