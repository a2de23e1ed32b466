"""The trainer's held-out J&F under ``eval.jf_protocol="videos"`` is the figure ``predict_video`` and
``evaluate --metric=jf`` give for the same step's checkpoint on the same held-out videos; "videos" is
refused on eval sources it cannot read."""
import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from sam3_jax import evaluate, predict_video
from sam3_jax.train import config as config_lib
from sam3_jax.train import loop


def _videos_config(data_dir):
    """The tracker demo (whole held-out videos) on 4 generated videos of 3 frames (1 held out), its
    compiled steps shared through a compilation cache: the video predictor's compile, the test's
    main cost, is paid once for the trainer and predict_video."""
    config = config_lib.tracker_demo_config()
    config.data.synthetic.update(dict(output_dir=str(data_dir), num_videos=4, num_frames=3, size=64))
    config.compilation_cache_dir = str(data_dir / "xla")
    config.checkpoint_async = False
    return config, str(data_dir / "davis")


def test_videos_protocol_is_predict_video_plus_evaluate(tmp_path):
    config, davis = _videos_config(tmp_path / "data")
    workdir = str(tmp_path / "run")
    try:
        trainer = loop.start(config, workdir)
        assert loop.eval_metrics(config) == ["val_video_j", "val_video_f", "val_video_jf"]
        in_training = trainer.evaluate(0, None)
        trainer.checkpoints.save(0, trainer.state, trainer.data)
        trainer.checkpoints.wait()

        with open(f"{davis}/ImageSets/val.txt") as f:
            names = f.read().split()
        for name in names:
            predict_video.run(workdir, f"{davis}/JPEGImages/{name}", f"{davis}/Annotations/{name}/00000.png", 0,
                              str(tmp_path / "pred" / name), "both")
        offline = evaluate.run_jf(str(tmp_path / "pred"), davis, f"{davis}/ImageSets/val.txt")
    finally:  # the cache is this test's: later tests in the process compile without it
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
    assert 0 < offline["J&F"] < 1
    assert in_training == {"video_j": offline["J"], "video_f": offline["F"], "video_jf": offline["J&F"]}


def test_videos_protocol_needs_davis_layout_sources():
    config = config_lib.tracker_demo_config()
    config.eval.jf_protocol = "clips"
    assert loop.eval_metrics(config) == ["val_j", "val_f", "val_jf"]
    config.eval.jf_protocol = "videos"
    config.eval.sources.demo.kind = "ytvis"
    with pytest.raises(ValueError, match='eval.sources.demo has kind=.ytvis.*jf_protocol="clips"'):
        loop.check_jf_protocol(config)
    config.eval.jf_protocol = "video"
    with pytest.raises(ValueError, match="eval.jf_protocol='video': one of clips, videos"):
        loop.check_jf_protocol(config)
