"""The tracker against the reference at small sizes (TrackerConfig.tiny(): d_model 64, memory dim 16,
8x8 grid, 112 px image): memory attention, memory encoder, SAM prompt encoder and mask decoder, then
track_step + select_memory over an 8-frame clip. Padded (static-shape) inputs must equal the
reference run on the valid entries only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.convert import keymap
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.mask_decoder import MaskDecoder
from sam3_jax.model.tracker.memory_attention import MemoryAttention
from sam3_jax.model.tracker.memory_bank import MemoryBank, select_memory
from sam3_jax.model.tracker.memory_encoder import MemoryEncoder
from sam3_jax.model.tracker.prompt_encoder import PromptEncoder
from sam3_jax.model.tracker.tracker import Tracker
from sam3_jax.testing.parity import (
    flax_params,
    max_abs_diff,
    randomize_,
    state_dict_numpy,
    t2n,
)

pytestmark = pytest.mark.parity
TOL = 1e-5
CFG = TrackerConfig.tiny()
HW = CFG.grid * CFG.grid


def _close(name, got, want, tol=TOL):
    err = max_abs_diff(got, want)
    print(f"{name}: max abs err {err:.2e}")
    assert err <= tol, (name, err)


def _normal(rng, *shape, scale=1.0):
    return (scale * rng.normal(size=shape)).astype(np.float32)


# ----------------------------------------------------------------------------------- memory attention
def _torch_memory_attention(ref, cfg):
    from sam3.model.decoder import (
        TransformerDecoderLayerv2,
        TransformerEncoderCrossAttention,
    )
    from sam3.sam.transformer import RoPEAttention

    def rope_attn(**kw):
        return RoPEAttention(embedding_dim=cfg.d_model, num_heads=cfg.mem_attn_heads, downsample_rate=1,
                             dropout=cfg.mem_attn_dropout, rope_theta=cfg.rope_theta,
                             feat_sizes=[cfg.grid, cfg.grid], use_fa3=False, use_rope_real=False, **kw)

    layer = TransformerDecoderLayerv2(
        cross_attention_first=False, activation="relu", dim_feedforward=cfg.mem_attn_ffn,
        dropout=cfg.mem_attn_dropout, pos_enc_at_attn=False, pre_norm=True, self_attention=rope_attn(),
        d_model=cfg.d_model, pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
        cross_attention=rope_attn(kv_in_dim=cfg.mem_dim, rope_k_repeat=True))
    enc = TransformerEncoderCrossAttention(
        remove_cross_attention_layers=[], batch_first=True, d_model=cfg.d_model, frozen=False,
        pos_enc_at_input=True, layer=layer, num_layers=cfg.mem_attn_layers, use_act_checkpoint=False).eval()
    randomize_(enc, seed=10)
    return enc


def _run_torch_memory_attention(ref, enc, curr, curr_pos, memory, memory_pos, num_ptr_tokens):
    """The reference's seq-first call, as _prepare_memory_conditioned_features makes it."""
    torch = ref.torch
    seq = lambda a: torch.tensor(a).transpose(0, 1)
    with torch.no_grad():
        out = enc(src=[seq(curr)], src_key_padding_mask=[None], src_pos=[seq(curr_pos)], prompt=seq(memory),
                  prompt_pos=seq(memory_pos), prompt_key_padding_mask=None, num_obj_ptr_tokens=num_ptr_tokens)
    return t2n(out["memory"].transpose(0, 1))


@pytest.fixture(scope="module")
def memory_attention(ref):
    enc = _torch_memory_attention(ref, CFG)
    module = MemoryAttention(CFG)
    rng = np.random.default_rng(0)
    curr = _normal(rng, 2, HW, CFG.d_model)
    mem = _normal(rng, 2, 2 * HW + 8, CFG.mem_dim)
    params = flax_params(enc, module, curr, curr, mem, mem, num_spatial_frames=2)
    return enc, module, params


@pytest.mark.parametrize("num_frames,num_ptr_tokens", [(1, 0), (2, 8), (3, 4)])
def test_memory_attention(ref, memory_attention, num_frames, num_ptr_tokens):
    enc, module, params = memory_attention
    rng = np.random.default_rng(num_frames)
    curr, curr_pos = _normal(rng, 2, HW, CFG.d_model), _normal(rng, 2, HW, CFG.d_model)
    n = num_frames * HW + num_ptr_tokens
    memory, memory_pos = _normal(rng, 2, n, CFG.mem_dim), _normal(rng, 2, n, CFG.mem_dim)
    want = _run_torch_memory_attention(ref, enc, curr, curr_pos, memory, memory_pos, num_ptr_tokens)
    got = module.apply({"params": params}, curr, curr_pos, memory, memory_pos, num_spatial_frames=num_frames)
    _close(f"memory attention ({num_frames} frames, {num_ptr_tokens} pointer tokens)", got, want)


