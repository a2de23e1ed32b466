"""Train SAM 3 on video: ``python train.py --config=configs/video.py[:variant] --workdir=DIR``.

Override any config field with ``--config.<path>=value`` (e.g. ``--config.optim.lr.rest=1e-4``).
Running again with the same ``--workdir`` resumes from its newest checkpoint.
"""
from __future__ import annotations

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sam3_jax.train import loop, overrides

DEFAULT_CONFIG = "configs/video.py"
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Training config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and config.json go.", required=True)


def parse_flags(argv):
    """Checks every ``--config.*`` override against the config before the flags are parsed."""
    paths = overrides.override_paths(argv)
    if paths:
        config = overrides.load_config(overrides.config_spec(argv, DEFAULT_CONFIG))
        errors = [e for e in (overrides.unknown_field(config, p) for p in paths) if e]
        if errors:
            sys.exit("\n".join(["error: unknown config field"] + errors))
    return flags.FLAGS(argv)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # libraries' INFO logs (Orbax's are many) on request only
        logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("sam3_jax").setLevel(std_logging.INFO)
    result = loop.train(_CONFIG.value, _WORKDIR.value)
    loop.log.info("done: %s", " | ".join(f"{k} {v:.4g}" for k, v in result.items()))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
