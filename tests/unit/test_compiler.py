"""The CPU compile options of full-width image-encoder jits (sam3_jax.nn.compiler)."""
import dataclasses

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


def test_small_encoders_and_the_opt_out_keep_xla_defaults():
    assert compiler.encoder_options(ModelConfig.tiny()) == {}
    official = ModelConfig.official()
    assert compiler.encoder_options(official.replace(vit=dataclasses.replace(official.vit, cpu_ynn=True))) == {}


def test_the_config_can_turn_ynn_fusions_off_at_any_width():
    if not compiler._known(*next(iter(compiler.YNN_OFF.items()))):
        pytest.skip("this XLA has no YNN fusion option")
    tiny = ModelConfig.tiny()
    assert compiler.encoder_options(tiny.replace(vit=dataclasses.replace(tiny.vit, cpu_ynn=False))) == compiler.YNN_OFF


def test_an_option_this_xla_does_not_know_is_left_out():
    assert not compiler._known("xla_cpu_no_such_option", "")
