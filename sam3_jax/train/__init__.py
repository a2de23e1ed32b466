"""Training: on-device matchers and losses (``matcher``, ``losses``)."""
