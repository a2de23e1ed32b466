"""``train.py`` as a user runs it: resume after a kill reproduces the uninterrupted run bit for bit
(the best checkpoint by a held-out metric included, the train step loaded from the compilation
cache), and a mistyped override is refused with the valid keys."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO

from sam3_jax.checkpoint import training

# A small, fast run: 1 device, 2-frame clips, a loss logged and a checkpoint saved every few steps.
SMALL = ["--config=configs/video.py:demo", "--config.total_steps=6", "--config.log_every=1",
         "--config.checkpoint_every=3", "--config.eval.every=0", "--config.mesh.data=1",
         "--config.data.num_frames=2", "--config.data.batch_size=1", "--config.data.max_phrases=2",
         "--config.checkpoint_async=False"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train(workdir, *extra, env=None):
    return subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *SMALL, *extra], cwd=REPO,
                            env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# Held-out evaluation every 2 steps (and at step 0), the best by val_best_box_iou kept.
EVAL = ["--config.eval.every=2", "--config.eval.num_batches=1", "--config.eval.keep_best=val_best_box_iou"]


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}


def _best(workdir):
    """(step, value) of the best val_best_box_iou after step 0, as metrics.jsonl has it."""
    scores = [(r["val_best_box_iou"], -r["step"]) for r in _records(workdir) if "val_best_box_iou" in r and r["step"]]
    value, step = max(scores)  # ties: the earliest step, which a later equal one does not replace
    return -step, value


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    data_dir = str(tmp_path / "videos")  # shared: both runs read the same generated videos
    # ...and one compilation cache: the later runs load the steps the first one compiled, which
    # must change nothing of what they compute.
    data = [f"--config.data.synthetic.output_dir={data_dir}", f"--config.compilation_cache_dir={tmp_path / 'xla'}"]
    whole = _train(tmp_path / "whole", *data, *EVAL)
    out, _ = whole.communicate(timeout=900)
    assert whole.returncode == 0, out
    assert os.listdir(tmp_path / "xla")

    run = tmp_path / "killed"
    killed = _train(run, *data, *EVAL)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline and killed.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= 4 for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert sorted(os.listdir(run / "checkpoints")) == ["3"]  # step 6 never saved

    resumed = _train(run, *data, *EVAL, env=_env() | {"JAX_DEBUG_LOG_MODULES": "jax._src.compiler"})
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    assert "Persistent compilation cache hit for 'jit_step'" in out
    expected = _losses(tmp_path / "whole")
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert _losses(run) == expected  # bitwise: the same float for every step
    record = next(r for r in _records(run) if "loss" in r)  # the first step's (the evaluation at step 0 has val_*)
    for key in ("step", "loss", "loss_ce", "presence_loss", "loss_mask_o2m", "lr", "lr/vision", "grad_norm",
                "frames_per_s", "skipped_samples"):
        assert key in record, key
    for name in ("config.json", "model.json", "tensorboard"):
        assert os.path.exists(run / name)
    best_step, best = _best(tmp_path / "whole")
    assert _best(run) == (best_step, best)
    assert [r["step"] for r in _records(run) if "val_box_ap" in r] == [0, 2, 4, 6]
    for workdir in (tmp_path / "whole", run):  # the best step is kept, with its metric; resume used the newest
        assert os.listdir(workdir / "checkpoints_best") == [str(best_step)]
        kept = training.BestCheckpointer(str(workdir / "checkpoints_best"), "val_best_box_iou")
        assert kept.best() == (best_step, pytest.approx(best))
        kept.close()


def test_unknown_override_is_refused(tmp_path):
    proc = _train(tmp_path, "--config.optim.lrr=1e-4")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "config.optim has no field 'lrr'" in out and "valid keys:" in out and "lr," in out
    assert not os.path.exists(tmp_path / "checkpoints")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_hosts_equal_one_host(tmp_path):
    """Multi-host training as on a GPU cluster or TPU pod, with two processes on this machine (2 CPU
    devices each, gloo collectives): each feeds its own slice of the data (batch 1 per host) into a
    data=2 x frame=2 mesh that spans both, and the losses equal one process with 4 devices reading
    the whole batch of 2; both save the step's checkpoint together and only the first writes logs."""
    common = [f"--config.data.synthetic.output_dir={tmp_path / 'videos'}", "--config.total_steps=2",
              "--config.checkpoint_every=2", "--config.mesh.data=2", "--config.mesh.frame=2",
              "--config.data.num_workers=0"]

    def launch(workdir, devices, *extra):
        env = {**_env(), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        return subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *SMALL, *common, *extra],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    one = launch(tmp_path / "one", 4, "--config.data.batch_size=2")
    out, _ = one.communicate(timeout=1200)
    assert one.returncode == 0, out
    cluster = ["--config.distributed=True", f"--config.cluster.coordinator_address=localhost:{_free_port()}",
               "--config.cluster.num_processes=2"]
    hosts = [launch(tmp_path / "two", 2, "--config.data.batch_size=1", *cluster, f"--config.cluster.process_id={i}")
             for i in range(2)]
    for host in hosts:
        out, _ = host.communicate(timeout=1200)
        assert host.returncode == 0, out
    expected, got = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in got] == [1, 2]
    for want, have in zip(expected, got):
        for key in ("loss", "loss_ce", "loss_bbox", "loss_mask", "presence_loss", "grad_norm", "num_boxes"):
            assert have[key] == pytest.approx(want[key], rel=1e-5), key
    assert os.listdir(tmp_path / "two" / "checkpoints") == ["2"]
