"""A joint run's held-out evaluation is its tasks' together: the trainer reports exactly the val_*
metrics `loop.eval_metrics` names (the detector's, then the tracker's J&F of the clips), and the
detector's overlay."""
from sam3_jax.train import config as config_lib
from sam3_jax.train import loop


class Recorder:
    """What the trainer hands its metrics writer."""

    def __init__(self):
        self.scalars_at, self.images_at = [], []

    def scalars(self, step, values):
        self.scalars_at.append((step, dict(values)))

    def images(self, step, images):
        self.images_at.append((step, sorted(images)))


def test_joint_evaluation_reports_every_tasks_metrics(tmp_path):
    config = config_lib.tracker_demo_config()
    config.mode = "joint"
    config.data.synthetic.update(dict(output_dir=str(tmp_path / "data"), num_videos=4, num_frames=3, size=64))
    config.data.num_frames = 3
    config.eval.update(dict(jf_protocol="clips", num_batches=1))
    config.overlay_every, config.checkpoint_async = 1, False
    trainer = loop.start(config, str(tmp_path / "run"))
    writer = Recorder()
    result = trainer.evaluate(0, writer)
    assert [f"val_{name}" for name in result] == loop.eval_metrics(config)
    assert writer.scalars_at == [(0, {f"val_{name}": value for name, value in result.items()})]
    assert writer.images_at == [(0, ["overlays/clip0"])]
