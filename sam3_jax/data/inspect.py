"""Print what the data pipeline produces: every batch key with shape and dtype, the skipped-sample
count and the throughput.

    python -m sam3_jax.data.inspect --config=configs/video.py:demo --num_batches=N
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from sam3_jax.data import pipeline, schema


def summarize(config: Any, num_batches: int) -> str:
    """Runs `num_batches` batches through the pipeline of `config` (top-level: seed, data) and
    returns the report; every batch is checked against the schema."""
    dims = schema.Dims.from_config(config.data)
    it = iter(pipeline.build_dataset(config.data, seed=config.seed))
    batch = next(it)  # the first batch pays for start-up; it is not timed
    schema.validate(batch, dims)
    skipped = int(batch["skipped"].sum())
    start = time.perf_counter()
    for _ in range(num_batches - 1):
        batch = next(it)
        schema.validate(batch, dims)
        skipped += int(batch["skipped"].sum())
    elapsed = time.perf_counter() - start
    clips = (num_batches - 1) * config.data.batch_size
    lines = [f"{'key':<20}{'shape':<28}dtype"]
    lines += [f"{k:<20}{str(np.shape(batch[k])):<28}{np.asarray(batch[k]).dtype}"
              for k in schema.FIELDS]
    lines.append(f"skipped samples: {skipped} in {num_batches} batches")
    rate = f"{clips / elapsed:.2f} clips/s" if clips else "n/a (need --num_batches >= 2)"
    lines.append(f"throughput: {rate} ({config.data.num_workers} workers, first batch excluded)")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    from absl import flags

    print(summarize(flags.FLAGS.config, flags.FLAGS.num_batches))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/video.py:demo", "training config file")
    flags.DEFINE_integer("num_batches", 10, "batches to read")
    app.run(main)
