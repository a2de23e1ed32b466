"""Test support: the PyTorch reference oracle and helpers shared by tests and benchmarks.

Nothing here is imported by the model, the trainer or the converter; only parity tests and
benchmarks use it, and it imports torch lazily.
"""
