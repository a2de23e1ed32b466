"""The device mesh of training, built in one place: axes ("data", "frame") (docs/architecture.md, 'The train step').

Clip ``b`` of a global batch lives on a "data" shard, frame ``t`` of each clip on a "frame" shard,
so the expensive per-frame work (ViT, detector) is never duplicated. Both axes are Explicit: the
shardings are part of the arrays' types, so a mismatch between what the step expects and what it
is given is a trace-time error instead of a silent reshard.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sam3_jax.data import schema

AXES = ("data", "frame")
# Batch keys with a frame axis (right after the batch axis); every other key is per clip.
FRAME_KEYS = frozenset(name for name, f in schema.FIELDS.items() if f.shape[:1] == ("T",))


def make_mesh(data: int, frame: int, devices=None) -> jax.sharding.Mesh:
    """A (data, frame) mesh over ``devices`` (default: all). ``data=-1`` takes what ``frame`` leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % frame:
            raise ValueError(f"mesh.frame={frame} does not divide the {len(devices)} devices")
        data = len(devices) // frame
    if data * frame != len(devices):
        raise ValueError(f"mesh.data={data} x mesh.frame={frame} != {len(devices)} devices "
                         "(set mesh.data=-1 to use every device)")
    return jax.make_mesh((data, frame), AXES, (AxisType.Explicit,) * 2, devices=devices)


def batch_spec(name: str) -> P:
    return P("data", "frame") if name in FRAME_KEYS else P("data")


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_divisible(mesh, global_batch: int, num_frames: int) -> None:
    """A clear error for batch shapes the mesh cannot split evenly."""
    data, frame = mesh.shape["data"], mesh.shape["frame"]
    if global_batch % data:
        raise ValueError(f"global batch {global_batch} (data.batch_size x hosts) is not divisible by "
                         f"mesh.data={data}")
    if num_frames % frame:
        raise ValueError(f"data.num_frames={num_frames} is not divisible by mesh.frame={frame}")


def shard_batch(mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's slice of the batch -> global arrays laid out as the step expects (multi-host
    safe: each host contributes its rows along "data")."""
    out = {}
    for name, value in local_batch.items():
        sharding = NamedSharding(mesh, batch_spec(name))
        out[name] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out
