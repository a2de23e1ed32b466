"""Training losses. ``detector``: the SAM 3 detector losses; ``sigmoid``: BCE / focal / dice on
logits; ``point_sampling``: PointRend-style points for mask losses; ``tracker``: SAM 2's multi-step
multi-mask tracker losses."""
from sam3_jax.train.losses.detector import DetectorLossConfig, detector_loss
from sam3_jax.train.losses.tracker import TrackerLossConfig, step_losses, weighted_total

__all__ = ["DetectorLossConfig", "TrackerLossConfig", "detector_loss", "step_losses", "weighted_total"]
