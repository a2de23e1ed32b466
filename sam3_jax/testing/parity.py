"""Helpers for parity tests: seeded random torch weights, moved into Flax through the converter."""
from __future__ import annotations

import jax
import numpy as np

from sam3_jax.convert import keymap


def randomize_(module, seed: int, std: float = 0.02) -> None:
    """Overwrites every parameter of a torch module with seeded noise, so no weight is a trivial
    zero or one (torch inits many biases to zero and norms to one, which would hide bugs)."""
    import torch  # the caller built ``module`` with it (`reference.load`)

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:])) if p.shape[0] > 0 else 1
                scale = max(std, 1.0 / np.sqrt(max(fan_in, 1)))
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif name.endswith("weight") or name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def state_dict_numpy(module, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in module.state_dict().items():
        if k.startswith(prefix):
            out[k[len(prefix):]] = v.detach().cpu().numpy()
    return out


def flax_params(torch_module, flax_module, *init_args, prefix: str = "", **init_kwargs):
    """Converts ``torch_module``'s weights into params for ``flax_module`` with the real converter."""
    abstract = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), *init_args, **init_kwargs))["params"]
    return keymap.convert(state_dict_numpy(torch_module, prefix), abstract).params


def t2n(t) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))) if a.size else 0.0
