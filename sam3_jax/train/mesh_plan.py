"""How many devices a run uses on each mesh axis, from ``mesh.data`` / ``mesh.frame`` and the batch.

The rule: a positive size is taken as given (the two must then multiply to the device count). A
-1 takes the largest size that both fits in the devices the other axis leaves and divides what
that axis splits: the global batch for ``data``, the clip's frames (and, when the tracker trains,
``data.max_objects``) for ``frame``. So the demos run unchanged on 1, 2, 4 or 8 devices: a global
batch of 2 on 8 devices trains on 2 and says, in one log line, that 6 stay idle. Idle devices are
allowed on one host only (on several every host must hold part of the mesh).
"""
from __future__ import annotations

import logging
import math

import jax

from sam3_jax.train import mesh as mesh_lib
from sam3_jax.train import tasks

log = logging.getLogger(__name__)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(min(n, at_most), 1) + 1) if n % d == 0)


def axis_sizes(data: int, frame: int, num_devices: int, global_batch: int, splits_frames: int) -> tuple[int, int]:
    """(data, frame) for the config's ``mesh.data`` and ``mesh.frame`` (see the module docstring);
    ``splits_frames``: the count the frame axis must divide. Raises ValueError naming the field."""
    other = frame if data == -1 else data
    if other > num_devices:
        name = "frame" if data == -1 else "data"
        raise ValueError(f"mesh.{name}={other} is more than the {num_devices} devices")
    if data == -1:
        data = _largest_divisor(global_batch, num_devices // frame)
    elif frame == -1:
        frame = _largest_divisor(splits_frames, num_devices // data)
    return data, frame


def make_mesh(config) -> jax.sharding.Mesh:
    """The run's (data, frame) mesh over the devices `axis_sizes` picks, with a log line when
    some stay idle."""
    devices = jax.devices()
    global_batch = config.data.batch_size * jax.process_count()
    splits = config.data.num_frames
    if any(task.splits_objects for task in tasks.tasks_for(config.mode)):
        splits = math.gcd(splits, config.data.max_objects)
    data, frame = axis_sizes(config.mesh.data, config.mesh.frame, len(devices), global_batch, splits)
    used = data * frame
    if used < len(devices) and -1 in (config.mesh.data, config.mesh.frame):
        if jax.process_count() > 1:
            raise ValueError(f"mesh {data} x {frame} uses {used} of the {len(devices)} devices of "
                             f"{jax.process_count()} hosts: give data.batch_size a multiple of "
                             f"{len(devices) // frame // jax.process_count()} so that every host takes part")
        what = (f"a global batch of {global_batch} clips" if config.mesh.data == -1
                else f"{splits} frames (and objects) a clip")
        log.info("mesh: data=%d x frame=%d on %d of the %d devices (the largest split of %s); %d stay idle",
                 data, frame, used, len(devices), what, len(devices) - used)
        devices = devices[:used]
    return mesh_lib.make_mesh(data, frame, devices)
