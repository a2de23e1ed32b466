"""The train step compiles for a TPU: ``benchmarks/aot_compile.py`` compiles the tiny model's joint
step (detector and tracker losses: everything the detector and tracker modes compile; layer stacks
scanned, parameters sharded) for a 4-chip TPU v5e topology with the real TPU compiler, on this
CPU-only machine, so a change that breaks TPU compilation fails here. XLA's optimisations are
turned down (``JAX_DISABLE_MOST_OPTIMIZATIONS``): what is checked is that it compiles, not how well."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu (the TPU compiler) is not installed: pip install -e ".[tpu-aot]"')]

TINY = ["--config=configs/video.py:demo", "--topology=v5e:2x2", "--config.mesh.shard_params=True",
        "--config.mesh.frame=2", "--config.data.num_frames=2", "--config.data.batch_size=2",
        "--config.data.max_objects=4"]


def _aot(*args, timeout):
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    return subprocess.run([sys.executable, "benchmarks/aot_compile.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_train_step_compiles_for_tpu():
    mode = "joint"
    run = _aot(f"--mode={mode}", *TINY, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["device_kind"] == "TPU v5 lite" and result["chips"] == 4 and result["mode"] == mode
    assert result["mesh"] == {"data": 2, "frame": 2} and result["shard_params"]
    assert result["fits"] and 0 < result["per_chip_bytes"] < result["hbm_bytes"]
    assert result["flops"] > 0 and result["per_chip_param_bytes"] > 0


def test_a_config_the_mesh_refuses_is_one_line():
    run = _aot("--mode=detector", *TINY, "--config.data.num_frames=3", timeout=600)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "num_frames=3 is not divisible by mesh.frame=2" in run.stderr.strip().splitlines()[-1]


# Far over a chip's memory the no-crash-on-OOM compile fails too; the figure then comes from the
# compiler's refusal. A step that large takes many minutes to compile: a 33 GiB argument a chip
# (16 GiB on a v5e chip) is as far over in seconds.
_REFUSED = """
import importlib.util, json, sys
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
spec = importlib.util.spec_from_file_location("aot_compile", "benchmarks/aot_compile.py")
aot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aot)
mesh = Mesh(topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices, ("d",))
rows = jax.ShapeDtypeStruct((4 * 33, 2**28), jnp.float32, sharding=NamedSharding(mesh, P("d")))
lowered = jax.jit(lambda x: (jnp.exp(jnp.sin(x)) * x).sum()).lower(rows)
compiled, peak = aot.compile_or_refusal(lowered)
print(json.dumps({"compiled": compiled is not None, "peak": peak, "gib": aot.GIB}))
"""


def test_a_step_far_over_the_chip_gets_the_refusals_figure():
    run = subprocess.run([sys.executable, "-c", _REFUSED], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["compiled"]
    assert result["peak"] >= 33 * result["gib"]  # at least the chip's share of the argument
