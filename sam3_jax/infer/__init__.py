"""Inference: image loading and pre-processing, predictors, post-processing."""
