"""Converted checkpoints read as the predictors run them: every layer stack scanned, only the models a
predictor uses read (an image predictor skips the tracker's parameters), and weights holding NaN or
Inf refused, naming them, rather than run into outputs that are all NaN."""
from __future__ import annotations

from sam3_jax.convert import checkpoint, sam3_checkpoint
from sam3_jax.model import stacking
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.train import checkpoint as run_checkpoint


def read(checkpoint_dir: str, *, tracker: bool) -> tuple[dict, ModelConfig, TrackerConfig | None]:
    """(params, detector config, tracker config or None) of the converted checkpoint, the configs
    set to scan every stack. The layers are stacked as they are restored (`run_checkpoint.load_params`),
    so the peak host memory stays near the parameters' size. With ``tracker`` False, or a checkpoint
    without one, params holds only "detector". Non-finite weights raise ``checkpoint.NonFiniteError``."""
    cfg, tracker_cfg = sam3_checkpoint.configs(checkpoint.read_manifest(checkpoint_dir))
    cfg = stacking.set_scans(cfg, True)
    tracker_cfg = stacking.set_scans(tracker_cfg, True) if tracker_cfg is not None else None
    abstract = sam3_checkpoint.abstract_params(cfg, tracker_cfg if tracker else None)
    params = run_checkpoint.load_params(checkpoint_dir, abstract)
    checkpoint.check_finite(params, f"checkpoint {checkpoint_dir}")
    return params, cfg, tracker_cfg
