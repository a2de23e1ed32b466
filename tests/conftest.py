"""Test set-up: 8 host CPU devices for sharding tests, full-precision matmuls for parity."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(items):
    """Tests marked ``first`` run before the others (the order is otherwise kept): by the end of the
    suite its own process holds gigabytes that a test's memory-heavy child processes would share."""
    items.sort(key=lambda item: item.get_closest_marker("first") is None)


@pytest.fixture(scope="session")
def ref():
    """Meta's sam3 (PyTorch, CPU) with its CUDA-only paths shimmed; see sam3_jax/testing/reference.py."""
    from sam3_jax.testing import reference

    return reference.load()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled():
    """The suite runs in one process: free each module's compiled executables and arrays when it ends
    (the 8-device sharded steps alone hold gigabytes), so later heavy tests have the memory."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
