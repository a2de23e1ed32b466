"""Shared by the integration tests: a tiny ``sam3.pt`` built from the reference modules."""
import os

import numpy as np
import pytest

from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_state_dict(ref):
    """A tiny ``sam3.pt``: the reference image model and tracker, under detector.* and tracker.*."""
    from sam3_jax.testing import reference
    from sam3_jax.testing.parity import randomize_, state_dict_numpy

    model = reference.build_image_model(ModelConfig.tiny())
    randomize_(model, seed=3)
    sd = {"detector." + k: v for k, v in state_dict_numpy(model).items()}
    sd.update({"tracker." + k: v for k, v in state_dict_numpy(reference.build_tracker(TrackerConfig.tiny())).items()})
    return sd


def write_torch(sd, path, wrap=True, prefix=""):
    import torch

    tensors = {prefix + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    torch.save({"model": tensors} if wrap else tensors, path)
    return str(path)
