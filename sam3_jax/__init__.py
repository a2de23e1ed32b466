"""SAM 3 in JAX/Flax, built for training and fine-tuning on video."""

__version__ = "0.1.0"
