"""Training: on-device matchers (``matcher``), losses (``losses``) and the optimiser (``optim``)."""