def test_memory_attention_padding_equals_valid_slots(ref, memory_attention):
    """Bank of 3 frame slots + 3 pointers (12 tokens); per batch element different slots are empty.
    Each element must equal the reference run on its valid frames and pointers only."""
    enc, module, params = memory_attention
    rng = np.random.default_rng(7)
    b, frames, ptrs = 2, 3, 3
    tok = CFG.d_model // CFG.mem_dim  # tokens per pointer
    curr, curr_pos = _normal(rng, b, HW, CFG.d_model), _normal(rng, b, HW, CFG.d_model)
    n = frames * HW + ptrs * tok
    memory, memory_pos = _normal(rng, b, n, CFG.mem_dim), _normal(rng, b, n, CFG.mem_dim)
    valid_frames = [[True, False, True], [False, True, False]]
    valid_ptrs = [[False, True, True], [True, False, False]]
    mask = np.zeros((b, n), bool)
    for i in range(b):
        mask[i, :frames * HW] = ~np.repeat(valid_frames[i], HW)
        mask[i, frames * HW:] = ~np.repeat(valid_ptrs[i], tok)
    got = jax.jit(lambda *a: module.apply({"params": params}, *a, num_spatial_frames=frames))(
        curr, curr_pos, memory, memory_pos, jnp.asarray(mask))
    for i in range(b):
        keep = ~mask[i]
        nf = int(np.sum(valid_frames[i]))
        want = _run_torch_memory_attention(ref, enc, curr[i:i + 1], curr_pos[i:i + 1], memory[i:i + 1, keep],
                                           memory_pos[i:i + 1, keep], int(keep[frames * HW:].sum()))
        assert nf * HW + int(keep[frames * HW:].sum()) == keep.sum()
        _close(f"memory attention, padded bank, object {i}", got[i:i + 1], want)


