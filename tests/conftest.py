"""Test set-up: 8 host CPU devices for sharding tests, full-precision matmuls for parity."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def ref():
    """Meta's sam3 (PyTorch, CPU) with its CUDA-only paths shimmed; see sam3_jax/testing/reference.py."""
    from sam3_jax.testing import reference

    return reference.load()
