"""The Grain pipeline: sources -> fixed-shape batches (schema.py), deterministic and resumable.

Per source: ``range(len) -> shuffle -> repeat -> random_map(ClipBuilder)``; the sources are mixed
by weight, the mixture is sharded per host, then batched and prefetched by worker processes:

    MapDataset.mix([...], weights)[host::num_hosts]
        .to_iter_dataset().batch(batch_size).mp_prefetch(num_workers)

Every random choice comes from the rng Grain derives from (seed, source, element index), so the
stream is a pure function of the config and seed; ``iterator.get_state()`` / ``set_state()``
(or Orbax's ``grain.checkpoint`` handlers) resume it exactly. Note the batches depend on
``num_workers`` (each worker batches its own slice): resume with the same value.

Workers never outlive the trainer: each watches its parent (`ExitWithParent`) and exits when it is
gone, however it died (kill -9 included); the shared-memory batches they left are then unlinked by
multiprocessing's resource tracker, which exits with them.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import grain
import numpy as np
from absl import flags

from sam3_jax.data import sources, synthetic
from sam3_jax.data.clips import ClipBuilder


def _seeds(seed: int, dataset_index: int) -> tuple[int, int]:
    shuffle_seed, map_seed = np.random.SeedSequence([seed, dataset_index]).generate_state(2)
    return int(shuffle_seed), int(map_seed)


class ExitWithParent:
    """A Grain ``worker_init_fn``: a daemon thread in the worker ends it as soon as the process that
    built the dataset is gone (the worker is then re-parented). Polled, because prctl's
    PR_SET_PDEATHSIG fires when the *thread* that started the worker ends, and Grain starts its
    workers from threads of its own."""

    def __init__(self, interval_s: float = 0.5):
        self.parent, self.interval_s = os.getpid(), interval_s

    def __call__(self, worker_index: int = 0, worker_count: int = 1) -> None:
        threading.Thread(target=self._watch, name="exit-with-parent", daemon=True).start()

    def _watch(self) -> None:
        while os.getppid() == self.parent:
            time.sleep(self.interval_s)
        os._exit(1)  # no cleanup of our own: the resource tracker unlinks the shared memory


def build_dataset(data_cfg: Any, seed: int, shard_index: int | None = None,
                  shard_count: int | None = None) -> grain.IterDataset:
    """The training batch stream for this host (shard defaults: jax process index/count)."""
    if shard_index is None or shard_count is None:
        import jax  # lazy: only the default sharding needs it

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if data_cfg.synthetic.output_dir:
        s = data_cfg.synthetic
        synthetic.ensure(s.output_dir, s.num_videos, s.num_frames, s.size, s.seed)
    if not data_cfg.sources:
        raise ValueError("data.sources is empty: configure at least one dataset")
    datasets, weights = [], []
    for i, (name, src_cfg) in enumerate(data_cfg.sources.items()):
        source = sources.build(src_cfg, strict=data_cfg.on_error == "raise")
        if len(source) == 0:
            raise ValueError(f"data source {name!r} has no videos ({src_cfg.image_dir})")
        shuffle_seed, map_seed = _seeds(seed, i)
        ds = (grain.MapDataset.range(len(source)).shuffle(seed=shuffle_seed).repeat()
              .random_map(ClipBuilder(source, data_cfg, i, name), seed=map_seed))
        datasets.append(ds)
        weights.append(src_cfg.weight)
    mixed = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    ds = mixed[shard_index::shard_count].to_iter_dataset(grain.ReadOptions(
        num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch_buffer_size))
    ds = ds.batch(data_cfg.batch_size, drop_remainder=True)
    if data_cfg.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags (tests, notebooks)
            flags.FLAGS.mark_as_parsed()
        # Workers stack each batch straight into shared memory, which the main process maps
        # without a copy. Grain does this itself for 2+ workers; with 1 it would stack and then
        # copy the batch (~6 MB a frame at S=M=1008) into shared memory.
        getattr(ds, "enable_shared_memory_output", lambda: None)()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg.num_workers, per_worker_buffer_size=data_cfg.worker_buffer_size),
            worker_init_fn=ExitWithParent())
    return ds
