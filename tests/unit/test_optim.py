"""The optimiser: parameter groups, weight-decay exemptions, layer decay (unrolled and stacked trunk),
schedules, freezing, accumulation and clipping; the reference's own optimiser code and torch's AdamW
as oracles where they run on CPU.

Updates are run on a small synthetic tree with the detector's path layout (XLA compiles an update
over the full tiny detector tree in tens of seconds on 2 cores); group rules are checked on the full
tiny detector tree, which needs no compilation.
"""
import fnmatch
import importlib
import sys
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from sam3_jax.convert import keymap
from sam3_jax.model import stacking
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.detector import abstract_params
from sam3_jax.train import optim, param_groups

TINY = ModelConfig.tiny()
DEPTH = TINY.vit.depth

# The detector's path layout with few distinct shapes (eager ops compile once per shape); the ViT's
# blocks stacked over GROUPS groups of GROUP, as the model holds them.
GROUP = stacking.vit_group_size(TINY.vit)
GROUPS = DEPTH // GROUP
MINI_SHAPES = {
    "backbone/vision_backbone/trunk/patch_embed/proj/kernel": (1, 4, 4),
    "backbone/vision_backbone/trunk/pos_embed": (1, 4, 4),
    "backbone/vision_backbone/trunk/ln_pre/scale": (4,),
    "backbone/vision_backbone/trunk/ln_pre/bias": (4,),
    **{f"backbone/vision_backbone/trunk/block_groups/blocks_{j}/{leaf}": (GROUPS, *shape) for j in range(GROUP)
       for leaf, shape in (("attn/qkv/kernel", (4, 4)), ("attn/qkv/bias", (4,)), ("norm1/scale", (4,)))},
    "backbone/vision_backbone/convs_0/conv_1x1/kernel": (1, 4, 4),
    "backbone/vision_backbone/convs_0/conv_1x1/bias": (4,),
    "backbone/language_backbone/encoder/token_embedding/embedding": (4, 4),
    "backbone/language_backbone/encoder/ln_final/scale": (4,),
    "backbone/language_backbone/resizer/kernel": (4, 4),
    "transformer/decoder/query_embed/embedding": (4, 4),
    "transformer/decoder/layers_scan/layers_0/linear1/kernel": (2, 4, 4),
    "transformer/decoder/layers_scan/layers_0/linear1/bias": (2, 4),
    "segmentation_head/pixel_decoder/norms_0/scale": (4,),
    "segmentation_head/pixel_decoder/norms_0/bias": (4,),
    "tracker/sam_prompt_encoder/pe_layer/positional_encoding_gaussian_matrix": (4, 4),
}