def test_memory_attention_all_padding_is_finite_and_dropout_runs(memory_attention):
    """A padded object slot (every key masked) stays finite; dropout changes the output."""
    _, module, params = memory_attention
    rng = np.random.default_rng(3)
    curr = _normal(rng, 1, HW, CFG.d_model)
    memory = _normal(rng, 1, HW, CFG.mem_dim)
    mask = jnp.ones((1, HW), bool)
    out = module.apply({"params": params}, curr, curr, memory, memory, mask, num_spatial_frames=1)
    assert np.isfinite(np.asarray(out)).all()
    det = module.apply({"params": params}, curr, curr, memory, memory, num_spatial_frames=1)
    drop = module.apply({"params": params}, curr, curr, memory, memory, num_spatial_frames=1,
                        deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert np.isfinite(np.asarray(drop)).all() and max_abs_diff(det, drop) > 1e-3


# ------------------------------------------------------------------------------------ memory encoder
def _torch_memory_encoder(ref, cfg):
    from sam3.model.memory import (
        CXBlock,
        SimpleFuser,
        SimpleMaskDownSampler,
        SimpleMaskEncoder,
    )
    from sam3.model.position_encoding import PositionEmbeddingSine

    size = cfg.mask_interpol_size
    t_enc = SimpleMaskEncoder(
        out_dim=cfg.mem_dim, in_dim=cfg.d_model,
        position_encoding=PositionEmbeddingSine(num_pos_feats=cfg.mem_dim, normalize=True, scale=None,
                                                temperature=10000),
        mask_downsampler=SimpleMaskDownSampler(embed_dim=cfg.d_model, kernel_size=3, stride=2, padding=1,
                                               interpol_size=[size, size]),
        fuser=SimpleFuser(layer=CXBlock(dim=cfg.d_model, kernel_size=7, padding=3, layer_scale_init_value=1e-6,
                                        use_dwconv=True), num_layers=cfg.fuser_layers)).eval()
    randomize_(t_enc, seed=20)
    return t_enc


@pytest.mark.parametrize("mask_side", [CFG.mask_interpol_size, CFG.image_size])
def test_memory_encoder(ref, mask_side):
    """Masks at the interpolation size (no resize) and at the image size (antialiased resize first)."""
    torch = ref.torch
    t_enc = _torch_memory_encoder(ref, CFG)
    rng = np.random.default_rng(mask_side)
    pix = _normal(rng, 2, CFG.d_model, CFG.grid, CFG.grid)
    masks = 20.0 * (rng.uniform(size=(2, mask_side, mask_side)) > 0.5).astype(np.float32) - 10.0
    with torch.no_grad():
        out = t_enc(torch.tensor(pix), torch.tensor(masks[:, None]), skip_mask_sigmoid=True)
    module = MemoryEncoder(CFG)
    pix_nhwc = pix.transpose(0, 2, 3, 1)
    params = flax_params(t_enc, module, pix_nhwc, masks)
    feats, pos = jax.jit(module.apply)({"params": params}, pix_nhwc, masks)
    _close(f"memory encoder features (mask {mask_side})", feats, t2n(out["vision_features"]).transpose(0, 2, 3, 1))
    _close("memory encoder pos", pos, t2n(out["vision_pos_enc"][0]).transpose(0, 2, 3, 1))


# ------------------------------------------------------------------------------------ prompt encoder
def _torch_prompt_encoder(ref, cfg):
    from sam3.sam.prompt_encoder import PromptEncoder as TorchPromptEncoder

    ref.torch.manual_seed(30)  # the gaussian matrix is a buffer drawn at construction
    t_pe = TorchPromptEncoder(embed_dim=cfg.d_model, image_embedding_size=(cfg.grid, cfg.grid),
                              input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans)
    randomize_(t_pe.eval(), seed=30)
    return t_pe


# Two objects, 4 point slots: (pos, neg, pad, pad) and (box corners, "not a point", pad).
POINT_LABELS = np.array([[1, 0, 1, 1], [2, 3, -1, 0]], np.int32)
POINT_PADDING = np.array([[False, False, True, True], [False, False, False, True]])


def _points(rng):
    return rng.uniform(0, CFG.image_size - 1, size=(2, 4, 2)).astype(np.float32)


def test_prompt_encoder(ref):
    torch = ref.torch
    t_pe = _torch_prompt_encoder(ref, CFG)
    rng = np.random.default_rng(30)
    coords = _points(rng)
    masks = _normal(rng, 2, CFG.low_res_mask_size, CFG.low_res_mask_size, scale=5.0)
    module = PromptEncoder(CFG)
    params = flax_params(t_pe, module, coords, POINT_LABELS, POINT_PADDING, masks)
    np.testing.assert_array_equal(params["pe_layer"]["positional_encoding_gaussian_matrix"],
                                  t2n(t_pe.pe_layer.positional_encoding_gaussian_matrix))
    sparse, sparse_pad, dense = jax.jit(module.apply)({"params": params}, coords, POINT_LABELS, POINT_PADDING,
                                                      masks, jnp.array([True, False]))
    with torch.no_grad():
        t_dense_mask = t2n(t_pe(None, None, torch.tensor(masks[:, None]))[1]).transpose(0, 2, 3, 1)
        t_dense_none = t2n(t_pe(None, None, None)[1]).transpose(0, 2, 3, 1)
        t_dense_pe = t2n(t_pe.get_dense_pe()[0]).transpose(1, 2, 0)
    _close("prompt encoder dense (mask)", dense[0], t_dense_mask[0])
    _close("prompt encoder dense (no mask)", dense[1], t_dense_none[0])
    _close("prompt encoder dense pe", module.apply({"params": params}, method=PromptEncoder.get_dense_pe), t_dense_pe)
    for i in range(2):
        keep = ~POINT_PADDING[i]
        with torch.no_grad():
            want = t2n(t_pe((torch.tensor(coords[i:i + 1, keep]), torch.tensor(POINT_LABELS[i:i + 1, keep])),
                            None, None)[0])[0]
        valid = ~np.asarray(sparse_pad[i])
        assert valid.sum() == len(want) and not sparse_pad[i, -1]
        _close(f"prompt encoder sparse, object {i}", np.asarray(sparse[i])[valid], want)
        assert not np.asarray(sparse[i])[~valid].any()


# -------------------------------------------------------------------------------------- mask decoder
def _torch_mask_decoder(ref, cfg):
    from sam3.sam.mask_decoder import MaskDecoder as TorchMaskDecoder
    from sam3.sam.transformer import TwoWayTransformer as TorchTwoWay

    dec = TorchMaskDecoder(
        num_multimask_outputs=cfg.num_multimask_outputs,
        transformer=TorchTwoWay(depth=cfg.two_way_depth, embedding_dim=cfg.d_model, mlp_dim=cfg.two_way_mlp,
                                num_heads=cfg.two_way_heads),
        transformer_dim=cfg.d_model, iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden,
        use_high_res_features=True, iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True, dynamic_multimask_via_stability=True,
        dynamic_multimask_stability_delta=cfg.stability_delta,
        dynamic_multimask_stability_thresh=cfg.stability_thresh).eval()
    randomize_(dec, seed=40)
    return dec


def _decoder_inputs(rng):
    c, g = CFG.d_model, CFG.grid
    return {
        "image": _normal(rng, 2, c, g, g), "pe": _normal(rng, 1, c, g, g), "dense": _normal(rng, 2, c, g, g),
        "fpn0": _normal(rng, 2, c, 4 * g, 4 * g), "fpn1": _normal(rng, 2, c, 2 * g, 2 * g),
        "sparse": _normal(rng, 2, 5, c), "padding": np.array([[False, False, True, True, False],
                                                       [False, True, False, False, False]])}


def _nhwc(a):
    return a.transpose(0, 2, 3, 1)


def _decoder_forward(m, image, pe, sparse, dense, fpn0, fpn1, padding, multimask):
    high_res = m.project_high_res(fpn0, fpn1)
    return m(image, pe, sparse, dense, high_res, multimask_output=multimask, sparse_padding_mask=padding)


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder(ref, multimask):
    torch = ref.torch
    t_dec = _torch_mask_decoder(ref, CFG)
    x = _decoder_inputs(np.random.default_rng(40))
    args = (_nhwc(x["image"]), _nhwc(x["pe"])[0], x["sparse"], _nhwc(x["dense"]), _nhwc(x["fpn0"]),
            _nhwc(x["fpn1"]), x["padding"])
    cfg = CFG
    tt = torch.tensor
    with torch.no_grad():
        fpn0, fpn1 = t_dec.conv_s0(tt(x["fpn0"])), t_dec.conv_s1(tt(x["fpn1"]))
        if not multimask:
            # Put the stability threshold between the two objects' scores so both branches run.
            scores = []
            for i in range(2):
                keep = ~x["padding"][i]
                masks = t_dec.predict_masks(tt(x["image"][i:i + 1]), tt(x["pe"]), tt(x["sparse"][i:i + 1, keep]),
                                            tt(x["dense"][i:i + 1]), False, [fpn0[i:i + 1], fpn1[i:i + 1]])[0]
                scores.append(float(t_dec._get_stability_scores(masks[:, 0:1])[0, 0]))
            assert scores[0] != scores[1], scores
            t_dec.dynamic_multimask_stability_thresh = sum(scores) / 2
            cfg = CFG.replace(stability_thresh=sum(scores) / 2)
        wants = []
        for i in range(2):
            keep = ~x["padding"][i]
            wants.append([t2n(o)[0] for o in t_dec(
                image_embeddings=tt(x["image"][i:i + 1]), image_pe=tt(x["pe"]),
                sparse_prompt_embeddings=tt(x["sparse"][i:i + 1, keep]),
                dense_prompt_embeddings=tt(x["dense"][i:i + 1]),
                multimask_output=multimask, repeat_image=False, high_res_features=[fpn0[i:i + 1], fpn1[i:i + 1]])])
    module = MaskDecoder(cfg)
    params = flax_params(t_dec, module, *args, multimask, method=_decoder_forward)
    got = jax.jit(lambda p, *a: module.apply({"params": p}, *a, multimask, method=_decoder_forward))(params, *args)
    for i in range(2):
        for name, g, w in zip(("masks", "iou", "sam_tokens", "object_score"), got, wants[i]):
            assert g[i].shape == w.shape, name
            _close(f"mask decoder {name} (multimask={multimask}), object {i}", g[i], w)
    high = module.apply({"params": params}, _nhwc(x["fpn0"]), _nhwc(x["fpn1"]), method=MaskDecoder.project_high_res)
    _close("mask decoder conv_s0", high[0], _nhwc(t2n(fpn0)))
    _close("mask decoder conv_s1", high[1], _nhwc(t2n(fpn1)))


# ------------------------------------------------------------------------- track_step over a tiny clip
T = 8
# Per object, the prompts by frame: a mask; a click, then correction clicks on later frames (more
# conditioning frames than max_cond_frames_in_attn); a box (two corner points). Others are tracked.
ELLIPSE = np.mgrid[:CFG.input_mask_size, :CFG.input_mask_size]
PROMPTS = [
    {0: (((ELLIPSE[0] - 60) ** 2 / 900 + (ELLIPSE[1] - 50) ** 2 / 400) < 1).astype(np.float32)},
    {0: ([[40.0, 60.0]], [1]), 3: ([[70.0, 30.0], [20.0, 20.0]], [1, 0]), 5: ([[50.0, 50.0]], [0])},
    {0: ([[20.0, 30.0], [80.0, 90.0]], [2, 3])},
]


def _torch_tracker(ref, cfg):
    from sam3.model.model_misc import TransformerWrapper
    from sam3.model.sam3_tracker_base import Sam3TrackerBase

    ref.torch.manual_seed(50)
    trk = Sam3TrackerBase(
        backbone=None, transformer=TransformerWrapper(_torch_memory_attention(ref, cfg), None, cfg.d_model),
        maskmem_backbone=_torch_memory_encoder(ref, cfg), num_maskmem=cfg.num_maskmem, image_size=cfg.image_size,
        backbone_stride=cfg.backbone_stride, max_cond_frames_in_attn=cfg.max_cond_frames_in_attn,
        multimask_output_in_sam=True, multimask_output_for_tracking=True, multimask_min_pt_num=0,
        multimask_max_pt_num=1, forward_backbone_per_frame_for_eval=True, max_obj_ptrs_in_encoder=cfg.max_obj_ptrs,
        sam_mask_decoder_extra_args={"dynamic_multimask_via_stability": True,
                                     "dynamic_multimask_stability_delta": cfg.stability_delta,
                                     "dynamic_multimask_stability_thresh": cfg.stability_thresh},
        use_memory_selection=cfg.use_memory_selection).eval()
    randomize_(trk, seed=50)
    with ref.torch.no_grad():  # random weights: objects then come and go around a score of 0
        trk.sam_mask_decoder.pred_obj_score_head.layers[2].bias += 0.75
    return trk


def _run_torch_clip(ref, trk, cfg, frames, prompts):
    """The reference's track_step frame by frame for one object, as the predictor drives it."""
    from sam3.model.position_encoding import PositionEmbeddingSine

    torch = ref.torch
    g, pe = cfg.grid, PositionEmbeddingSine(num_pos_feats=cfg.d_model, normalize=True)
    output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    outs = []
    num_frames = len(frames["pix"])
    for t in range(num_frames):
        prompt = prompts.get(t)
        points = masks = None
        if isinstance(prompt, tuple):
            points = {"point_coords": torch.tensor([prompt[0]]),
                      "point_labels": torch.tensor([prompt[1]], dtype=torch.int32)}
        elif prompt is not None:
            masks = torch.tensor(prompt[None, None])
        with torch.no_grad():
            dec = trk.sam_mask_decoder
            levels = [dec.conv_s0(torch.tensor(frames["fpn0"][t:t + 1])),
                      dec.conv_s1(torch.tensor(frames["fpn1"][t:t + 1])), torch.tensor(frames["pix"][t:t + 1])]
            out = trk.track_step(
                frame_idx=t, is_init_cond_frame=t == 0,
                current_vision_feats=[x.flatten(2).permute(2, 0, 1) for x in levels],
                current_vision_pos_embeds=[pe(x).flatten(2).permute(2, 0, 1) for x in levels],
                feat_sizes=[(4 * g, 4 * g), (2 * g, 2 * g), (g, g)], image=None, point_inputs=points,
                mask_inputs=masks, output_dict=output_dict, num_frames=num_frames)
        output_dict["non_cond_frame_outputs" if prompt is None else "cond_frame_outputs"][t] = out
        # (iou_score is only recorded with memory selection)
        outs.append({k: t2n(out[k])[0] for k in ("pred_masks", "pred_masks_high_res", "obj_ptr", "object_score_logits",
                                                   "maskmem_features", "iou_score") if k in out})
    return outs


def _prompt_arrays(prompts_per_object, cfg=CFG, num_frames=T):
    """(T, B, ...) static-shape prompts: padded points with validity, masks with a presence flag."""
    b, p, sm, n = len(prompts_per_object), cfg.max_points, cfg.input_mask_size, num_frames
    a = {"coords": np.zeros((n, b, p, 2), np.float32), "labels": np.zeros((n, b, p), np.int32),
         "valid": np.zeros((n, b, p), bool), "masks": np.zeros((n, b, sm, sm), np.float32),
         "has_mask": np.zeros((n, b), bool), "is_cond": np.zeros((n, b), bool)}
    for o, prompts in enumerate(prompts_per_object):
        for t, prompt in prompts.items():
            a["is_cond"][t, o] = True
            if isinstance(prompt, tuple):
                n = len(prompt[1])
                a["coords"][t, o, :n], a["labels"][t, o, :n], a["valid"][t, o, :n] = prompt[0], prompt[1], True
            else:
                a["masks"][t, o], a["has_mask"][t, o] = prompt, True
    return a


def _track_clip(cfg, params, frames, prompts, num_objects):
    """Our clip: lax.scan over frames, all objects in one batch, one MemoryBank slot per frame.
    prompts: ``_prompt_arrays``."""
    model = Tracker(cfg)
    n = len(frames["pix"])

    def step(bank, x):
        t = x["t"]
        feats = {k: jnp.broadcast_to(v[None], (num_objects,) + v.shape) for k, v in x["frame"].items()}
        high_res = model.apply({"params": params}, feats["fpn0"], feats["fpn1"], method=Tracker.project_high_res)
        memory = select_memory(bank, t, n, cfg)
        p = x["prompts"]
        out = model.apply({"params": params}, feats["pix"], high_res, memory, jnp.broadcast_to(t == 0, (num_objects,)),
                          p["coords"], p["labels"], p["valid"], p["masks"], p["has_mask"], method=Tracker.track_step)
        bank = bank.write(t, t, out["maskmem_features"], out["obj_ptr"], p["is_cond"], out["memory_score"])
        return bank, out

    xs = {"t": jnp.arange(n), "frame": {k: v.transpose(0, 2, 3, 1) for k, v in frames.items()}, "prompts": prompts}
    return jax.lax.scan(step, MemoryBank.empty(cfg, num_objects, n), xs)


@pytest.mark.slow
@pytest.mark.parametrize("memory_selection", [True, False])
def test_track_step_clip(ref, memory_selection):
    """8 frames, 3 objects (mask / clicks with corrections / box on frame 0), batched and scanned, against
    the reference run object by object. Also: the tracker's parameter tree is the torch tree."""
    cfg = CFG.replace(use_memory_selection=memory_selection)
    trk = _torch_tracker(ref, cfg)
    rng = np.random.default_rng(50)
    c, g = cfg.d_model, cfg.grid
    frames = {"pix": _normal(rng, T, c, g, g), "fpn0": _normal(rng, T, c, 4 * g, 4 * g),
              "fpn1": _normal(rng, T, c, 2 * g, 2 * g)}
    wants = [_run_torch_clip(ref, trk, cfg, frames, prompts) for prompts in PROMPTS]

    b = len(PROMPTS)
    abstract = jax.eval_shape(lambda: Tracker(cfg).init(jax.random.key(0), method=Tracker.all_paths))["params"]
    state = state_dict_numpy(trk)
    state.pop("no_mem_pos_enc")  # never read by the reference; dead for the converter
    params = keymap.convert(state, abstract).params
    bank, got = jax.jit(_track_clip, static_argnums=(0, 4))(cfg, params, frames, _prompt_arrays(PROMPTS), b)

    present = _compare_clip(f"clip (selection={memory_selection})", got, wants, PROMPTS)
    assert 0 < sum(present) < len(present)  # objects both present and absent somewhere in the clip
    if memory_selection:
        _check_training_mode_and_bf16(cfg, params, frames, bank, got)


def _compare_clip(name, got, wants, prompts, features_tol=1e-4):
    """Every frame and object: object score and IoU within 1e-4, pointer and memory features within
    ``features_tol``, mask logits within 1e-3 of their largest magnitude (not on mask-input frames:
    see tracker.py). Returns whether the reference saw each (frame, object) present."""
    present = []
    for t in range(len(wants[0])):
        for o, want in enumerate(wants):
            w = want[t]
            present.append(w["object_score_logits"][0] > 0)
            tag = f"{name} frame {t} object {o}"
            _close(f"{tag} object score", got["object_score_logits"][t, o], w["object_score_logits"], 1e-4)
            if "iou_score" in w:
                _close(f"{tag} iou", got["iou_score"][t, o], w["iou_score"], 1e-4)
            _close(f"{tag} obj_ptr", got["obj_ptr"][t, o], w["obj_ptr"], features_tol)
            _close(f"{tag} memory", got["maskmem_features"][t, o], w["maskmem_features"].transpose(1, 2, 0),
                   features_tol)
            if t not in prompts[o] or isinstance(prompts[o][t], tuple):
                for key in ("pred_masks", "pred_masks_high_res"):
                    scale = np.abs(w[key]).max()
                    _close(f"{tag} {key} / max", got[key][t, o] / scale, w[key][0] / scale, 1e-3)
    return present


@pytest.mark.slow
def test_track_step_clip_official_size(ref):
    """The official tracker (video model's switches, memory selection on) over 8 frames of random
    backbone features at 1008 px: a GT mask on frame 0, then propagation with memory. One object, one
    process each side; the reference's own track_step frame by frame."""
    from sam3_jax.testing import reference

    cfg = TrackerConfig.official()
    trk = reference.build_tracker(cfg, seed=11)
    rng = np.random.default_rng(11)
    c, g, m = cfg.d_model, cfg.grid, cfg.input_mask_size
    frames = {"pix": _normal(rng, T, c, g, g), "fpn0": _normal(rng, T, c, 4 * g, 4 * g),
              "fpn1": _normal(rng, T, c, 2 * g, 2 * g)}
    yy, xx = np.mgrid[:m, :m] / m
    prompts = [{0: (((yy - 0.4) ** 2 / 0.04 + (xx - 0.55) ** 2 / 0.02) < 1).astype(np.float32)}]
    wants = [_run_torch_clip(ref, trk, cfg, frames, prompts[0])]
    state = state_dict_numpy(trk)
    state.pop("no_mem_pos_enc")  # never read by the reference; dead for the converter
    params = keymap.convert(state, jax.eval_shape(
        lambda: Tracker(cfg).init(jax.random.key(0), method=Tracker.all_paths))["params"]).params
    _, got = jax.jit(_track_clip, static_argnums=(0, 4))(cfg, params, frames, _prompt_arrays(prompts, cfg), 1)
    _compare_clip("official clip", got, wants, prompts, features_tol=1e-3)


def _check_training_mode_and_bf16(cfg, params, frames, bank, got, t=3):
    """Frame t again from the bank as it was then: with deterministic=False (dropout in the memory
    attention, no stability fallback, soft click masks in memory, pointers of future conditioning
    frames) it runs under jit, is finite and differs; in bfloat16 it stays close."""
    b = len(PROMPTS)
    bank = bank.replace(frame=jnp.where(bank.frame < t, bank.frame, -1))
    feats = {k: jnp.broadcast_to(v[t].transpose(1, 2, 0), (b,) + v.shape[2:] + v.shape[1:2]) for k, v in frames.items()}
    prompts = jax.tree.map(lambda a: a[t], _prompt_arrays(PROMPTS))

    def step(model, deterministic):
        memory = select_memory(bank, t, T, cfg, past_pointers_only=deterministic)
        high_res = model.apply({"params": params}, feats["fpn0"], feats["fpn1"], method=Tracker.project_high_res)
        return model.apply({"params": params}, feats["pix"], high_res, memory, jnp.zeros((b,), bool), prompts["coords"],
                           prompts["labels"], prompts["valid"], deterministic=deterministic, method=Tracker.track_step,
                           rngs={"dropout": jax.random.key(1)})

    train, half = jax.jit(lambda: (step(Tracker(cfg), False), step(Tracker(cfg, dtype=jnp.bfloat16), True)))()
    for out in (train, half):
        assert all(np.isfinite(np.asarray(v, np.float32)).all() for v in jax.tree.leaves(out))
    assert max_abs_diff(train["obj_ptr"], got["obj_ptr"][t]) > 1e-4
    assert half["pred_masks"].dtype == jnp.float32 and half["maskmem_features"].dtype == jnp.bfloat16
    _close("bf16 vs f32 object score (loose)", half["object_score_logits"], got["object_score_logits"][t], 0.1)


class _MemoryRecorder(__import__("torch").nn.Module):
    """Stands in for the memory attention: records what the reference assembled for it."""

    def forward(self, src, prompt, prompt_pos, num_obj_ptr_tokens, **_):
        self.seen = (prompt[:, 0, 0].numpy(), prompt_pos[:, 0, 0].numpy(), num_obj_ptr_tokens)
        self.ptr_pos = prompt_pos[len(prompt) - num_obj_ptr_tokens:, 0, :2].numpy()
        return {"memory": src[0]}


def _random_history(rng, k: int, reverse: bool):
    """(frame, num_frames, conditioning frames, stored frames, scores) around which to select memory.
    Forward: tracked frames before f. Reverse: tracked frames after f, and some before it (tracked
    forward earlier), which the reverse rules must ignore."""
    if reverse:
        num_frames = int(rng.integers(3, k + 1))
        f = int(rng.integers(0, num_frames - 1))
        count = int(rng.integers(1, min(6, num_frames)))
        cond = sorted(set(rng.choice(num_frames, size=count, replace=False).tolist()) - {f}) or [num_frames - 1]
        stored = [t for t in range(num_frames) if t in cond or rng.uniform() < (0.8 if t > f else 0.3)]
    else:
        f = int(rng.integers(1, k))
        num_frames = int(rng.integers(f + 1, k + 6))
        cond = sorted(set(rng.choice(k, size=int(rng.integers(1, 7)), replace=False).tolist()))
        stored = [t for t in range(k) if t in cond or (t < f and rng.uniform() < 0.8)]
    return f, num_frames, cond, stored, {t: float(rng.choice([0.0, 0.005, 0.02, 0.5])) for t in stored}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("memory_selection", [True, False])
def test_select_memory_matches_reference_choice(ref, memory_selection, reverse):
    """Random histories (conditioning frames, gaps, scores around the threshold): select_memory picks
    the same spatial frames with the same temporal slots, and the same pointers at the same signed
    distances, as the reference's _prepare_memory_conditioned_features, tracking forward or in
    reverse (``track_in_reverse``). Frame t's memory and pointer are filled with t + 1, the temporal
    encodings made readable."""
    torch = ref.torch
    cfg = CFG.replace(use_memory_selection=memory_selection, max_obj_ptrs=6, num_maskmem=4, max_cond_frames_in_attn=3)
    trk = _torch_tracker(ref, cfg)
    trk.transformer.encoder = _MemoryRecorder()
    n, d, g, k = cfg.num_maskmem, cfg.mem_dim, cfg.grid, 20
    with torch.no_grad():
        trk.maskmem_tpos_enc.copy_(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 1, d))
        trk.obj_ptr_tpos_proj.weight.zero_()
        # get_1d_sine_pe channels 8 and 40 are sin and cos of pos / (max - 1) / 10: atan2 reads it back.
        trk.obj_ptr_tpos_proj.weight[0, 8] = trk.obj_ptr_tpos_proj.weight[1, 40] = 1.0
        trk.obj_ptr_tpos_proj.bias.zero_()
    select = jax.jit(lambda bank, f, nf: select_memory(bank, f, nf, cfg, reverse=reverse))
    rng = np.random.default_rng(70 + 20 * reverse + memory_selection)
    for _ in range(60):
        f, num_frames, cond, stored, scores = _random_history(rng, k, reverse)
        output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        bank = MemoryBank.empty(cfg, 1, k)
        for slot, t in enumerate(stored):
            out = {"maskmem_features": torch.full((1, d, g, g), t + 1.0), "maskmem_pos_enc": [torch.zeros(1, d, g, g)],
                   "obj_ptr": torch.full((1, cfg.d_model), t + 1.0), "eff_iou_score": scores[t]}
            output_dict["cond_frame_outputs" if t in cond else "non_cond_frame_outputs"][t] = out
            bank = bank.write(slot, t, np.full((1, g, g, d), t + 1.0), np.full((1, cfg.d_model), t + 1.0),
                              t in cond, scores[t])
        with torch.no_grad():
            trk._prepare_memory_conditioned_features(
                frame_idx=f, is_init_cond_frame=False, current_vision_feats=[torch.zeros(g * g, 1, cfg.d_model)],
                current_vision_pos_embeds=[torch.zeros(g * g, 1, cfg.d_model)], feat_sizes=[(g, g)],
                output_dict=output_dict, num_frames=num_frames, track_in_reverse=reverse)
        values, pos, num_ptr_tokens = trk.transformer.encoder.seen
        sin_cos = trk.transformer.encoder.ptr_pos
        per_ptr = cfg.d_model // d
        n_spatial = (len(values) - num_ptr_tokens) // (g * g)
        want_spatial = sorted((values[i * g * g], pos[i * g * g]) for i in range(n_spatial))
        norm = min(num_frames, cfg.max_obj_ptrs) - 1
        ptr_vals = values[n_spatial * g * g::per_ptr]
        dist = np.arctan2(sin_cos[:, 0], sin_cos[:, 1]) * 10 * norm
        want_ptrs = sorted((v, round(float(t))) for v, t in zip(ptr_vals, dist[::per_ptr]))
        mem = jax.tree.map(lambda a: np.asarray(a)[0], select(bank, f, num_frames))
        got_spatial = sorted((mem.feats[i, 0, 0, 0], float(mem.tpos[i])) for i in np.flatnonzero(mem.valid))
        got_ptrs = sorted((mem.ptrs[i, 0], round(float(mem.ptr_tpos[i]) * norm)) for i in np.flatnonzero(mem.ptr_valid))
        case = f"frame {f} of {num_frames} (reverse={reverse}), cond {cond}, stored {stored}, scores {scores}"
        assert got_spatial == want_spatial, f"{case}\n ours {got_spatial}\n reference {want_spatial}"
        assert got_ptrs == want_ptrs, f"{case}\n ours {got_ptrs}\n reference {want_ptrs}"


def test_track_step_rejects_too_many_points():
    cfg, g, c = CFG, CFG.grid, CFG.d_model
    p = cfg.max_points + 1

    def step(m):
        high_res = m.project_high_res(jnp.zeros((1, 4 * g, 4 * g, c)), jnp.zeros((1, 2 * g, 2 * g, c)))
        return m.track_step(jnp.zeros((1, g, g, c)), high_res, None, jnp.ones((1,), bool), jnp.zeros((1, p, 2)),
                            jnp.zeros((1, p), jnp.int32), jnp.ones((1, p), bool))

    with pytest.raises(ValueError, match="more than max_points"):
        jax.eval_shape(lambda: Tracker(cfg).init(jax.random.key(0), method=step))
