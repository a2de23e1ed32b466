"""Data pipeline throughput: clips/s and frames/s at S=1008, T=8, against bare JPEG decode+resize.

Claim checked (issue 4): the pipeline's frames/s per core is at least half of what one core does
with PIL decode + resize of the same files. Frames are the generated dataset at 1280x960.

Rows: the pipeline in the main process (0 workers), then with 1 and 2 worker processes, then with
the exact (single bilinear pass) warp instead of the default resize + nearest one. Bare
decode+resize is re-measured next to every row, so a busy machine shifts both sides of the ratio
alike; on a shared machine the CPU-time columns (frames per CPU-second of this process, in-process
rows only) are the steadier ones.

    python benchmarks/bench_data.py [--workers=1,2] [--num_batches=40] [--data_dir=DIR]
"""
from __future__ import annotations

import glob
import os
import tempfile
import time

from absl import app, flags
from PIL import Image

from sam3_jax.data import config as data_config
from sam3_jax.data import pipeline, synthetic

flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "sam3_jax_bench_data"),
                    "where the generated benchmark videos live (written if absent)")
flags.DEFINE_list("workers", ["1", "2"], "worker counts to measure")
flags.DEFINE_integer("num_batches", 40, "batches (clips) timed per setting, after warm-up")
flags.DEFINE_integer("image_size", 1008, "S")
flags.DEFINE_integer("num_frames", 8, "T")
FLAGS = flags.FLAGS
SOURCE_WIDTH = 1280  # frames are 1280x960


def timed(fn, count: int) -> tuple[float, float]:
    """(items per wall second, items per CPU second of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def bare_decode_resize(paths: list[str], size: int) -> tuple[float, float]:
    """Frames/s of one core doing only PIL decode + bilinear resize to size x size."""
    def run():
        for p in paths:
            with Image.open(p) as img:  # RGB JPEGs: resize decodes, no conversion needed
                img.resize((size, size), Image.Resampling.BILINEAR)
    return timed(run, len(paths))


def pipeline_rate(data_dir: str, workers: int, num_batches: int,
                  exact_warp: bool) -> tuple[float, float]:
    """Clips/s of the full pipeline (decode, sample, augment, masks, batch)."""
    c = data_config.base_config()
    c.image_size, c.num_frames, c.batch_size = FLAGS.image_size, FLAGS.num_frames, 1
    c.num_workers, c.augment.exact_warp = workers, exact_warp
    c.num_threads = 0 if workers == 0 else 1  # in-process: do the work in this thread
    c.sources.bench = data_config.source_config(
        "davis", os.path.join(data_dir, "davis", "JPEGImages"),
        os.path.join(data_dir, "davis", "Annotations"), phrase="object")
    it = iter(pipeline.build_dataset(c, seed=0, shard_index=0, shard_count=1))
    for _ in range(max(3, 2 * workers)):  # warm-up: worker start, first prefetches
        next(it)
    rates = timed(lambda: [next(it) for _ in range(num_batches)], num_batches)
    if workers:
        it.close()
    return rates


def main(argv) -> None:
    del argv
    synthetic.ensure(FLAGS.data_dir, num_videos=6, num_frames=32, size=SOURCE_WIDTH, seed=0)
    paths = sorted(glob.glob(os.path.join(FLAGS.data_dir, "davis", "JPEGImages", "*", "*.jpg")))
    bare_decode_resize(paths[:8], FLAGS.image_size)  # warm the page cache
    t = FLAGS.num_frames
    print(f"S={FLAGS.image_size} T={t}, source frames {Image.open(paths[0]).size}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    head = ("setting", "clips/s", "frames/s", "per core", "bare/core", "ratio", "cpu: pipe",
            "bare", "ratio")
    print("{:<32}{:>8}{:>10}{:>10}{:>11}{:>7}{:>11}{:>7}{:>7}".format(*head))
    settings = [(0, False)] + [(w, False) for w in map(int, FLAGS.workers)] + [(0, True)]
    for w, exact in settings:
        bare, bare_cpu = bare_decode_resize(paths[:48], FLAGS.image_size)
        clips, clips_cpu = pipeline_rate(FLAGS.data_dir, w, FLAGS.num_batches, exact)
        per_core = clips * t / max(w, 1)
        name = f"pipeline, {w} workers" + (", exact warp" if exact else "")
        cpu = (f"{clips_cpu * t:>11.1f}{bare_cpu:>7.1f}{clips_cpu * t / bare_cpu:>7.2f}"
               if w == 0 else f"{'-':>11}{'-':>7}{'-':>7}")
        print(f"{name:<32}{clips:>8.2f}{clips * t:>10.1f}{per_core:>10.1f}{bare:>11.1f}"
              f"{per_core / bare:>7.2f}{cpu}")


if __name__ == "__main__":
    app.run(main)
