"""The CPU compile options of full-width image-encoder jits (sam3_jax.nn.compiler)."""
import jax
import jax.numpy as jnp
import pytest

from sam3_jax.model.config import ModelConfig
from sam3_jax.nn import compiler


def test_full_width_encoder_jits_compile_without_ynn_fusions():
    if not compiler._known(*next(iter(compiler.YNN_OFF.items()))):
        pytest.skip("this XLA has no YNN fusion option")
    opts = compiler.encoder_options(ModelConfig.official())
    assert opts == compiler.YNN_OFF
    x = jnp.ones((128, 128))
    text = jax.jit(lambda a: jnp.tanh(a @ a), compiler_options=opts).lower(x).compile().as_text()
    assert "dot" in text and "__ynn_fusion" not in text


def test_small_encoders_and_the_opt_out_keep_xla_defaults(monkeypatch):
    assert compiler.encoder_options(ModelConfig.tiny()) == {}
    monkeypatch.setenv("SAM3_JAX_CPU_YNN", "1")
    assert compiler.encoder_options(ModelConfig.official()) == {}


def test_an_option_this_xla_does_not_know_is_left_out():
    assert not compiler._known("xla_cpu_no_such_option", "")
