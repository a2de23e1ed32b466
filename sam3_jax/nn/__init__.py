"""Layers and ops shared by many modules (attention, MLPs, norms, RoPE, position encodings, ops)."""
