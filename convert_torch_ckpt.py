"""Convert Meta's SAM 3 checkpoint (``sam3.pt``) into a sam3-jax checkpoint directory.

  python convert_torch_ckpt.py --torch_ckpt=sam3.pt --output_dir=ckpt/sam3 [--bpe_path=...]
"""
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("torch_ckpt", None, "Path of the official sam3.pt (or a state_dict file).")
flags.DEFINE_string("output_dir", None, "Directory to write (must not exist unless --overwrite).")
flags.DEFINE_string("bpe_path", None, "CLIP BPE vocabulary; defaults to the one shipped with sam3_jax.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output directory (atomically).")
flags.DEFINE_enum("preset", "official", ["official", "tiny"],
                  "Model size the checkpoint holds (tiny: the small test/demo model).")


def main(argv):
    del argv
    from sam3_jax.convert.sam3_checkpoint import convert_file
    from sam3_jax.model.config import ModelConfig

    cfg = getattr(ModelConfig, FLAGS.preset)()
    manifest = convert_file(FLAGS.torch_ckpt, FLAGS.output_dir, cfg=cfg, bpe_path=FLAGS.bpe_path,
                            overwrite=FLAGS.overwrite)
    print(f"wrote {FLAGS.output_dir}: " + ", ".join(f"{n} {k}" for k, n in sorted(manifest["summary"].items())))


if __name__ == "__main__":
    flags.mark_flags_as_required(["torch_ckpt", "output_dir"])
    app.run(main)
