"""The failures a long fine-tune meets, as its operator meets them: every config value checked before
anything compiles, a failed save stops the run in one line, a corrupt newest checkpoint is set aside,
config.json follows the checkpoints, kills leave no data workers or shared memory behind, and every
mistake on train.py's command line is one line with exit code 2."""
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.checkpoint import finite, training
from sam3_jax.train import loop, mesh_plan, overrides, reporting, validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tiny demo on 2-frame clips of one video, a checkpoint every step. Every run here trains the
# same program (total_steps is part of it: the lr schedule), so the shared compilation cache
# compiles it once.
SMALL = ["--config=configs/video.py:demo", "--config.total_steps=1000", "--config.log_every=1",
         "--config.checkpoint_every=1", "--config.eval.every=0", "--config.data.num_frames=2",
         "--config.data.batch_size=1", "--config.data.max_phrases=2"]


def _env(devices: int = 1):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The generated videos and the compilation cache every run of this module shares."""
    root = tmp_path_factory.mktemp("shared")
    return [f"--config.data.synthetic.output_dir={root / 'videos'}", f"--config.compilation_cache_dir={root / 'xla'}"]


def _train(*args, env=None):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _small(workdir, shared, *extra):
    """A training run whose output (stdout and stderr) goes to a file, never a pipe left unread
    while the test waits (a full pipe would block the trainer's logging)."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *SMALL, *shared, *extra], cwd=REPO,
                            env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _output(proc, timeout=900) -> str:
    proc.wait(timeout=timeout)
    proc.log.seek(0)
    return proc.log.read()


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (Grain's workers, multiprocessing's resource tracker)."""
    out = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out |= {int(entry)} | _children(int(entry))
    return out


def _alive(pids) -> set[int]:
    def live(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    return {p for p in pids if live(p)}


def _wait_for(condition, proc, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.05)
    assert proc.poll() is None, _output(proc)
    assert condition()


def _gone(pids, shm_before, timeout=15):
    """No descendant left, no new shared memory: waits for them to go."""
    deadline = time.time() + timeout
    while time.time() < deadline and (_alive(pids) or set(os.listdir("/dev/shm")) - shm_before):
        time.sleep(0.1)
    return not _alive(pids) and not set(os.listdir("/dev/shm")) - shm_before


# --------------------------------------------------------------------------------------- in-process
def test_every_bad_value_is_one_line():
    config = overrides.load_config(os.path.join(REPO, "configs/video.py:demo"))
    assert validate.errors(config) == []
    config.total_steps, config.checkpoint_every, config.log_every, config.keep_checkpoints = 0, -3, 0, 0
    config.nonfinite, config.mode, config.optim.schedule = "ignore", "both", "linear"
    config.eval.keep_best_mode, config.data.mask_size, config.mesh.frame = "best", 12, 0
    assert validate.errors(config) == [
        "total_steps=0: must be an integer >= 1", "checkpoint_every=-3: must be an integer >= 1",
        "log_every=0: must be an integer >= 1", "keep_checkpoints=0: must be an integer >= 1",
        "nonfinite='ignore': must be one of 'skip', 'stop'",
        "mode='both': must be one of 'detector', 'tracker', 'joint'",
        "optim.schedule='linear': must be one of 'inverse_sqrt', 'cosine'",
        "eval.keep_best_mode='best': must be one of 'max', 'min'",
        "mesh.frame=0: must be a positive number of devices or -1 (as many as fit)",
        "data.mask_size=12: must be a positive multiple of 8 (masks travel bit-packed)"]
    assert validate.mesh_errors(-1, -1) == ["mesh.data=-1 and mesh.frame=-1: at most one of them may be -1; "
                                            "give the other a size"]
    assert validate.mesh_errors(-2, 1) == ["mesh.data=-2: must be a positive number of devices or -1 (as many as fit)"]
    with pytest.raises(validate.ConfigError, match="total_steps=0"):
        loop.start(config, "/nonexistent/never/created")
    assert not os.path.exists("/nonexistent/never/created")


def test_mesh_fits_the_batch(caplog):
    """-1 takes the largest split of the batch (data) or the frames (frame) that the devices allow."""
    assert mesh_plan.axis_sizes(-1, 1, 8, 2, 4) == (2, 1)  # the demo's batch of 2 on 8 devices
    assert mesh_plan.axis_sizes(-1, 1, 8, 16, 4) == (8, 1)
    assert mesh_plan.axis_sizes(-1, 2, 8, 6, 4) == (3, 2)
    assert mesh_plan.axis_sizes(2, -1, 8, 2, 8) == (2, 4)
    assert mesh_plan.axis_sizes(1, -1, 8, 1, 6) == (1, 6)
    assert mesh_plan.axis_sizes(-1, 1, 1, 2, 4) == (1, 1)
    with pytest.raises(ValueError, match="mesh.frame=16 is more than the 8 devices"):
        mesh_plan.axis_sizes(-1, 16, 8, 2, 4)
    config = overrides.load_config(os.path.join(REPO, "configs/video.py:tracker_demo"))  # batch 2, 8 devices
    with caplog.at_level(logging.INFO, logger="sam3_jax"):
        mesh = mesh_plan.make_mesh(config)
    assert dict(mesh.shape) == {"data": 2, "frame": 1} and mesh.devices.size == 2
    assert "mesh: data=2 x frame=1 on 2 of the 8 devices (the largest split of a global batch of 2 clips); " \
           "6 stay idle" in caplog.text


def _state(scale):
    return {"x": jnp.full((64,), scale, jnp.float32), "big": jax.random.normal(jax.random.key(int(scale)), (4096,))}


ABSTRACT = {"x": jax.ShapeDtypeStruct((64,), jnp.float32), "big": jax.ShapeDtypeStruct((4096,), jnp.float32)}


def test_corrupt_newest_checkpoint_is_set_aside(tmp_path, caplog):
    ckpt = training.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, _state(float(step)))
    ckpt.close()
    for step in (2, 3):  # the two newest: a data file cut short, as by a full disk or a dying host
        files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "checkpoints" / str(step) / "state") for f in fs
                 if os.sep + "d" + os.sep in os.path.join(d, f)]
        with open(max(files, key=os.path.getsize), "r+b") as f:
            f.truncate(10)
    ckpt = training.Checkpointer(str(tmp_path / "checkpoints"))
    with caplog.at_level(logging.WARNING, logger="sam3_jax"):
        restored = ckpt.restore_latest(ABSTRACT)
    np.testing.assert_array_equal(restored["x"], np.full(64, 1.0))
    assert ckpt.latest_step() == 1 and sorted(os.listdir(tmp_path / "checkpoints_corrupt")) == ["2", "3"]
    lines = [r.getMessage() for r in caplog.records]
    for line, step in zip(lines, (3, 2), strict=True):  # one line each, the newest first
        assert line.startswith(f"checkpoint {tmp_path / 'checkpoints' / str(step)} is unreadable (")
        assert line.endswith(f"moved to {tmp_path / 'checkpoints_corrupt' / str(step)}; resuming from step 1")
    ckpt.save(2, _state(5.0))  # the step a resumed run reaches again saves normally
    ckpt.wait()
    assert ckpt.latest_step() == 2
    ckpt.close()


def test_rejected_state_is_not_corruption(tmp_path):
    """Not one step reads: the config differs, the files are fine and stay where they are."""
    ckpt = training.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, _state(1.0))
    with pytest.raises(ValueError, match="another layout"):
        ckpt.restore_latest({"y": ABSTRACT["x"]})
    assert os.listdir(tmp_path) == ["1"]
    ckpt.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tiny tmpfs to fill")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # TensorStore's late callbacks
def test_failed_background_save_is_one_error(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ckpt = training.Checkpointer(str(disk / "checkpoints"))
        ckpt.save(1, _state(1.0))
        ckpt.wait()
        big = {"x": jnp.zeros((64,)), "big": jax.random.normal(jax.random.key(0), (1 << 17,))}  # 512 KB
        ckpt.save(2, big)
        deadline = time.time() + 60
        with pytest.raises(training.SaveError) as error:
            while time.time() < deadline:  # as the trainer does once a step
                ckpt.check()
                time.sleep(0.05)
        assert str(error.value) == (f"step 2: saving the checkpoint {disk / 'checkpoints' / '2'} failed: "
                                    "no space left on device")
        assert ckpt.latest_step() == 1
        ckpt.wait()  # reported once: the end of the run does not raise it again
        ckpt.close()
        reopened = training.Checkpointer(str(disk / "checkpoints"))
        assert reopened.latest_step() == 1 and [s for s in os.listdir(disk / "checkpoints") if s.isdigit()] == ["1"]
        np.testing.assert_array_equal(reopened.restore_latest(ABSTRACT)["x"], np.ones(64))
        reopened.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_config_json_keeps_the_earlier_one(tmp_path):
    config = overrides.load_config(os.path.join(REPO, "configs/video.py:demo"))
    loop.write_config(config, str(tmp_path))
    first = (tmp_path / "config.json").read_text()
    loop.write_config(config, str(tmp_path), 40)  # resumed unchanged: nothing kept
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    config.log_every = 7
    loop.write_config(config, str(tmp_path), 40)
    assert (tmp_path / "config.40.json").read_text() == first
    assert json.loads((tmp_path / "config.json").read_text())["log_every"] == 7


def test_summary_is_a_short_table():
    text = reporting.summary({"loss": 1.5, "loss_ce": 0.2, "lr": 1e-4, "val_jf": 0.25, "frames_per_s": 3.0},
                             300, 300, "/runs/a")
    assert text.splitlines() == ["finished at step 300 of 300 in /runs/a:", "  loss          1.5",
                                 "  lr            0.0001", "  frames_per_s  3", "  val_jf        0.25",
                                 "  (every value: /runs/a/metrics.jsonl)"]


# ------------------------------------------------------------------------------------ train.py runs
def test_command_line_mistakes_are_one_line(tmp_path):
    """Each mistake: exit code 2, one ``error:`` line per problem, no traceback, no workdir left."""
    work = str(tmp_path / "run")
    cases = {
        "--workdir is required": ["--config=configs/video.py:demo"],
        "unknown variant 'demoo'; one of default, demo": ["--config=configs/video.py:demoo", f"--workdir={work}"],
        "flag --config.total_steps=abc: invalid literal for int()": [
            "--config=configs/video.py:demo", f"--workdir={work}", "--config.total_steps=abc"],
        "config.optim has no field 'lrr'": ["--config=configs/video.py:demo", f"--workdir={work}",
                                            "--config.optim.lrr=1"],
        "total_steps=0: must be an integer >= 1\nerror: checkpoint_every=-3: must be an integer >= 1\n"
        "error: nonfinite='ignore'": ["--config=configs/video.py:demo", f"--workdir={work}", "--config.total_steps=0",
                                      "--config.checkpoint_every=-3", "--config.nonfinite=ignore",
                                      "--config.mesh.data=-1", "--config.mesh.frame=-1"],
        "cannot read video list": ["--config=configs/video.py:davis", f"--workdir={work}"],
    }
    procs = {expected: _train(*args) for expected, args in cases.items()}
    helped = _train("--help")
    printed = _train("--config=configs/video.py:demo", "--print_config", "--config.seed=7")
    for expected, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (expected, err)
        assert "Traceback" not in err and err.startswith("error: ") and expected in err, (expected, err)
        assert all(line.startswith("error: ") for line in err.splitlines()), err
    assert not os.path.exists(work)  # not even the failed start of :davis left its workdir
    out, _ = helped.communicate(timeout=300)
    assert "tracker_demo" in out and "--print_config" in out
    out, _ = printed.communicate(timeout=300)
    config = json.loads(out)
    assert printed.returncode == 0 and config["seed"] == 7 and config["model"]["vit"]["depth"] > 0


@pytest.mark.slow
def test_kills_leave_nothing_and_resume(tmp_path, shared):
    """kill -9 with 2 data workers: they, the resource tracker and their shared memory go too. The
    newest checkpoint, cut short, is set aside and the run resumes from the one before, keeping the
    config it ran with; SIGTERM then stops it in one line; a config its checkpoint rejects leaves
    config.json as it was; a finished run says so."""
    run = tmp_path / "run"
    shm = set(os.listdir("/dev/shm"))
    proc = _small(run, shared, "--config.data.num_workers=2")
    _wait_for(lambda: os.path.isdir(run / "checkpoints" / "2"), proc)
    family = _children(proc.pid)
    assert len(family) >= 2  # the workers (and the resource tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _gone(family, shm)

    steps = sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
    newest = run / "checkpoints" / str(steps[-1])
    data = [os.path.join(d, f) for d, _, fs in os.walk(newest / "state") for f in fs if f"{os.sep}d{os.sep}" in os.path.join(d, f)]
    with open(max(data, key=os.path.getsize), "r+b") as f:
        f.truncate(10)
    proc = _small(run, shared, "--config.data.num_workers=2", "--config.log_every=2")
    _wait_for(lambda: (run / f"config.{steps[-2]}.json").exists() and os.path.isdir(run / "checkpoints" / str(steps[-1])), proc)
    family = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    err = _output(proc, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err, err
    assert f"checkpoint {newest} is unreadable" in err and f"resuming from step {steps[-2]}" in err
    assert f"stopped by SIGTERM: its newest checkpoint is step" in err
    assert os.listdir(run / "checkpoints_corrupt") == [str(steps[-1])]
    assert json.loads((run / f"config.{steps[-2]}.json").read_text())["log_every"] == 1
    assert _gone(family, shm)

    config_json = (run / "config.json").read_text()
    rejected = _small(run, shared, "--config.model.decoder.num_queries=8")
    err = _output(rejected)
    assert rejected.returncode == 2 and "Traceback" not in err and err.count("error: ") == 1, err
    assert (run / "config.json").read_text() == config_json and os.listdir(run / "checkpoints_corrupt") == [str(steps[-1])]

    workers = _small(run, shared)  # resumed with another data.num_workers: the saved position does not fit
    err = _output(workers)
    assert workers.returncode == 2 and "resume with the data.num_workers" in err and "Traceback" not in err, err
    done = _small(run, shared, "--config.data.num_workers=2", "--config.total_steps=1")
    err = _output(done)
    assert done.returncode == 0 and "already finished at step" in err and "(total_steps=1)" in err, err


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tiny tmpfs to fill")
def test_full_disk_stops_the_run_in_one_line(tmp_path, shared):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = _small(disk / "run", shared)  # the first checkpoint (~55 MB) does not fit
        err = _output(proc)
    finally:
        subprocess.run(["umount", "-l", str(disk)])
    assert proc.returncode == 1, err
    assert f"error: step 1: saving the checkpoint {disk / 'run' / 'checkpoints' / '1'} failed: " \
           "no space left on device" in err
    assert "Traceback" not in err and "Event loop is closed" not in err and len(err.splitlines()) < 20, err


def test_nonfinite_init_from_is_refused_naming_the_parameter(tmp_path):
    """A checkpoint with a NaN weight does not start a run (which would train NaN steps and write
    NaN checkpoints): ``init_from`` names the parameter."""
    from sam3_jax.model import detector
    from sam3_jax.train import config as config_lib
    from sam3_jax.train import program

    config = config_lib.video_config("demo")
    config.data.synthetic.output_dir = str(tmp_path / "videos")
    params = detector.init_params(program.model_config(config), jax.random.key(0))
    params["transformer"]["decoder"]["query_embed"]["embedding"] = (
        params["transformer"]["decoder"]["query_embed"]["embedding"].at[0, 0].set(jnp.nan))
    source = training.Checkpointer(str(tmp_path / "source"), async_save=False)
    source.save(1, {"params": {"detector": params}})
    source.close()
    config.init_from = str(tmp_path / "source")
    with pytest.raises(finite.NonFiniteError, match="detector/transformer/decoder/query_embed/embedding"):
        loop.Trainer(config, str(tmp_path / "run"))
