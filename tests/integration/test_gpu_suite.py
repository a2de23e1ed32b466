"""``benchmarks/gpu_suite.py --smoke`` end to end: the suite that is run first whenever a GPU is at hand
must not be found broken on that day. Every part of the smoke list runs (tiny model) and leaves a
JSON line with finite, positive figures; a part that outruns the budget is killed and its line says
so; a mistaken budget is refused in one line."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.py")

# Figures each kind of part must report (device memory and MFU exist on GPUs only: null elsewhere).
REQUIRED = {
    "header": ("device_kind", "jax", "jaxlib", "torch", "cpus"),
    "train": ("step_s", "frames_per_s", "peak_rss_gib", "losses"),
    "image": ("latency_s", "peak_rss_gib"),
    "video": ("fps", "first_run_s", "first_frame_s", "objects_mean", "objects_max", "peak_rss_gib"),
    "weights": ("checkpoint",),
}


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _kind(name):
    return name.split("_")[0] if name.split("_")[0] in REQUIRED else name


def _check_numbers(where, value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_numbers(where, v)
        return
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{where}: {value}"


@pytest.mark.slow
def test_smoke_run_writes_every_part(tmp_path):
    out = tmp_path / "suite.jsonl"
    proc = subprocess.run([sys.executable, SUITE, "--smoke", f"--out={out}"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert not os.path.exists(f"{out}.tmp")
    parts = {(r["part"], r["side"]) for r in records}
    expected = {("header", "jax"), ("weights", "torch"), ("image", "jax"), ("image", "torch")}
    expected |= {(f"train_{mode}_2", side) for mode in ("detector", "tracker", "joint") for side in ("jax", "torch")}
    expected |= {(f"video_{task}_2", side) for task in ("track", "text") for side in ("jax", "torch")}
    assert parts == expected
    for r in records:
        where = f"{r['part']} ({r['side']})"
        assert r["status"] == "ok", (where, r.get("log_tail"))
        for key in REQUIRED[_kind(r["part"])]:
            assert r.get(key) is not None, (where, key)
        for key, value in r.items():
            if key not in ("cache_files_added", "objects_mean", "objects_max"):
                _check_numbers(f"{where} {key}", value)
        if r["part"].startswith("train") and r["side"] == "jax":
            assert r["compile_s"] > 0 and r["model_flops"] > 0
    header = records[0]
    assert header["part"] == "header" and header["xla_flags"] == "" and header["smoke"] is True
    assert os.path.isdir(header["cache_dir"]) and os.listdir(header["cache_dir"])  # one cache, filled


def test_bad_budget_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, SUITE, "--budget=-5", f"--out={tmp_path / 'x.jsonl'}"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_part_over_its_time_is_killed_and_said_so(tmp_path):
    """A part that outruns the budget is killed with its process group, its line says so, and the run
    ends within the budget (plus the kill's grace), the header's line kept."""
    out = tmp_path / "suite.jsonl"
    proc = subprocess.run([sys.executable, SUITE, "--smoke", "--parts=train_joint_2", "--budget=30", f"--out={out}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["part"], r["side"], r["status"]) for r in records] == [
        ("header", "jax", "ok"), ("train_joint_2", "jax", "timeout"),
        ("train_joint_2", "torch", "skipped: no time left")]
    assert records[1]["wall_s"] < 40 and (tmp_path / "suite_logs" / "train_joint_2_jax.log").exists()