def mini_tree(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    flat = {tuple(k.split("/")): jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in MINI_SHAPES.items()}
    return traverse_util.unflatten_dict(flat)


def config(**overrides):
    cfg = optim.default_config()
    cfg.update(overrides)
    return cfg


def constant_lr(**overrides):
    """Schedules at their base value on every step (cosine with no warmup and no decay)."""
    return config(schedule="cosine", warmup_steps=0, final_lr_fraction=1.0, **overrides)


def run(cfg, params, grads_seq, total_steps=100, jit=False):
    """Updates applied in sequence; eager unless ``jit`` (compiling costs more than running here)."""
    tx = optim.make_optimizer(cfg, params, total_steps)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def torch_layout_scales(tree, cfg) -> dict:
    """Each leaf's layer factor in the torch layout, one leaf per layer: the factors (a scalar, or a
    vector over a stack's groups) broadcast to their leaf's shape, then unstacked."""
    full = jax.tree.map(lambda s, x: np.broadcast_to(np.asarray(s, np.float64), x.shape),
                        param_groups.layer_scales(tree, cfg), tree)
    return {p: float(np.asarray(f).ravel()[0]) for p, f in param_groups.by_path(stacking.unrolled(full)).items()}


@pytest.fixture(scope="module")
def tiny_tree():
    return abstract_params(TINY)


# ---------------------------------------------------------------------------------------------- groups
def test_groups_cover_the_tiny_detector(tiny_tree):
    cfg = optim.default_config()
    labels = param_groups.by_path(param_groups.param_labels(tiny_tree, cfg))
    assert set(labels.values()) == {"vision", "text", "rest"}
    for path, label in labels.items():
        want = ("vision" if path.startswith("backbone/vision_backbone/") else
                "text" if path.startswith("backbone/language_backbone/") else "rest")
        assert label == want, path
    counts = optim.group_counts(tiny_tree, cfg)
    assert sum(c["tensors"] for c in counts.values()) == len(labels)
    assert sum(c["params"] for c in counts.values()) == sum(x.size for x in jax.tree.leaves(tiny_tree))

    frozen = param_groups.by_path(param_groups.param_labels(tiny_tree, config(freeze="^backbone/")))
    assert all((frozen[p] == "frozen") == p.startswith("backbone/") for p in labels)
    assert all(frozen[p] == labels[p] for p in labels if not p.startswith("backbone/"))


def test_weight_decay_exemptions_follow_the_reference(tiny_tree):
    decayed = {p for p in param_groups.by_path(tiny_tree) if param_groups.decays(p)}
    for path in ("backbone/vision_backbone/trunk/block_groups/blocks_0/attn/qkv/kernel", "backbone/vision_backbone/trunk/pos_embed",
                 "backbone/language_backbone/encoder/token_embedding/embedding",
                 "backbone/language_backbone/encoder/positional_embedding", "transformer/decoder/query_embed/embedding",
                 "segmentation_head/pixel_decoder/norms_0/scale"):  # GroupNorm: not a torch.nn.LayerNorm
        assert path in decayed, path
    for path in ("backbone/vision_backbone/trunk/block_groups/blocks_0/attn/qkv/bias",
                 "backbone/vision_backbone/trunk/ln_pre/scale",
                 "transformer/decoder/layers_scan/layers_0/self_attn/in_proj_bias", "transformer/decoder/norm/scale",
                 "segmentation_head/pixel_decoder/norms_0/bias"):
        assert path not in decayed, path
    # The tracker's LayerNorm2d weights are decayed, its LayerNorms are not.
    assert param_groups.decays("tracker/maskmem_backbone/fuser/layers_0/norm/scale")
    assert param_groups.decays("tracker/sam_mask_decoder/output_upscaling_1/scale")
    assert not param_groups.decays("tracker/sam_mask_decoder/transformer/layers_0/norm1/scale")


# ----------------------------------------------------------------------------------------- layer decay
def test_layer_decay_factors(tiny_tree):
    """Each block's factor, read in the torch layout (one leaf per block) from the stacked one."""
    stacked = param_groups.by_path(param_groups.layer_scales(tiny_tree, optim.default_config()))
    trunk = "backbone/vision_backbone/trunk/"
    for j in range(GROUP):  # one factor per group, broadcastable to the kernel (G, C, 3C)
        assert stacked[f"{trunk}block_groups/blocks_{j}/attn/qkv/kernel"].shape == (GROUPS, 1, 1)
    scales = torch_layout_scales(tiny_tree, optim.default_config())
    assert sum(p.startswith(trunk + "blocks_") for p in scales) == sum(p.startswith(trunk + "block_groups/") for p in stacked) * GROUPS
    for path, s in scales.items():
        if path.startswith(trunk + "blocks_"):
            i = int(path[len(trunk) + len("blocks_"):].split("/")[0])
            assert s == pytest.approx(0.9 ** (DEPTH + 1 - (i + 1))), path
        elif path.startswith((trunk + "patch_embed", trunk + "ln_pre")):
            assert s == pytest.approx(0.9 ** (DEPTH + 1)), path
        else:  # pos_embed (the reference's override), the necks, everything outside the trunk
            assert s == 1.0, path
    flat = jax.tree.leaves(param_groups.layer_scales(tiny_tree, config(layer_decay=1.0)))
    assert len(flat) == len(jax.tree.leaves(tiny_tree)) and all(np.all(np.asarray(s) == 1.0) for s in flat)


# ------------------------------------------------------------------------------------------- schedules
@pytest.mark.parity
@pytest.mark.parametrize("warmup,cooldown,timescale,total", [(20, 20, 20, 200), (0, 20, 20, 60), (5, 0, 10, 50),
                                                             (10, 30, 7, 40)])
def test_inverse_sqrt_matches_reference(ref, warmup, cooldown, timescale, total):
    from sam3.train.optim.schedulers import InverseSquareRootParamScheduler

    want = InverseSquareRootParamScheduler(1e-3, warmup, cooldown, timescale)
    ours = jax.jit(optim.inverse_sqrt_schedule(1e-3, warmup, cooldown, timescale, total))
    steps = np.arange(total)  # the reference trainer steps its schedulers while where = step / total < 1
    got = np.asarray(ours(steps))
    np.testing.assert_allclose(got, [want(step=int(s), where=s / total) for s in steps], rtol=2e-6, atol=1e-12)
    if cooldown:
        assert float(ours(total + 5)) == 0.0


def test_warmup_cosine():
    fn = optim.warmup_cosine_schedule(2.0, 10, 110, 0.1)
    np.testing.assert_allclose(fn(np.arange(11)), 2.0 * np.arange(11) / 10, rtol=1e-6)
    assert float(fn(60)) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert float(fn(110)) == pytest.approx(0.2) and float(fn(500)) == pytest.approx(0.2)
    # No warmup: fvcore's CosineParamScheduler(start, start / 10) at where = step / total (SAM 2's recipe).
    fn = optim.warmup_cosine_schedule(1.0, 0, 40, 0.1)
    where = np.arange(40) / 40
    np.testing.assert_allclose(fn(np.arange(40)), 0.1 + 0.5 * 0.9 * (1 + np.cos(np.pi * where)), rtol=1e-6)


def test_learning_rates_per_group_under_jit():
    cfg = config(accumulate_steps=2)
    lrs = jax.jit(lambda s: optim.learning_rates(cfg, 400, s))(jnp.asarray(61))
    sched = optim.inverse_sqrt_schedule(1.0, 20, 20, 20, 200)  # 400 train steps = 200 updates; step 61 -> 30
    for group, base in (("vision", 2.5e-5), ("text", 5e-6), ("rest", 8e-5)):
        assert float(lrs[group]) == pytest.approx(base * float(sched(30)), rel=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        optim.learning_rates(config(schedule="linear"), 10, 0)


# ----------------------------------------------------------------------------- freezing, accumulation, clip
def test_frozen_params_do_not_move_and_hold_no_state():
    params = mini_tree(0)
    cfg = constant_lr(freeze="^backbone/")
    new, state = run(cfg, params, [mini_tree(1), mini_tree(2)], jit=True)
    labels = param_groups.by_path(param_groups.param_labels(params, cfg))
    before, after = param_groups.by_path(params), param_groups.by_path(new)
    for path, label in labels.items():
        frozen = path.startswith("backbone/") or path.endswith("positional_encoding_gaussian_matrix")
        assert (label == "frozen") == frozen, path
        assert np.array_equal(before[path], after[path]) == frozen, path
    trainable = sum(x.size for p, x in before.items() if labels[p] != "frozen")
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * trainable  # Adam's mu and nu only

    # The prompt encoder's Fourier matrix stays frozen with no freeze pattern at all.
    new, _ = run(constant_lr(), params, [mini_tree(1)])
    key = "tracker/sam_prompt_encoder/pe_layer/positional_encoding_gaussian_matrix"
    assert np.array_equal(param_groups.by_path(new)[key], before[key])
    assert not np.array_equal(param_groups.by_path(new)["transformer/decoder/layers_scan/layers_0/linear1/kernel"],
                              before["transformer/decoder/layers_scan/layers_0/linear1/kernel"])


def test_accumulation_equals_one_step_on_the_mean_gradient():
    k = 3
    params = mini_tree(0)
    grads = [mini_tree(s, scale=0.3) for s in range(1, 2 * k + 1)]
    means = [jax.tree.map(lambda *g: sum(g) / k, *grads[i:i + k]) for i in (0, k)]
    schedule = dict(warmup_steps=0, cooldown_steps=0, timescale=3)  # the lr changes between the two updates
    got, _ = run(config(accumulate_steps=k, **schedule), params, grads, total_steps=2 * k, jit=True)
    want, _ = run(config(**schedule), params, means, total_steps=2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), got, want)
    assert not np.allclose(param_groups.by_path(got)["transformer/decoder/layers_scan/layers_0/linear1/kernel"],
                           param_groups.by_path(params)["transformer/decoder/layers_scan/layers_0/linear1/kernel"])


def test_clipping_bounds_the_trainable_gradient_norm():
    params = mini_tree(0)
    grads = mini_tree(1, scale=100.0)
    cfg = constant_lr(freeze="^backbone/language_backbone/")
    _, state = run(cfg, params, [grads])
    packing = optim.Packing(params, cfg)
    mu = packing.unpack(optax.tree_utils.tree_get(state, "mu"))  # frozen leaves: zeros
    labels = param_groups.by_path(param_groups.param_labels(params, cfg))
    clipped = {p: np.asarray(m) / (1 - cfg.b1) for p, m in param_groups.by_path(mu).items()  # mu = (1 - b1) * first gradient
               if labels[p] != "frozen"}
    assert set(clipped) == {p for p, label in labels.items() if label != "frozen"}
    norm = np.sqrt(sum(np.sum(g ** 2) for g in clipped.values()))
    assert norm == pytest.approx(cfg.clip_norm, rel=1e-5)
    raw = {p: np.asarray(g) for p, g in param_groups.by_path(grads).items() if p in clipped}
    raw_norm = np.sqrt(sum(np.sum(g ** 2) for g in raw.values()))  # frozen gradients take no part
    for p in clipped:
        np.testing.assert_allclose(clipped[p], raw[p] * cfg.clip_norm / raw_norm, rtol=1e-5, atol=1e-9)
    # Small gradients pass unclipped.
    _, state = run(cfg, params, [mini_tree(1, scale=1e-4)])
    key = "transformer/decoder/layers_scan/layers_0/linear1/kernel"
    small = param_groups.by_path(packing.unpack(optax.tree_utils.tree_get(state, "mu")))[key] / (1 - cfg.b1)
    np.testing.assert_allclose(small, param_groups.by_path(mini_tree(1, scale=1e-4))[key], rtol=1e-5)


# ------------------------------------------------------------------------------------------- packing
def test_packing_groups_trainable_leaves_by_group_decay_and_dtype():
    params = mini_tree(0)
    params["transformer"]["decoder"]["layers_scan"]["layers_0"]["linear1"]["bias"] = jnp.ones((2, 4), jnp.bfloat16)
    cfg = constant_lr(freeze="^backbone/language_backbone/")
    packing = optim.Packing(params, cfg)
    labels = param_groups.by_path(param_groups.param_labels(params, cfg))
    flat = packing.pack(params)
    assert set(flat) == {"vision/decay/float32", "vision/no_decay/float32", "rest/decay/float32",
                         "rest/no_decay/float32", "rest/no_decay/bfloat16"}
    assert flat["rest/no_decay/bfloat16"].dtype == jnp.bfloat16
    assert sum(v.size for v in flat.values()) == sum(x.size for p, x in param_groups.by_path(params).items()
                                                     if labels[p] != "frozen")
    back = param_groups.by_path(packing.unpack(flat))
    for path, x in param_groups.by_path(params).items():
        want = np.zeros_like(x) if labels[path] == "frozen" else x
        assert back[path].dtype == x.dtype and np.array_equal(back[path], want), path
    assert set(packing.pack(params, ["rest/decay/float32"])) == {"rest/decay/float32"}
    norm = np.sqrt(sum(float(jnp.sum(jnp.asarray(x, jnp.float32) ** 2)) for p, x in param_groups.by_path(params).items()
                       if labels[p] != "frozen"))
    assert float(packing.norm(params)) == pytest.approx(norm, rel=1e-5)


def test_non_finite_gradients_leave_params_and_moments_untouched():
    params = mini_tree(0)
    cfg = constant_lr(accumulate_steps=2)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan) if g.size == 16 else g, mini_tree(1))
    tx = optim.make_optimizer(cfg, params, 100)
    update = jax.jit(tx.update)
    state = tx.init(params)
    updates, skipped = update(bad, state, params)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
    jax.tree.map(np.testing.assert_array_equal, skipped, (state[0]._replace(
        notfinite_count=1, last_finite=False, total_notfinite=1), *state[1:]))  # the moments unchanged
    assert int(optim.skipped_updates(skipped)) == 1
    # Two finite steps complete an accumulation: the skipped one counted for nothing.
    for _ in range(2):
        updates, skipped = update(mini_tree(1), skipped, params)
    want, _ = run(cfg, params, [mini_tree(1)] * 2)
    got = optax.apply_updates(params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_summary_lists_groups(tiny_tree):
    text = optim.summarize(tiny_tree, config(freeze="^backbone/language_backbone/"), 1000)
    counts = optim.group_counts(tiny_tree, config(freeze="^backbone/language_backbone/"))
    assert counts["text"]["tensors"] == 0 and counts["frozen"]["tensors"] > 0
    for group in ("vision", "text", "rest", "frozen"):
        assert f"{group} " in text
    assert f"{counts['frozen']['params']:,d}" in text and "layer decay 0.9 over 4 blocks" in text


# --------------------------------------------------------------------------------- against the reference
@pytest.fixture(scope="module")
def ref_optimizer(ref):
    """``sam3.train.optim.optimizer`` imported with stand-ins for hydra / omegaconf (not installed):
    the functions used here need only ``hydra.utils.get_class``."""
    def get_class(name):
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)

    hydra = types.ModuleType("hydra")
    hydra.utils = types.SimpleNamespace(get_class=get_class)
    omegaconf = types.ModuleType("omegaconf")
    omegaconf.DictConfig = dict
    with mock.patch.dict(sys.modules, {"hydra": hydra, "omegaconf": omegaconf}):
        return importlib.import_module("sam3.train.optim.optimizer")


