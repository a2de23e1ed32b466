"""Video training: ``python train.py --config=configs/video.py[:variant] --workdir=DIR``.

The default is the official SAM 3 size with the reference's fine-tuning hyper-parameters
(optimiser, losses) on SAM2-style video clips. Variants:

* ``demo``: a small model on generated videos (written on first use) that trains on a laptop CPU
  in minutes; the README's main command.
* one per real dataset format: ``davis`` (also MOSE), ``sav``, ``ytvis`` (also SA-Co video),
  ``coco`` (images as 1-frame clips). Point them at your data on the command line, e.g.
  ``--config.data.sources.davis.image_dir=/data/DAVIS/JPEGImages/480p``.

Every field can be overridden, e.g. ``--config.optim.lr.rest=1e-4 --config.mesh.frame=8``; an
unknown field is an error that lists the valid ones. The sections are built in
`sam3_jax.train.config`.
"""
from sam3_jax.train import config


def get_config(arg: str | None = None):
    return config.video_config(arg or "default")
