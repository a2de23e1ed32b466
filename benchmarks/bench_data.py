"""Data pipeline throughput: clips/s and frames/s at S=1008, T=8, against bare JPEG decode+resize.

Claim checked (issue 4): the pipeline's frames/s per core is at least half of what one core does
with PIL decode + resize of the same files. Frames are the generated dataset at 1280x960.

Every row is timed two ways over the same window:

* wall: frames per wall second; per core = that / max(workers, 1). This is what a quiet machine
  gives, and it moves with whatever else runs on the machine.
* CPU: frames per CPU second summed over the main process (all its threads) and its worker
  processes (their CPU time read before and after the window), i.e. the per-core rate whatever
  the load. It includes the main process's share (batch hand-over from workers).

The bare baseline (PIL decode + antialiased bilinear resize to S x S, the only work a pipeline
cannot avoid) is one figure for all rows, measured on all the files the pipeline reads with the
same two clocks, after every file has been read once so that the page cache is warm on both sides.
Rows: the pipeline in the main process (0 workers) and with 1 and 2 worker processes. Each batch
is dropped as soon as it arrives, as a training loop does (holding them all would time the
allocation of fresh memory instead).

CPU time is not immune to a crowded machine either (a busy sibling hyperthread and a shared cache
slow every instruction: on a 2-core machine at load 6-8 the same code gave 17-23 frames per CPU
second from run to run), so with --rounds=R the baseline and every row are measured R times, in
turn, and each figure printed is the median of its R values.

    python benchmarks/bench_data.py [--workers=1,2] [--num_batches=40] [--rounds=3]
"""
from __future__ import annotations

import glob
import os
import statistics
import tempfile
import time

import psutil  # already installed with orbax-checkpoint
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
flags.DEFINE_integer("rounds", 3, "measurements of every figure; the median is printed")
FLAGS = flags.FLAGS
SOURCE_WIDTH = 1280  # frames are 1280x960


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its live descendants."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process tree) taken by fn()."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def warm_cache(data_dir: str) -> int:
    """Reads every file of the dataset once; returns the bytes read."""
    total = 0
    for path in glob.glob(os.path.join(data_dir, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                total += len(f.read())
    return total


def bare_decode_resize(paths: list[str], size: int) -> tuple[float, float]:
    """Frames/s (wall, CPU) of one core doing only PIL decode + bilinear resize to size x size."""
    def run():
        for p in paths:
            with Image.open(p) as img:  # RGB JPEGs: resize decodes, no conversion needed
                img.resize((size, size), Image.Resampling.BILINEAR)
    wall, cpu = timed(run)
    return len(paths) / wall, len(paths) / cpu


def pipeline_rate(data_dir: str, workers: int, num_batches: int) -> tuple[float, float]:
    """Clips per wall second and per CPU second of the full pipeline (decode, sample, augment,
    masks, batch, hand-over from workers)."""
    c = data_config.base_config()
    c.image_size, c.num_frames, c.batch_size = FLAGS.image_size, FLAGS.num_frames, 1
    c.num_workers = workers
    c.num_threads = 0 if workers == 0 else 1  # in-process: do the work in this thread
    c.sources.bench = data_config.source_config(
        "davis", os.path.join(data_dir, "davis", "JPEGImages"),
        os.path.join(data_dir, "davis", "Annotations"), phrase="object")
    it = iter(pipeline.build_dataset(c, seed=0, shard_index=0, shard_count=1))
    for _ in range(max(3, 3 * workers)):  # warm-up: worker start, first prefetches
        next(it)
    def run():
        for _ in range(num_batches):  # each batch dropped at once, as a training loop does
            next(it)
    wall, cpu = timed(run)
    if workers:
        it.close()
    return num_batches / wall, num_batches / cpu


def main(argv) -> None:
    del argv
    synthetic.ensure(FLAGS.data_dir, num_videos=6, num_frames=32, size=SOURCE_WIDTH, seed=0)
    paths = sorted(glob.glob(os.path.join(FLAGS.data_dir, "davis", "JPEGImages", "*", "*.jpg")))
    warm_cache(FLAGS.data_dir)
    t = FLAGS.num_frames
    print(f"S={FLAGS.image_size} T={t}, source frames {Image.open(paths[0]).size}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start, "
          f"median of {FLAGS.rounds} rounds", flush=True)
    settings = [0] + [int(w) for w in FLAGS.workers]
    bare_runs, runs = [], {s: [] for s in settings}
    for _ in range(FLAGS.rounds):  # interleaved, so a load swing hits every figure alike
        bare_runs.append(bare_decode_resize(paths, FLAGS.image_size))
        for w in settings:
            runs[w].append(pipeline_rate(FLAGS.data_dir, w, FLAGS.num_batches))
    bare, bare_cpu = (statistics.median(x) for x in zip(*bare_runs))
    spread = "{:.1f}-{:.1f}".format(*(f(r[1] for r in bare_runs) for f in (min, max)))
    print(f"bare decode + resize, {len(paths)} frames: {bare:.1f} frames/s wall, "
          f"{bare_cpu:.1f} frames per CPU second (rounds: {spread})")
    head = ("setting", "clips/s", "frames/s", "wall/core", "ratio", "frames/CPU-s", "ratio",
            "rounds")
    print("{:<32}{:>8}{:>10}{:>11}{:>7}{:>14}{:>7}{:>13}".format(*head))
    for w, values in runs.items():
        clips, clips_cpu = (statistics.median(x) for x in zip(*values))
        per_core, cpu_rate = clips * t / max(w, 1), clips_cpu * t
        spread = "{:.1f}-{:.1f}".format(*(f(v[1] * t for v in values) for f in (min, max)))
        name = f"pipeline, {w} workers"
        print(f"{name:<32}{clips:>8.2f}{clips * t:>10.1f}{per_core:>11.1f}{per_core / bare:>7.2f}"
              f"{cpu_rate:>14.1f}{cpu_rate / bare_cpu:>7.2f}{spread:>13}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    app.run(main)
