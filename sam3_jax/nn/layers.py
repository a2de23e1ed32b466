"""Small building blocks named after their PyTorch counterparts so parameter paths mirror them.

PyTorch ``nn.Linear`` is ``flax.linen.Dense``; ``nn.LayerNorm`` is ``LayerNorm`` below (torch's eps
default 1e-5, not flax's 1e-6); ``nn.Embedding`` is ``flax.linen.Embed``.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam3_jax.nn import platform

Dtype = jnp.dtype


def LayerNorm(eps: float = 1e-5, name: str | None = None, dtype=None) -> nn.LayerNorm:
    """torch.nn.LayerNorm semantics; statistics are always computed in float32."""
    return nn.LayerNorm(epsilon=eps, name=name, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False)


def LayerNorm2d(eps: float = 1e-6, name: str | None = None, dtype=None) -> nn.LayerNorm:
    """The reference's channel-wise LayerNorm2d on NCHW is a plain LayerNorm over C in NHWC."""
    return LayerNorm(eps=eps, name=name, dtype=dtype)


def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU() and timm's Mlp."""
    return jax.nn.gelu(x, approximate=False)


class MLP(nn.Module):
    """The reference's ``MLP`` (model_misc / sam mask_decoder): ReLU between layers, none after.

    Parameters live in ``layers_0 .. layers_{n-1}``; optional residual and output norm
    (``out_norm``) as in the dot-product scorer's prompt MLP; optional sigmoid on the output as in
    the SAM IoU head.
    """

    hidden_dim: int
    output_dim: int
    num_layers: int
    dropout: float = 0.0
    residual: bool = False
    out_norm: bool = False
    sigmoid_output: bool = False
    activation: Callable = jax.nn.relu
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        orig = x
        for i in range(self.num_layers):
            out = self.output_dim if i == self.num_layers - 1 else self.hidden_dim
            x = nn.Dense(out, name=f"layers_{i}", dtype=self.dtype)(x)
            if i < self.num_layers - 1:
                x = self.activation(x)
                if self.dropout > 0:
                    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        if self.residual:
            x = x + orig
        if self.out_norm:
            x = LayerNorm(name="out_norm", dtype=self.dtype)(x)
        if self.sigmoid_output:
            x = jax.nn.sigmoid(x)
        return x


class ConvTranspose2x2(nn.Module):
    """ConvTranspose2d(kernel=2, stride=2) as a reshape-matmul: every input pixel writes a 2x2 block.

    ``kernel`` is (2, 2, in, out); the converter maps torch's (in, out, kh, kw) to it.
    No spatial flip is involved, unlike ``flax.linen.ConvTranspose``.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, cin, self.features))
        dtype = self.dtype or x.dtype
        y = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(dtype), kernel.astype(dtype))
        b, h, _, w, _, o = y.shape
        y = y.reshape(b, 2 * h, 2 * w, o)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
        return y


class Conv(nn.Module):
    """``flax.linen.Conv`` (same params: ``kernel`` (kh, kw, in/groups, out), ``bias``; NHWC) for the
    small convs of the tracker's memory encoder, which runs on every frame of a training clip.

    On a CPU it is computed from the kernel's shifted (strided) input windows: a sum of per-tap
    products when depthwise, one einsum over the stacked windows otherwise. XLA's CPU convolutions
    are slow in the backward pass at these shapes (a depthwise kernel's gradient became a dense
    64x64-channel convolution, 64 times the work), which made the memory encoder's backward a large
    share of the tracker's train step (benchmarks/README.md). Elsewhere (GPU, TPU)
    ``lax.conv_general_dilated`` as flax does.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: int = 0
    feature_group_count: int = 1
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        cin, groups = x.shape[-1], self.feature_group_count
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, cin // groups, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        pad = ((self.padding, self.padding),) * 2
        if platform.current() != "cpu":
            y = jax.lax.conv_general_dilated(x, kernel, (self.strides,) * 2, pad, feature_group_count=groups,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        elif groups == 1:
            taps = jnp.stack(_windows(x, kh, kw, self.strides, pad), axis=3)  # (B, H, W, kh*kw, C)
            y = jnp.einsum("bhwkc,kco->bhwo", taps, kernel.reshape(kh * kw, cin, self.features))
        elif groups == cin == self.features:
            w = kernel.reshape(kh * kw, cin)
            y = sum(t * w[k] for k, t in enumerate(_windows(x, kh, kw, self.strides, pad)))
        else:
            raise NotImplementedError(f"grouped conv with {groups} groups of {cin} channels")
        return y + bias.astype(dtype)


def _windows(x, kh: int, kw: int, stride: int, pad):
    """The input pixels each kernel tap (i, j) meets, row-major: kh * kw arrays (B, H_out, W_out, C)."""
    x = jnp.pad(x, ((0, 0), *pad, (0, 0)))
    h, w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    return [x[:, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride] for i in range(kh)
            for j in range(kw)]


def drop_path(x, rate, rng, deterministic: bool):
    """Stochastic depth per sample (timm DropPath): zero the residual branch, rescale the rest.

    ``rate`` may be traced (a per-block rate under ``nn.scan``); only a Python zero is skipped.
    """
    if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(rng, keep, shape)
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)
