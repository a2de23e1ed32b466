"""Dot-product scoring, the segmentation head and the output dict against the reference (tiny sizes)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.model.config import ModelConfig
from sam3_jax.model.decoder import DecoderOutput
from sam3_jax.model.heads import (
    DotProductScoring,
    PixelDecoder,
    UniversalSegmentationHead,
    detector_outputs,
)
from sam3_jax.testing.parity import flax_params, max_abs_diff, randomize_, t2n

pytestmark = pytest.mark.parity
TOL = 1e-5
CFG = ModelConfig.tiny()
C, B, LP, L, Q = CFG.d_model, 2, 7, CFG.decoder.num_layers, CFG.decoder.num_queries
FPN = (32, 16, 8)  # the tiny model's neck levels (4x, 2x, 1x of the 8x8 token grid)


def close(got, want, tol=TOL) -> bool:
    """Max abs diff within ``tol`` for O(1) outputs, scaled by the output's magnitude when larger:
    mask logits reach ~20 after GroupNorm and a 64-channel dot product, where float32 rounding
    alone is ~1e-5 (torch itself is 6e-6 from a float64 evaluation)."""
    want = np.asarray(want)
    return max_abs_diff(got, want) <= tol * max(1.0, float(np.abs(want).max()))


def _prompt(rng):
    prompt = rng.normal(size=(B, LP, C)).astype(np.float32)
    mask = np.zeros((B, LP), bool)
    mask[1, 3:] = True
    return prompt, mask


def _seq_first(torch, x):
    return torch.tensor(x).transpose(0, 1).contiguous()


def _torch_scoring():
    """``model_builder._create_dot_product_scoring`` at the tiny width."""
    import torch.nn as tnn
    from sam3.model.model_misc import MLP
    from sam3.model.model_misc import DotProductScoring as TScoring

    mlp = MLP(C, CFG.decoder.scoring_mlp_dim, C, 2, dropout=0.1, residual=True, out_norm=tnn.LayerNorm(C))
    return TScoring(d_model=C, d_proj=C, prompt_mlp=mlp)


def _torch_seg_head():
    """``model_builder._create_segmentation_head`` at the tiny width."""
    from sam3.model.maskformer_segmentation import PixelDecoder as TPixelDecoder
    from sam3.model.maskformer_segmentation import UniversalSegmentationHead as THead
    from sam3.model.model_misc import MultiheadAttentionWrapper

    pixel_decoder = TPixelDecoder(num_upsampling_stages=CFG.seg.upsampling_stages, interpolation_mode="nearest",
                                  hidden_dim=C)
    cross = MultiheadAttentionWrapper(num_heads=CFG.seg.num_heads, dropout=0, embed_dim=C)
    return THead(hidden_dim=C, upsampling_stages=CFG.seg.upsampling_stages, aux_masks=False, presence_head=False,
                 dot_product_scorer=None, act_ckpt=True, cross_attend_prompt=cross, pixel_decoder=pixel_decoder)


def _scoring(ref, seed):
    t_score = _torch_scoring().eval()
    randomize_(t_score, seed=seed)
    score = DotProductScoring(C, C, CFG.decoder.scoring_mlp_dim)
    prompt, mask = _prompt(np.random.default_rng(seed))
    hs = np.zeros((L, B, Q, C), np.float32)
    return t_score, score, flax_params(t_score, score, hs, prompt, mask)


def test_dot_product_scoring(ref):
    torch = ref.torch
    t_score, score, params = _scoring(ref, seed=20)
    rng = np.random.default_rng(20)
    prompt, mask = _prompt(rng)
    hs = (rng.normal(size=(L, B, Q, C)) * rng.uniform(0.2, 40.0, size=(L, B, Q, 1))).astype(np.float32)
    with torch.no_grad():
        want = t2n(t_score(torch.tensor(hs), _seq_first(torch, prompt), torch.tensor(mask)))
    got = jax.jit(lambda p: score.apply({"params": p}, hs, prompt, mask))(params)
    assert max_abs_diff(got, want) < TOL
    assert np.any(np.abs(want) == 12.0)  # the clamp is exercised

    # Dropout in the prompt MLP under jit.
    noisy = jax.jit(lambda p, k: score.apply({"params": p}, hs, prompt, mask, deterministic=False,
                                             rngs={"dropout": k}))(params, jax.random.key(0, impl="rbg"))
    assert noisy.shape == got.shape and max_abs_diff(noisy, got) > 1e-3


def test_group_norm_matches_torch(ref):
    torch = ref.torch
    t_gn = torch.nn.GroupNorm(8, C)
    randomize_(t_gn, seed=21)
    x = (np.random.default_rng(21).normal(size=(B, 5, 6, C)) * 3 + 1).astype(np.float32)
    with torch.no_grad():
        want = t2n(t_gn(torch.tensor(x).permute(0, 3, 1, 2))).transpose(0, 2, 3, 1)
    import flax.linen as nn

    gn = nn.GroupNorm(num_groups=8, epsilon=1e-5, use_fast_variance=False)
    params = {"scale": t2n(t_gn.weight), "bias": t2n(t_gn.bias)}
    assert max_abs_diff(gn.apply({"params": params}, x), want) < TOL


def _seg_inputs(rng):
    fpn = [rng.normal(size=(B, s, s, C)).astype(np.float32) for s in FPN]
    memory = rng.normal(size=(B, FPN[-1] ** 2, C)).astype(np.float32)
    return fpn, memory


def _torch_fpn(torch, fpn):
    return [torch.tensor(f).permute(0, 3, 1, 2).contiguous() for f in fpn]


def test_segmentation_head(ref):
    torch = ref.torch
    t_seg = _torch_seg_head().eval()
    randomize_(t_seg, seed=22)
    rng = np.random.default_rng(22)
    fpn, memory = _seg_inputs(rng)
    prompt, mask = _prompt(rng)
    hs = rng.normal(size=(L, B, Q, C)).astype(np.float32)
    with torch.no_grad():
        out = t_seg(backbone_feats=_torch_fpn(torch, fpn), obj_queries=torch.tensor(hs), image_ids=torch.arange(B),
                    encoder_hidden_states=_seq_first(torch, memory), prompt=_seq_first(torch, prompt),
                    prompt_mask=torch.tensor(mask))
    seg = UniversalSegmentationHead(C, CFG.seg.num_heads)
    params = flax_params(t_seg, seg, fpn, memory, hs[-1], prompt, mask)
    assert set(params["pixel_decoder"]) == {"conv_layers_0", "conv_layers_1", "norms_0", "norms_1"}
    masks, semantic = jax.jit(lambda p: seg.apply({"params": p}, fpn, memory, hs[-1], prompt, mask))(params)
    assert masks.shape == (B, Q, FPN[0], FPN[0]) and semantic.shape == (B, FPN[0], FPN[0], 1)
    assert close(masks, t2n(out["pred_masks"]))
    assert close(semantic, t2n(out["semantic_seg"]).transpose(0, 2, 3, 1))


def test_pixel_decoder_nearest_upsampling_odd_sizes(ref):
    """Nearest resizing follows F.interpolate for non-2x ratios too (e.g. a 9x9 grid under 18x18, 36x36)."""
    torch = ref.torch
    from sam3.model.maskformer_segmentation import PixelDecoder as TPixelDecoder

    t_pd = TPixelDecoder(C, 3, interpolation_mode="nearest").eval()
    randomize_(t_pd, seed=23)
    rng = np.random.default_rng(23)
    fpn = [rng.normal(size=(1, s, s + 1, C)).astype(np.float32) for s in (23, 12, 5)]
    with torch.no_grad():
        want = t2n(t_pd(_torch_fpn(torch, fpn))).transpose(0, 2, 3, 1)
    pd = PixelDecoder(C)
    # The unused third stage is recognised by its full name; convert under it.
    from sam3_jax.convert import keymap
    from sam3_jax.testing.parity import state_dict_numpy

    abstract = jax.eval_shape(lambda: pd.init(jax.random.key(0), fpn))["params"]
    sd = {f"pixel_decoder.{k}": v for k, v in state_dict_numpy(t_pd).items()}
    params = keymap.convert(sd, {"pixel_decoder": abstract}).params["pixel_decoder"]
    assert close(jax.jit(lambda p: pd.apply({"params": p}, fpn))(params), want)


@pytest.mark.parametrize("train,joint", [(True, False), (False, True)], ids=["image-train-dac", "video-eval"])
def test_detector_outputs(ref, train, joint):
    """``detector_outputs`` equals ``Sam3Image._update_scores_and_boxes`` + ``_run_segmentation_heads``."""
    torch = ref.torch
    from sam3.model.model_misc import MLP, inverse_sigmoid
    from sam3.model.sam3_image import Sam3Image

    t_score, score, score_params = _scoring(ref, seed=24)
    t_seg = _torch_seg_head().eval()
    randomize_(t_seg, seed=25)
    bbox_embed = MLP(C, C, 4, 3)
    randomize_(bbox_embed, seed=26)

    rng = np.random.default_rng(24)
    qq = 2 * Q if train else Q
    hs = rng.normal(size=(L, B, qq, C)).astype(np.float32)
    refs = rng.uniform(0.05, 0.95, size=(L, B, qq, 4)).astype(np.float32)
    presence = (rng.normal(size=(L, B, 1)) * 3).astype(np.float32)
    prompt, mask = _prompt(rng)
    fpn, memory = _seg_inputs(rng)

    fake = types.SimpleNamespace(
        training=train, use_dot_prod_scoring=True, dot_prod_scoring=t_score, instance_dot_prod_scoring=None,
        supervise_joint_box_scores=joint, detach_presence_in_joint_score=False, segmentation_head=t_seg,
        o2m_mask_predict=True, use_act_checkpoint_seg_head=True,
        transformer=types.SimpleNamespace(decoder=types.SimpleNamespace(dac=True, bbox_embed=bbox_embed,
                                                                        instance_bbox_embed=None)))
    out = {}
    with torch.no_grad():
        Sam3Image._update_scores_and_boxes(fake, out, torch.tensor(hs), torch.tensor(refs),
                                           _seq_first(torch, prompt), torch.tensor(mask),
                                           dec_presence_out=torch.tensor(presence))
        Sam3Image._run_segmentation_heads(fake, out, {"backbone_fpn": _torch_fpn(torch, fpn)}, torch.arange(B), None,
                                          _seq_first(torch, memory), _seq_first(torch, prompt), torch.tensor(mask),
                                          torch.tensor(hs))
        pred_boxes = t2n((inverse_sigmoid(torch.tensor(refs)) + bbox_embed(torch.tensor(hs))).sigmoid())

    dec = DecoderOutput(hs=jnp.asarray(hs), ref_boxes=jnp.asarray(refs), pred_boxes=jnp.asarray(pred_boxes),
                        presence_logits=jnp.asarray(presence), presence_feats=None)
    seg = UniversalSegmentationHead(C, CFG.seg.num_heads)
    seg_params = flax_params(t_seg, seg, fpn, memory, hs[-1], prompt, mask)

    @jax.jit
    def run(score_params, seg_params):
        logits = score.apply({"params": score_params}, dec.hs, prompt, mask)
        masks, semantic = seg.apply({"params": seg_params}, fpn, memory, dec.hs[-1], prompt, mask)
        return detector_outputs(dec, logits, Q, train=train, joint_box_scores=joint, pred_masks=masks,
                                semantic_seg=semantic)

    got = run(score_params, seg_params)
    want = {k: v for k, v in out.items() if v is not None}
    want["semantic_seg"] = want["semantic_seg"].permute(0, 2, 3, 1)
    assert set(got) == set(want)
    assert ("pred_logits_o2m" in got) == train and ("aux_outputs" in got) == train
    for key, value in want.items():
        if key == "aux_outputs":
            assert len(got[key]) == L - 1
            for g, w in zip(got[key], value):
                assert set(g) == set(w)
                assert all(close(g[k], t2n(w[k])) for k in w), key
        else:
            assert close(got[key], t2n(value)), key
