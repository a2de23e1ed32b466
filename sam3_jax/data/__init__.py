"""Video/image data for sam3-jax: readers of on-disk formats, clip sampling, augmentation and the
Grain pipeline that turns them into fixed-shape batches (the contract lives in `schema.py`)."""