@pytest.mark.parity
def test_groups_decay_and_layer_decay_match_the_reference_on_the_tiny_detector(ref, ref_optimizer, tiny_tree):
    """The reference's own functions, fed its fine-tuning config, on its Sam3Image at the tiny sizes."""
    from sam3_jax.testing import reference

    model = reference.build_image_model(TINY)
    names = {n for n, _ in model.named_parameters()}
    no_decay = ref_optimizer.unix_param_pattern_to_parameter_names(["*bias*"], names) | \
        ref_optimizer.unix_module_cls_pattern_to_parameter_names(
            ["torch.nn.LayerNorm"], ref_optimizer.get_module_cls_to_param_names(model))
    lr_cfgs = [[{"option": "lr", "scheduler": lambda **_: 1.0, "parameter_names": set(names)}]]
    layer_cfgs = ref_optimizer.layer_decay_param_modifier(
        lr_cfgs, model, layer_decay_value=0.9, apply_to="backbone.vision_backbone.trunk",
        overrides=[{"pattern": "*pos_embed*", "value": 1.0}])
    ref_scale = {n: c["scheduler"].mult_val for c in layer_cfgs[0] for n in c["parameter_names"]}

    cfg = optim.default_config()
    # Read in the torch layout: one leaf per layer, as the reference names them.
    unrolled = stacking.unrolled_shapes(tiny_tree)
    paths = set(traverse_util.flatten_dict(unrolled))
    labels = param_groups.by_path(param_groups.param_labels(unrolled, cfg))
    scales = torch_layout_scales(tiny_tree, cfg)
    seen = set()
    for name in names:
        if keymap.dead_reason(name):
            continue
        path = "/".join(keymap.flax_path(name, paths))
        seen.add(path)
        assert param_groups.decays(path) == (name not in no_decay), name
        group = ("vision" if fnmatch.fnmatch(name, "backbone.vision_backbone.*") else
                 "text" if fnmatch.fnmatch(name, "backbone.language_backbone.*") else "rest")
        assert labels[path] == group, name
        # Exact, but for the blocks' factors: float32 vectors over the stacked groups (float32's rounding).
        assert scales[path] == pytest.approx(ref_scale[name], rel=1e-12 if "blocks" not in path else 6e-8), name
    assert seen == set(labels)


