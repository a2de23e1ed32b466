"""Train SAM 3 on video: ``python train.py --config=configs/video.py[:variant] --workdir=DIR``.

Override any config field with ``--config.<path>=value`` (e.g. ``--config.optim.lr.rest=1e-4``);
``--print_config`` prints the resolved config, every field, and exits. Running again with the same
``--workdir`` resumes from its newest checkpoint.
"""
from __future__ import annotations

import logging as std_logging
import os
import shutil
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sam3_jax.checkpoint import save_errors, training
from sam3_jax.data.errors import DataError
from sam3_jax.train import config as config_lib
from sam3_jax.train import loop, overrides, reporting, stop, validate

DEFAULT_CONFIG = "configs/video.py"
__doc__ += (f"\nVariants: configs/video.py:{{{','.join(config_lib.VIDEO_VARIANTS)}}} (default: default),\n"
            f"configs/image.py:{{{','.join(config_lib.IMAGE_VARIANTS)}}} (default: coco).\n")
_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, f"Training config file[:variant]; variants of configs/video.py: "
    f"{', '.join(config_lib.VIDEO_VARIANTS)}; of configs/image.py: {', '.join(config_lib.IMAGE_VARIANTS)}.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and config.json go (required).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (every field) and exit.")


def fail(*lines: str, code: int = 2):
    """A user's mistake (or a run that cannot go on): one line each, no traceback."""
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv):
    """Loads the config and checks every ``--config.*`` override against it before the flags are
    parsed, so that a mistyped file, variant, field or value is one line."""
    spec = overrides.config_spec(argv, DEFAULT_CONFIG)
    if not any(arg in ("--help", "-h", "--helpfull", "--helpshort") for arg in argv):
        try:
            config = overrides.load_config(spec)
        except (OSError, ValueError, KeyError) as e:
            fail(f"--config={spec}: {e}")
        errors = [e for e in (overrides.unknown_field(config, p) for p in overrides.override_paths(argv)) if e]
        if errors:
            fail("unknown config field", *errors)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config, workdir = _CONFIG.value, _WORKDIR.value
    if _PRINT_CONFIG.value:
        print(config.to_json_best_effort(indent=2, sort_keys=True))  # as config.json will hold it
        return
    if not workdir:
        fail("--workdir is required: the run's directory (a new one, or an earlier run's to resume it)")
    bad = validate.errors(config)
    if bad:
        fail(*bad)
    if not flags.FLAGS["verbosity"].present:  # libraries' INFO logs (Orbax's are many) on request only
        logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("sam3_jax").setLevel(std_logging.INFO)
    stop.install()
    with save_errors.failed_saves_reported_once():
        _train(config, workdir)


def _train(config, workdir: str) -> None:
    """Builds (or resumes) the run and trains it; every way it can end is one line or a summary."""
    created = not os.path.exists(workdir)
    trainer = None
    try:
        trainer = loop.start(config, workdir)
        step = int(trainer.state["step"])
        if step >= config.total_steps:
            loop.log.info("already finished at step %d (total_steps=%d) in %s: nothing to train; raise "
                          "--config.total_steps to go on", step, config.total_steps, workdir)
            return
        result = trainer.run()
    except (ValueError, OSError, KeyError, DataError) as e:
        if trainer is not None:
            raise  # a failure while training is a bug to trace, not a user's mistake
        if created:  # the data, init_from or the checkpoints do not fit: nothing of this run to keep
            shutil.rmtree(workdir, ignore_errors=True)
        hint = ""
        if isinstance(e, DataError):
            names = ", ".join(f"--config.data.sources.{name}.image_dir=..." for name in config.data.sources)
            hint = f" (point the config at your data: {names}, .annotations, .file_list)"
        fail(str(e).splitlines()[0] + hint)
    except (training.SaveError, loop.NonFiniteLoss) as e:
        fail(str(e), code=1)
    except KeyboardInterrupt as e:
        if trainer:  # the workers stop and unlink their shared memory now
            trainer.data.close()
        name = str(e) or "SIGINT"
        step = trainer.checkpoints.latest_step() if trainer else None
        where = f"its newest checkpoint is step {step}" if step else "no checkpoint was saved"
        print(f"stopped by {name}: {where} ({workdir}); the same command resumes it", file=sys.stderr)
        sys.exit(128 + getattr(signal, name, signal.SIGINT))
    loop.log.info("%s", reporting.summary(result, int(trainer.state["step"]), config.total_steps, workdir))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
