"""Training losses. ``detector``: the SAM 3 detector losses; ``sigmoid``: BCE / focal / dice on
logits; ``point_sampling``: PointRend-style points for mask losses."""
from sam3_jax.train.losses.detector import DetectorLossConfig, detector_loss

__all__ = ["DetectorLossConfig", "detector_loss"]
