"""Checkpoint conversion between Meta's PyTorch state_dict and our Flax parameter tree."""
