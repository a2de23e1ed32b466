"""Convert Meta's SAM 3 checkpoint (``sam3.pt``) into a sam3-jax checkpoint directory, and back.

  python convert_torch_ckpt.py --torch_ckpt=sam3.pt --output_dir=ckpt/sam3 [--bpe_path=...]
  python convert_torch_ckpt.py --direction=to_torch --checkpoint=ckpt/sam3 --torch_ckpt=out.pt
  python convert_torch_ckpt.py --direction=to_torch --checkpoint=WORKDIR --torch_ckpt=tuned.pt
  python convert_torch_ckpt.py --direction=from_run --run=WORKDIR --output_dir=ckpt/tuned [--checkpoint=ckpt/sam3]

``to_torch`` writes ``{"model": state_dict}`` with exactly the keys of the original file (dead
weights carried through, RoPE buffers recomputed), loadable by ``build_sam3_video_model``, from a
converted checkpoint or from a training run (its workdir: the newest step; ``WORKDIR/checkpoints_best``
or ``WORKDIR/checkpoints/STEP``). A run is exported with the key layout, dead weights and dtypes of the
converted checkpoint it started from (its ``init_from``), or, trained from scratch, with the layout
of its sizes (float32, the unused weights zero). ``from_run`` writes a run's parameters as a
converted checkpoint directory in the same way (``--checkpoint`` names another converted checkpoint
of the same sizes to take those from).

Every direction checks its output before the work (it must not exist unless ``--overwrite``, and its
folder must be writable) and refuses tensors holding NaN or Inf, naming each, unless
``--allow_nonfinite``. Errors print as one message, exit code 2.
"""
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("direction", "to_jax", ["to_jax", "to_torch", "from_run"],
                  "to_jax: --torch_ckpt -> --output_dir; to_torch: --checkpoint -> --torch_ckpt; "
                  "from_run: --run (+ --checkpoint) -> --output_dir.")
flags.DEFINE_string("torch_ckpt", None, "The official sam3.pt (or a state_dict file); the output with to_torch.")
flags.DEFINE_string("output_dir", None, "Directory to write (must not exist unless --overwrite).")
flags.DEFINE_string("checkpoint", None, "What to export (to_torch): a converted checkpoint or a training run's "
                    "workdir (or one of its checkpoints); from_run: a converted checkpoint of the run's sizes "
                    "(default: the one the run started from).")
flags.DEFINE_string("run", None, "A training run's workdir (from_run): its newest checkpoint's parameters (or "
                    "WORKDIR/checkpoints_best, WORKDIR/checkpoints/STEP).")
flags.DEFINE_string("bpe_path", None, "CLIP BPE vocabulary; defaults to the one shipped with sam3_jax.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output (directory, or --torch_ckpt file with to_torch), "
                  "atomically; a file is never replaced by a directory nor the reverse.")
flags.DEFINE_bool("allow_nonfinite", False, "Convert tensors holding NaN or Inf instead of refusing them "
                  "(the predictors still refuse such weights).")
flags.DEFINE_enum("preset", "official", ["official", "tiny"],
                  "Model and tracker sizes the checkpoint holds (tiny: the small test/demo model).")


def convert() -> str:
    """Does what the flags ask; returns the line to print."""
    if FLAGS.direction == "from_run":
        from sam3_jax.convert.from_run import write_from_run

        if FLAGS.run is None or FLAGS.output_dir is None:
            raise app.UsageError("--direction=from_run needs --run and --output_dir")
        manifest = write_from_run(FLAGS.run, FLAGS.checkpoint, FLAGS.output_dir, overwrite=FLAGS.overwrite,
                                  allow_nonfinite=FLAGS.allow_nonfinite)
        return f"wrote {FLAGS.output_dir}: {', '.join(manifest['trained']['models'])} from {FLAGS.run}"
    if FLAGS.torch_ckpt is None:
        raise app.UsageError("--torch_ckpt is required")
    if FLAGS.direction == "to_torch":
        from sam3_jax.convert.export import write_torch

        if FLAGS.checkpoint is None:
            raise app.UsageError("--direction=to_torch needs --checkpoint")
        n = write_torch(FLAGS.checkpoint, FLAGS.torch_ckpt, overwrite=FLAGS.overwrite,
                        allow_nonfinite=FLAGS.allow_nonfinite)
        return f"wrote {FLAGS.torch_ckpt}: {n} keys"
    from sam3_jax.convert.sam3_checkpoint import convert_file
    from sam3_jax.model.config import ModelConfig
    from sam3_jax.model.tracker.config import TrackerConfig

    if FLAGS.output_dir is None:
        raise app.UsageError("--output_dir is required")
    manifest = convert_file(FLAGS.torch_ckpt, FLAGS.output_dir, cfg=getattr(ModelConfig, FLAGS.preset)(),
                            tracker_cfg=getattr(TrackerConfig, FLAGS.preset)(), bpe_path=FLAGS.bpe_path,
                            overwrite=FLAGS.overwrite, allow_nonfinite=FLAGS.allow_nonfinite)
    return f"wrote {FLAGS.output_dir}: " + ", ".join(f"{n} {k}" for k, n in sorted(manifest["summary"].items()))


def main(argv):
    """A bad input file, a refused output or a full disk is reported as its message alone (the list
    of offending keys, one a line), exit code 2; anything else is a bug and keeps its traceback."""
    del argv
    from sam3_jax import fileio

    try:
        print(convert())
    except ValueError as e:  # ConversionError, CheckpointFormatError, NonFiniteError, from_run's refusals
        print(f"convert_torch_ckpt: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # missing or existing paths, permissions, disk full
        print(f"convert_torch_ckpt: error: {fileio.describe_os_error(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
