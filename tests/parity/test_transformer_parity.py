"""Fusion encoder and DETR decoder against the reference (tiny sizes, 8x8 memory grid)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.model.config import ModelConfig
from sam3_jax.model.decoder import TransformerDecoder
from sam3_jax.model.encoder import TransformerEncoderFusion
from sam3_jax.testing.parity import flax_params, max_abs_diff, randomize_, t2n

pytestmark = pytest.mark.parity
TOL = 1e-5
CFG = ModelConfig.tiny()
B, H, W, LP = 2, 8, 8, 7


def _inputs(seed):
    rng = np.random.default_rng(seed)
    c = CFG.d_model
    src = rng.normal(size=(B, H * W, c)).astype(np.float32)
    pos = rng.normal(size=(B, H * W, c)).astype(np.float32)
    prompt = rng.normal(size=(B, LP, c)).astype(np.float32)
    mask = np.zeros((B, LP), bool)
    mask[1, 4:] = True  # the second prompt is shorter
    return src, pos, prompt, mask


def _seq_first(ref, x):
    return ref.torch.tensor(x).transpose(0, 1).contiguous()


def _torch_encoder(ref, dropout):
    """``model_builder._create_transformer_encoder`` at the tiny sizes."""
    from sam3.model.encoder import TransformerEncoderFusion as TEncoder
    from sam3.model.encoder import TransformerEncoderLayer
    from sam3.model.model_misc import MultiheadAttentionWrapper

    e, c = CFG.encoder, CFG.d_model

    def mha():
        return MultiheadAttentionWrapper(num_heads=e.num_heads, dropout=dropout, embed_dim=c, batch_first=True)

    layer = TransformerEncoderLayer(activation="relu", d_model=c, dim_feedforward=e.dim_feedforward, dropout=dropout,
                                    pos_enc_at_attn=True, pos_enc_at_cross_attn_keys=False,
                                    pos_enc_at_cross_attn_queries=False, pre_norm=True,
                                    self_attention=mha(), cross_attention=mha())
    return TEncoder(layer=layer, num_layers=e.num_layers, d_model=c, num_feature_levels=1, frozen=False,
                    use_act_checkpoint=True, add_pooled_text_to_img_feat=False, pool_text_with_mask=True)


def _torch_decoder(ref, dropout):
    """``model_builder._create_transformer_decoder`` at the tiny sizes (112 px / stride 14 = 8x8)."""
    from sam3.model.decoder import TransformerDecoder as TDecoder
    from sam3.model.decoder import TransformerDecoderLayer
    from sam3.model.model_misc import MultiheadAttentionWrapper

    d, c = CFG.decoder, CFG.d_model
    layer = TransformerDecoderLayer(activation="relu", d_model=c, dim_feedforward=d.dim_feedforward, dropout=dropout,
                                    cross_attention=MultiheadAttentionWrapper(num_heads=d.num_heads, dropout=dropout,
                                                                              embed_dim=c),
                                    n_heads=d.num_heads, use_text_cross_attention=True)
    return TDecoder(layer=layer, num_layers=d.num_layers, num_queries=d.num_queries, return_intermediate=True,
                    box_refine=True, num_o2m_queries=0, dac=d.dac, boxRPB=d.box_rpb, d_model=c, frozen=False,
                    interaction_layer=None, dac_use_selfatt_ln=True, resolution=H * 14, stride=14,
                    use_act_checkpoint=True, presence_token=d.presence_token)


def _official_modules():
    """Our modules at the official sizes, with example inputs for ``init`` (72x72 grid, 200 queries)."""
    from sam3_jax.model.heads import DotProductScoring, UniversalSegmentationHead

    cfg = ModelConfig.official()
    c, g = cfg.d_model, cfg.vit.grid
    mem, prompt, mask = jnp.zeros((1, g * g, c)), jnp.zeros((1, 33, c)), jnp.zeros((1, 33), bool)
    hs = jnp.zeros((1, cfg.decoder.num_queries, c))
    fpn = [jnp.zeros((1, g * s, g * s, c)) for s in (4, 2, 1)]
    return {
        "transformer.encoder.": (TransformerEncoderFusion(cfg.encoder, c), (mem, mem, prompt, mask)),
        "transformer.decoder.": (TransformerDecoder(cfg.decoder, c), (mem, mem, (g, g), prompt, mask)),
        "dot_prod_scoring.": (DotProductScoring(c, c, cfg.decoder.scoring_mlp_dim), (hs, prompt, mask)),
        "segmentation_head.": (UniversalSegmentationHead(c, cfg.seg.num_heads), (fpn, mem, hs, prompt, mask)),
    }


@pytest.mark.parametrize("prefix", ["transformer.encoder.", "transformer.decoder.", "dot_prod_scoring.",
                                    "segmentation_head."])
def test_official_state_dict_maps(prefix):
    """Every official key under ``prefix`` maps onto our module at the official size with its shape
    (or is a named dead weight), and every parameter we create has a key: no level_embed,
    text_pooling_proj or third pixel-decoder stage."""
    import pathlib

    from sam3_jax.convert import keymap

    tsv = pathlib.Path("/work/shared/reference/sam3_image_state_dict.tsv")
    if not tsv.exists():
        pytest.skip("state-dict listing not available")
    sd = {}
    for line in tsv.read_text().splitlines():
        if line.startswith(prefix):
            key, shape = line.split("\t")[:2]
            sd[key[len(prefix):]] = np.broadcast_to(np.float32(0), tuple(int(d) for d in shape.strip("(,)").split(",") if d))
    module, args = _official_modules()[prefix]
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
    conversion = keymap.convert(sd, abstract, source=prefix)  # raises listing every problem
    dead = sorted(conversion.dead)
    assert dead == (["pixel_decoder.conv_layers.2.bias", "pixel_decoder.conv_layers.2.weight",
                     "pixel_decoder.norms.2.bias", "pixel_decoder.norms.2.weight"]
                    if prefix == "segmentation_head." else [])


def test_fusion_encoder(ref):
    torch = ref.torch
    t_enc = _torch_encoder(ref, dropout=0.1).eval()
    randomize_(t_enc, seed=10)
    src, pos, prompt, mask = _inputs(0)
    with torch.no_grad():
        out = t_enc(src=[_seq_first(ref, src)], src_key_padding_mask=None, src_pos=[_seq_first(ref, pos)],
                    prompt=_seq_first(ref, prompt), prompt_pos=torch.zeros(LP, B, CFG.d_model),
                    prompt_key_padding_mask=torch.tensor(mask), feat_sizes=[(H, W)])
    want = t2n(out["memory"]).transpose(1, 0, 2)

    enc = TransformerEncoderFusion(CFG.encoder, CFG.d_model)
    params = flax_params(t_enc, enc, src, pos, prompt, mask)
    got = jax.jit(lambda p: enc.apply({"params": p}, src, pos, prompt, mask))(params)
    assert max_abs_diff(got, want) < TOL
    # Without remat: the same output and the same gradients.
    assert CFG.encoder.remat
    plain = TransformerEncoderFusion(dataclasses.replace(CFG.encoder, remat=False), CFG.d_model)
    assert max_abs_diff(jax.jit(lambda p: plain.apply({"params": p}, src, pos, prompt, mask))(params), want) < TOL
    grads = [jax.jit(jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, src, pos, prompt, mask) ** 2)))(params)
             for m in (enc, plain)]
    diffs = jax.tree.map(lambda a, b: max_abs_diff(a, b) / float(jnp.abs(a).max()), grads[0], grads[1])
    assert max(jax.tree.leaves(diffs)) < 1e-5  # relative to each leaf's largest gradient

    # Dropout path runs (and changes the output) under jit.
    noisy = jax.jit(lambda p, k: enc.apply({"params": p}, src, pos, prompt, mask, deterministic=False,
                                           rngs={"dropout": k}))(params, jax.random.key(1, impl="rbg"))
    assert noisy.shape == got.shape and bool(jnp.all(jnp.isfinite(noisy))) and max_abs_diff(noisy, got) > 1e-3


def test_encoder_layer_geometry_flags(ref):
    """The same layer as the geometry encoder builds it: seq-first MHAs, ``pos`` on the cross-attention
    keys, a self-attention padding mask."""
    from sam3.model.encoder import TransformerEncoderLayer as TLayer
    from sam3.model.model_misc import MultiheadAttentionWrapper

    from sam3_jax.model.encoder import TransformerEncoderLayer

    torch = ref.torch
    e, c = CFG.encoder, CFG.d_model

    def mha():
        return MultiheadAttentionWrapper(num_heads=e.num_heads, dropout=0.1, embed_dim=c, batch_first=False)

    t_layer = TLayer(activation="relu", d_model=c, dim_feedforward=e.dim_feedforward, dropout=0.1,
                     pos_enc_at_attn=False, pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
                     pre_norm=True, self_attention=mha(), cross_attention=mha()).eval()
    randomize_(t_layer, seed=14)
    img, img_pos, tokens, tok_mask = _inputs(4)
    with torch.no_grad():
        want = t2n(t_layer(tgt=_seq_first(ref, tokens), memory=_seq_first(ref, img),
                           tgt_key_padding_mask=torch.tensor(tok_mask), pos=_seq_first(ref, img_pos))).transpose(1, 0, 2)
    layer = TransformerEncoderLayer(c, e.num_heads, e.dim_feedforward, 0.1)
    params = flax_params(t_layer, layer, tokens, img, tok_mask, None, img_pos)
    got = jax.jit(lambda p: layer.apply({"params": p}, tokens, img, tok_mask, None, img_pos))(params)
    assert max_abs_diff(got, want) < TOL


def _run_torch_decoder(ref, t_dec, memory, pos, prompt, mask, apply_dac):
    """The reference decoder as ``Sam3Image._run_decoder`` calls it, plus the boxes of
    ``_update_scores_and_boxes``; batch-first outputs (torch tensors, grad if enabled)."""
    from sam3.model.model_misc import inverse_sigmoid

    torch = ref.torch
    bs = memory.shape[0]
    tgt = t_dec.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
    hs, refs, presence, feats = t_dec(
        tgt=tgt, memory=_seq_first(ref, memory), memory_key_padding_mask=None, pos=_seq_first(ref, pos),
        reference_boxes=None, level_start_index=torch.tensor([0]), spatial_shapes=torch.tensor([[H, W]]),
        valid_ratios=torch.ones(bs, 1, 2), tgt_mask=None, memory_text=_seq_first(ref, prompt),
        text_attention_mask=torch.tensor(mask), apply_dac=apply_dac)
    hs, refs = hs.transpose(1, 2), refs.transpose(1, 2)
    boxes = (inverse_sigmoid(refs) + t_dec.bbox_embed(hs)).sigmoid()
    return {"hs": hs, "ref_boxes": refs, "pred_boxes": boxes, "presence_logits": presence.transpose(1, 2),
            "presence_feats": feats.transpose(0, 1)}


def _check_outputs(got, want, num_queries):
    L = CFG.decoder.num_layers
    assert got.hs.shape == (L, B, num_queries, CFG.d_model) and got.presence_logits.shape == (L, B, 1)
    errors = {name: max_abs_diff(getattr(got, name), t2n(value)) for name, value in want.items()}
    assert all(e < TOL for e in errors.values()), errors


def test_decoder_eval(ref):
    torch = ref.torch
    t_dec = _torch_decoder(ref, dropout=0.1).eval()
    randomize_(t_dec, seed=11)
    src, pos, prompt, mask = _inputs(1)
    with torch.no_grad():
        want = _run_torch_decoder(ref, t_dec, src, pos, prompt, mask, apply_dac=False)
    dec = TransformerDecoder(CFG.decoder, CFG.d_model)
    params = flax_params(t_dec, dec, src, pos, (H, W), prompt, mask)
    got = jax.jit(lambda p: dec.apply({"params": p}, src, pos, (H, W), prompt, mask))(params)
    _check_outputs(got, want, CFG.decoder.num_queries)


def test_decoder_train_dac_with_gradients(ref):
    """Training mode with DAC (torch dropout 0 so both runs are deterministic): outputs, and the
    gradients of a loss on every layer's boxes and queries. The gradients pin down the box
    refinement: the next layer's refs are detached, each layer's prediction keeps its input refs'
    gradient (look forward twice)."""
    torch = ref.torch
    t_dec = _torch_decoder(ref, dropout=0.0).train()
    randomize_(t_dec, seed=12)
    src, pos, prompt, mask = _inputs(2)
    q = 2 * CFG.decoder.num_queries
    rng = np.random.default_rng(2)
    w_box = rng.normal(size=(CFG.decoder.num_layers, B, q, 4)).astype(np.float32)
    w_hs = rng.normal(size=(CFG.decoder.num_layers, B, q, CFG.d_model)).astype(np.float32)

    want = _run_torch_decoder(ref, t_dec, src, pos, prompt, mask, apply_dac=True)
    t_loss = (want["pred_boxes"] * torch.tensor(w_box)).sum() + 1e-2 * (want["hs"] * torch.tensor(w_hs)).sum()
    t_loss.backward()
    # Parameters the loss does not reach (the presence head) have no torch grad: zero.
    t_grads = {k: (np.zeros(v.shape, np.float32) if v.grad is None else v.grad.numpy())
               for k, v in t_dec.named_parameters()}

    dec = TransformerDecoder(CFG.decoder, CFG.d_model)
    params = flax_params(t_dec, dec, src, pos, (H, W), prompt, mask)

    def loss(p):
        out = dec.apply({"params": p}, src, pos, (H, W), prompt, mask, train=True)
        return (out.pred_boxes * w_box).sum() + 1e-2 * (out.hs * w_hs).sum(), out

    (_, got), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    _check_outputs(got, want, q)

    from sam3_jax.convert import keymap

    want_grads = keymap.convert(t_grads, grads).params
    # Relative to the largest gradient of each tensor; the boxRPB output biases shift every logit of
    # a row alike, so softmax makes their true gradient zero and only rounding noise is left.
    errors = {jax.tree_util.keystr(path): (max_abs_diff(g, w), float(np.abs(w).max()))
              for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads))}
    bad = {k: v for k, v in errors.items() if v[0] > 1e-5 + 1e-4 * v[1]}
    assert not bad, bad


def test_decoder_dropout_runs():
    """deterministic=False under jit (two layers: the scan carries the dropout stream from step to
    step)."""
    dec = TransformerDecoder(dataclasses.replace(CFG.decoder, num_layers=2), CFG.d_model)
    src, pos, prompt, mask = _inputs(3)
    abstract = jax.eval_shape(lambda: dec.init(jax.random.key(0), src, pos, (H, W), prompt, mask))["params"]
    rng = np.random.default_rng(0)  # random weights without compiling `init`
    params = jax.tree.map(lambda x: 0.1 * rng.normal(size=x.shape).astype(np.float32), abstract)
    run = jax.jit(lambda p, k: dec.apply({"params": p}, src, pos, (H, W), prompt, mask, train=True,
                                         deterministic=False, rngs={"dropout": k}))
    # "rbg" keys compile several times faster than threefry on CPU; the dropout code is the same.
    a, b = run(params, jax.random.key(1, impl="rbg")), run(params, jax.random.key(2, impl="rbg"))
    assert a.hs.shape[2] == 2 * CFG.decoder.num_queries
    assert bool(jnp.all(jnp.isfinite(a.hs))) and max_abs_diff(a.hs, b.hs) > 1e-3
