"""The ViT trunk and the dual SimpleFPN neck against the reference's ``vitdet.ViT`` and
``necks.Sam3DualViTDetNeck``, built with the builder's arguments at small sizes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.model.config import ModelConfig, ViTConfig
from sam3_jax.model.neck import Sam3DualViTDetNeck
from sam3_jax.model.vit import ViT, rope_angles
from sam3_jax.testing.parity import flax_params, max_abs_diff, randomize_, t2n

pytestmark = pytest.mark.parity
TOL = 1e-5

TINY = ModelConfig.tiny()
# 10x10 tokens with windows of 4: windowed blocks pad to 12x12; the 4x4 pos-embed tiles 3 times, cropped.
PADDED_VIT = dataclasses.replace(TINY.vit, img_size=140)


def torch_vit(cfg: ViTConfig):
    """``model_builder._create_vit_backbone`` with the sizes of ``cfg``."""
    from sam3.model.vitdet import ViT as TorchViT

    return TorchViT(
        img_size=cfg.img_size, pretrain_img_size=cfg.pretrain_img_size, patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        norm_layer="LayerNorm", drop_path_rate=cfg.drop_path_rate, qkv_bias=True, use_abs_pos=True,
        tile_abs_pos=True, global_att_blocks=cfg.global_att_blocks, rel_pos_blocks=(), use_rope=True,
        use_interp_rope=True, window_size=cfg.window_size, pretrain_use_cls_token=True,
        retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False,
        bias_patch_embed=False,
    )


def torch_neck(cfg: ModelConfig):
    """``model_builder._create_vision_backbone`` (with the sam2 neck) at the sizes of ``cfg``."""
    from sam3.model.necks import Sam3DualViTDetNeck as TorchNeck
    from sam3.model.position_encoding import PositionEmbeddingSine

    pos = PositionEmbeddingSine(num_pos_feats=cfg.neck.d_model, normalize=True, scale=None, temperature=10000)
    return TorchNeck(trunk=torch_vit(cfg.vit), position_encoding=pos, d_model=cfg.neck.d_model,
                     scale_factors=[4.0, 2.0, 1.0, 0.5], add_sam2_neck=True)


def images(cfg: ViTConfig, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Normalised images (B, H, W, 3) in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, cfg.img_size, cfg.img_size, 3)).astype(np.float32)


def nchw(x: np.ndarray):
    return x.transpose(0, 3, 1, 2)


def test_neck_and_trunk(ref):
    torch = ref.torch
    t_neck = torch_neck(TINY).eval()
    randomize_(t_neck, seed=0)
    x = images(TINY.vit)
    with torch.no_grad():
        xt = torch.tensor(nchw(x))
        want_trunk = t2n(t_neck.trunk(xt)[-1]).transpose(0, 2, 3, 1)
        want = dict(zip(("backbone_fpn", "vision_pos_enc", "sam2_backbone_fpn", "sam2_pos_enc"), t_neck(xt)))

    neck = Sam3DualViTDetNeck(TINY.neck, TINY.vit)
    params = flax_params(t_neck, neck, x)
    got_trunk = jax.jit(lambda p, x: ViT(TINY.vit).apply({"params": p}, x))(params["trunk"], x)
    assert max_abs_diff(got_trunk, want_trunk) <= TOL
    got = jax.jit(lambda p, x: neck.apply({"params": p}, x))(params, x)
    for key, levels in want.items():
        assert len(got[key]) == 3  # the reference's fourth (x0.5) level is dropped by scalp=1
        for level, (g, w) in enumerate(zip(got[key], levels)):
            err = max_abs_diff(g, t2n(w).transpose(0, 2, 3, 1))
            assert err <= TOL, (key, level, err)
    assert [f.shape[1] for f in got["backbone_fpn"]] == [32, 16, 8]


def test_trunk_with_padded_windows(ref):
    """The trunk on a grid whose windows need padding."""
    torch = ref.torch
    t_vit = torch_vit(PADDED_VIT).eval()
    randomize_(t_vit, seed=1)
    x = images(PADDED_VIT, seed=1)
    with torch.no_grad():
        want = t2n(t_vit(torch.tensor(nchw(x)))[-1]).transpose(0, 2, 3, 1)
    vit = ViT(PADDED_VIT)
    params = flax_params(t_vit, vit, x)
    got = jax.jit(lambda p, x: vit.apply({"params": p}, x))(params, x)
    assert max_abs_diff(got, want) <= TOL


@pytest.mark.parametrize("cfg", [TINY.vit, PADDED_VIT, ViTConfig()], ids=["tiny", "padded", "official"])
def test_rope_tables_equal_reference_buffers(ref, cfg):
    """Our config-computed RoPE tables equal the ``attn.freqs_cis`` buffers (which the converter
    skips as RECOMPUTED) of a windowed and a global block built as the reference ViT builds them."""
    from sam3.model.vitdet import Block

    grid = cfg.grid
    for window in (cfg.window_size, 0):
        t_block = Block(dim=cfg.embed_dim, num_heads=cfg.num_heads, window_size=window, input_size=(grid, grid),
                        use_rope=True, rope_pt_size=(cfg.window_size, cfg.window_size), rope_interp=True)
        want = t_block.attn.freqs_cis.numpy()
        angles = rope_angles(cfg, window, (grid, grid))
        assert angles.shape == want.shape
        assert np.max(np.abs(np.cos(angles) - want.real)) < 1e-5
        assert np.max(np.abs(np.sin(angles) - want.imag)) < 1e-5


def test_drop_path_training_and_remat(ref):
    """Stochastic depth draws from the "dropout" stream in training, with the blocks
    rematerialised or not; rematerialising leaves the gradient as it is."""
    cfg = dataclasses.replace(TINY.vit, depth=4, global_att_blocks=(1, 3), drop_path_rate=0.5)  # 2 groups of 2
    assert cfg.remat  # the default
    x = jnp.asarray(images(cfg))
    remat, plain = ViT(cfg), ViT(dataclasses.replace(cfg, remat=False))
    t_vit = torch_vit(cfg)
    randomize_(t_vit, seed=2)
    params = flax_params(t_vit, remat, x)  # cheaper than compiling Flax's initialisers
    eval_out = jax.jit(lambda p: remat.apply({"params": p}, x))(params)
    grads = []
    for vit in (remat, plain):
        train = jax.jit(lambda p, rng, vit=vit: vit.apply({"params": p}, x, deterministic=False, rngs={"dropout": rng}))
        a, b = train(params, jax.random.key(1)), train(params, jax.random.key(2))
        assert np.all(np.isfinite(a))
        assert max_abs_diff(a, eval_out) > 1e-3 and max_abs_diff(a, b) > 1e-3
        assert max_abs_diff(train(params, jax.random.key(1)), a) == 0.0
        grads.append(jax.jit(jax.grad(lambda p, vit=vit: jnp.mean(vit.apply({"params": p}, x) ** 2)))(params))
    diffs = jax.tree.map(max_abs_diff, grads[0], grads[1])
    assert max(jax.tree.leaves(diffs)) < 1e-6