@pytest.mark.parity
def test_updates_match_torch_adamw_with_param_groups_and_clipping(ref):
    """Three steps of torch.optim.AdamW on param groups (lr = group lr x layer factor, weight decay 0.1
    or 0 as the reference) after clip_grad_norm_(0.1) == ours."""
    torch = ref.torch
    cfg = constant_lr(lr=dict(vision=3e-2, text=1e-2, rest=2e-2))
    params = mini_tree(0)
    grads = [mini_tree(s, scale=scale) for s, scale in ((1, 1.0), (2, 1e-3), (3, 0.5))]  # the 2nd not clipped
    got, _ = run(cfg, params, grads)

    # torch: one tensor per layer (the torch layout), each with its own layer factor.
    labels = param_groups.by_path(param_groups.param_labels(stacking.unrolled(params), cfg))
    scales = torch_layout_scales(params, cfg)
    tensors = {p: torch.nn.Parameter(torch.tensor(np.asarray(x)))
               for p, x in param_groups.by_path(stacking.unrolled(params)).items() if labels[p] != "frozen"}
    groups = [{"params": [t], "lr": cfg.lr[labels[p]] * scales[p],
               "weight_decay": cfg.weight_decay[labels[p]] if param_groups.decays(p) else 0.0} for p, t in tensors.items()]
    opt = torch.optim.AdamW(groups, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    for g in grads:
        g = param_groups.by_path(stacking.unrolled(g))
        for p, t in tensors.items():
            t.grad = torch.tensor(np.asarray(g[p]))
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm=cfg.clip_norm)
        opt.step()
    got = param_groups.by_path(stacking.unrolled(got))
    for p, t in tensors.items():
        np.testing.assert_allclose(got[p], t.detach().numpy(), rtol=1e-5, atol=2e-6, err_msg=p)


def test_trainer_tree_gets_the_detector_groups_and_factors(tiny_tree):
    """The trainer's ``{"detector": ..., "tracker": ...}``: same labels and layer factors below
    ``detector/``; the tracker is ``rest`` and undecayed by layer."""
    cfg = optim.default_config()
    tree = {"detector": tiny_tree, "tracker": {"sam_mask_decoder": {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}}}
    labels = param_groups.by_path(param_groups.param_labels(tree, cfg))
    scales = param_groups.by_path(param_groups.layer_scales(tree, cfg))
    for path, label in param_groups.by_path(param_groups.param_labels(tiny_tree, cfg)).items():
        assert labels["detector/" + path] == label, path
    for path, s in param_groups.by_path(param_groups.layer_scales(tiny_tree, cfg)).items():
        assert np.array_equal(scales["detector/" + path], s), path
    assert labels["tracker/sam_mask_decoder/w"] == "rest" and scales["tracker/sam_mask_decoder/w"] == 1.0
