"""Checkpoints on disk, below everything that writes or reads them (training, conversion, inference).

* `converted`: a converted checkpoint directory (Orbax params, manifest, dead weights, vocabulary),
  what the converter writes and the export to PyTorch reads.
* `run`: a training run's checkpoints (Orbax ``CheckpointManager`` over the train state and the data
  iterator's position), with the best-on-a-metric copy beside them.
* `restore`: parameters read out of either, in the layer layout a caller asks for (``init_from``).
* `weights`: parameters and model configs as the predictors read them.
* `finite`, `save_errors`: refusing weights that hold NaN or Inf; reporting a failed save once.
"""
