"""Meta's SAM 3 (PyPI ``sam3==0.1.4``) on CPU, as the parity oracle.

Install it with ``scripts/install_reference.sh``. ``load()`` imports it once with the shims its
CUDA-only code paths need (SAM3_SPEC §2.17): position-encoding caches and decoder coordinates built
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


def available() -> bool:
    try:
        load()
        return True
    except ImportError:
        return False


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
    if not getattr(init, "_cpu_shim", False):
        def cpu_init(self, *args, precompute_resolution=None, **kwargs):
            init(self, *args, precompute_resolution=None, **kwargs)
        cpu_init._cpu_shim = True
        position_encoding.PositionEmbeddingSine.__init__ = cpu_init

        get_coords = decoder.TransformerDecoder._get_coords
        decoder.TransformerDecoder._get_coords = staticmethod(lambda h, w, device: get_coords(h, w, "cpu"))
        if not torch.cuda.is_available():
            torch.Tensor.pin_memory = lambda self, *a, **k: self
            torch.Tensor.cuda = lambda self, *a, **k: self
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    import sam3.model_builder as model_builder

    return types.SimpleNamespace(torch=torch, model_builder=model_builder)


def bpe_path() -> str:
    from sam3_jax.model.tokenizer import DEFAULT_BPE_PATH

    return DEFAULT_BPE_PATH


def seed_all(seed: int) -> None:
    ref = load()
    ref.torch.manual_seed(seed)


def to_numpy(t):
    return t.detach().cpu().float().numpy() if hasattr(t, "detach") else t
