"""The training tasks ``config.mode`` picks, the models, loss parts and val_* metrics each brings, and
the program built from them."""
import jax
import pytest

from sam3_jax.train import config as config_lib
from sam3_jax.train import loop, program, tasks
from sam3_jax.train import mesh as mesh_lib

DETECTOR_METRICS = ["loss", "top1_precision", "best_box_iou", "presence_accuracy", "mask_iou",
                    "box_ap", "box_ap50", "mask_ap", "mask_ap50"]


@pytest.mark.parametrize("mode,names,models", [("detector", ["detector"], ("detector",)),
                                               ("tracker", ["tracker"], ("detector", "tracker")),
                                               ("joint", ["detector", "tracker"], ("detector", "tracker"))])
def test_mode_picks_the_tasks_and_their_models(mode, names, models):
    picked = tasks.tasks_for(mode)
    assert [task.name for task in picked] == names
    assert tasks.models(picked) == models


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode='both': one of detector, tracker, joint"):
        tasks.tasks_for("both")


def test_each_task_names_its_metrics():
    config = config_lib.tracker_demo_config()
    detector, tracker = tasks.DetectorTask(), tasks.TrackerTask()
    config.eval.coco_max_detections = 100
    assert detector.metric_names(config) == DETECTOR_METRICS
    config.eval.coco_max_detections = 0
    assert detector.metric_names(config) == DETECTOR_METRICS[:5]
    config.eval.jf_protocol = "clips"
    assert tracker.metric_names(config) == ["j", "f", "jf"]
    config.eval.jf_protocol = "videos"
    assert tracker.metric_names(config) == ["video_j", "video_f", "video_jf"]
    config.mode = "joint"
    assert loop.eval_metrics(config) == [f"val_{name}" for name in DETECTOR_METRICS[:5] + ["video_j", "video_f",
                                                                                           "video_jf"]]
    config.mode = "detector"
    assert loop.eval_metrics(config) == [f"val_{name}" for name in DETECTOR_METRICS[:5]]


def test_loss_parts_compose():
    config = config_lib.tracker_demo_config()
    model_cfg = program.model_config(config)
    cfgs = {"detector": model_cfg, "tracker": program.tracker_config(config, model_cfg)}
    assert tasks.loss_parts(tasks.tasks_for("detector"), config, cfgs) == {"detect": True, "clip_stage": None}
    tracker = tasks.loss_parts(tasks.tasks_for("tracker"), config, cfgs)
    assert tracker["detect"] is False and callable(tracker["clip_stage"])
    joint = tasks.loss_parts(tasks.tasks_for("joint"), config, cfgs)
    assert joint["detect"] is True and callable(joint["clip_stage"])


@pytest.mark.parametrize("mode", config_lib.MODES)
def test_program_holds_the_models_of_its_tasks(mode):
    config = config_lib.tracker_demo_config()
    config.mode = mode
    prog = program.build(config, mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1]))
    assert [task.name for task in prog.tasks] == [task.name for task in tasks.tasks_for(mode)]
    assert tuple(prog.abstract_params) == tasks.models(prog.tasks)
    assert tuple(prog.abstract_state["params"]) == tasks.models(prog.tasks)
    assert (prog.tracker_cfg is None) == (mode == "detector")


@pytest.mark.parametrize("mode,frame", [("detector", 4), ("tracker", 2), ("joint", 2)])
def test_the_mesh_splits_objects_where_a_task_tracks(mode, frame):
    """mesh.frame=-1 takes the largest split of the clip's 4 frames, and where the tracker trains
    also of its 2 objects (split over "frame" too)."""
    from sam3_jax.train import mesh_plan

    config = config_lib.video_config("tracker_demo")
    config.mode = mode
    config.mesh.update(dict(data=1, frame=-1))
    config.data.update(dict(num_frames=4, max_objects=2))
    assert dict(mesh_plan.make_mesh(config).shape) == {"data": 1, "frame": frame}
