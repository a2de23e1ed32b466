"""Tokenizer and text encoder against the reference, end to end from strings (docs/reference_model.md,
'Tokenizer', 'Text encoder')."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.model.config import ModelConfig
from sam3_jax.model.text import VETextEncoder
from sam3_jax.model.tokenizer import SimpleTokenizer
from sam3_jax.testing import reference
from sam3_jax.testing.parity import flax_params, max_abs_diff, randomize_, t2n

pytestmark = pytest.mark.parity
TOL = 1e-5

TEXTS = [
    "a cat", "", "   ", "\t\n ", "Hello, World!!", "it's the DOG's ball", "don't stop", "3.14159 apples & 42 pears",
    "5th avenue", "over-the-counter", "!?", "dog!~", "café naïve résumé", "ÉCOLE", "İstanbul", "ß ẞ ǅ", "a\u0301",
    "猫と犬", "😀🐶 dog", "ﬁne print", "x\u200by", "\x1c a \x1f b", "mojibake: Ã©", "&amp;amp; &lt;b&gt; &quot;x&quot;",
    "<start_of_text> hi <end_of_text>", "a " * 40, "supercalifragilisticexpialidocious " * 5,
]
CAPTIONS = ["a cat", "the person in a red shirt on the left", "visual", "a " * 40]


@pytest.fixture(scope="module")
def ref_tokenizer(ref):
    from sam3.model.tokenizer_ve import SimpleTokenizer as RefTokenizer

    return RefTokenizer(bpe_path=reference.bpe_path())


@pytest.mark.parametrize("context_length", [32, 77, 8])
def test_tokenizer_ids(ref_tokenizer, context_length):
    want = ref_tokenizer(TEXTS, context_length=context_length).numpy()
    got = SimpleTokenizer()(TEXTS, context_length=context_length)
    np.testing.assert_array_equal(got, want)
    ours = SimpleTokenizer()
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == ref_tokenizer.decode(ids)


@pytest.fixture(scope="module")
def pair(ref, ref_tokenizer):
    """The reference encoder at tiny size with seeded weights, and the same weights converted."""
    from sam3.model.text_encoder_ve import VETextEncoder as RefEncoder

    cfg = ModelConfig.tiny()
    t = cfg.text
    torch_enc = RefEncoder(d_model=cfg.d_model, tokenizer=ref_tokenizer, width=t.width, heads=t.heads,
                           layers=t.layers, context_length=t.context_length, vocab_size=t.vocab_size).eval()
    randomize_(torch_enc, seed=0)
    ids = SimpleTokenizer()(CAPTIONS, context_length=t.context_length)
    return cfg, torch_enc, ids, flax_params(torch_enc, VETextEncoder(t, cfg.d_model), ids)


@pytest.mark.parametrize("remat", [False, True])
def test_text_encoder(ref, pair, remat):
    """With the blocks rematerialised or not."""
    cfg, torch_enc, ids, params = pair
    ours = VETextEncoder(dataclasses.replace(cfg.text, remat=remat), cfg.d_model)
    with ref.torch.no_grad():
        want_mask, want_feats, _ = torch_enc(CAPTIONS, device="cpu")

    @jax.jit
    def run(p, x, key):  # the eval path and the training path (no dropout in the text encoder)
        return (ours.apply({"params": p}, x),
                ours.apply({"params": p}, x, deterministic=False, rngs={"dropout": key})[0])

    (feats, mask), train = run(params, ids, jax.random.key(1))
    assert feats.shape == (len(CAPTIONS), 32, cfg.d_model) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask), want_mask.numpy())
    assert max_abs_diff(feats, t2n(want_feats).transpose(1, 0, 2)) < TOL  # reference is seq-first
    assert max_abs_diff(train, feats) < TOL


def test_text_encoder_grad_and_bf16(pair):
    """Gradients flow through the rematerialised blocks, as they do without remat; the bf16 compute
    path stays close to fp32."""
    cfg, _, ids, params = pair
    ours = VETextEncoder(cfg.text, cfg.d_model)
    abstract = jax.eval_shape(lambda: ours.init(jax.random.key(0), ids))["params"]
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert "text_projection" not in params["encoder"]

    def loss(p):
        feats, mask = ours.apply({"params": p}, ids)
        return jnp.sum(jnp.where(mask[..., None], 0.0, feats) ** 2)

    jaxpr = str(jax.make_jaxpr(loss)(params))
    assert len(re.findall(r"\b(?:checkpoint|remat\w*)\[", jaxpr)) == 1  # the block, in the scan's body
    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    block = grads["encoder"]["transformer"]["resblocks_scan"]["resblocks_0"]
    assert np.all(np.abs(np.asarray(block["attn"]["in_proj_kernel"])).max(axis=(1, 2)) > 0)  # every block's
    plain = VETextEncoder(dataclasses.replace(cfg.text, remat=False), cfg.d_model)
    remat_grads = jax.jit(jax.grad(lambda p: jnp.sum(ours.apply({"params": p}, ids)[0] ** 2)))(params)
    plain_grads = jax.jit(jax.grad(lambda p: jnp.sum(plain.apply({"params": p}, ids)[0] ** 2)))(params)
    diffs = jax.tree.map(lambda a, b: max_abs_diff(a, b) / float(jnp.abs(a).max()),
                         plain_grads["encoder"]["transformer"], remat_grads["encoder"]["transformer"])
    assert max(jax.tree.leaves(diffs)) < 1e-5  # relative to each leaf's largest gradient
    bf16_enc = VETextEncoder(cfg.text, cfg.d_model, dtype=jnp.bfloat16)
    f32, bf16 = jax.jit(lambda p: (ours.apply({"params": p}, ids)[0], bf16_enc.apply({"params": p}, ids)[0]))(params)
    assert bf16.dtype == jnp.bfloat16
    assert max_abs_diff(bf16, f32) < 0.1 * float(jnp.abs(f32).max())
