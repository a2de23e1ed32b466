"""Flax (Linen) modules mirroring SAM 3's detector and tracker."""
