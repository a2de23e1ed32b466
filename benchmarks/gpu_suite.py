"""Every GPU benchmark question in one run that fits a short window, its figures kept as they come.

GPU time comes in windows of a few minutes, with nothing installed but JAX, PyTorch, Flax, Optax and
Orbax (``scripts/gpu_wheels.sh`` prepares the rest). This script runs the existing benchmarks
(``bench_train_step.py``, ``bench_detector.py``, ``bench_video.py``), one side of one benchmark at a time,
each in its own process group under its own time limit, most important first:

  1. the official detector train step (bf16, one 8-frame clip, one device);
  2. the tracker and joint train steps (8 frames, 3 objects);
  3. image predictor latency (one image, one prompt) and video predictor frames/s (1, 5, 20 objects);
  4. the PyTorch reference of each of those; then the train steps at 16 frames.

Each part may use at most its share of ``--budget`` and never more than what is left; one JSON line
per part (figures, or why there are none: timeout, failure, no time left) is written to ``--out``
as soon as the part ends (the whole file rewritten under a temporary name and renamed), so a run
killed midway keeps what finished. Every JAX process shares one persistent compilation cache
(``--cache_dir``), so a second run skips the compiles the first finished; compile time is reported
apart from step time. ``--xla_flags`` become the children's ``XLA_FLAGS`` (default: none) and the
header records them. Each part's output goes to a log beside ``--out``. ``--parts`` runs only the
parts named, each with all the budget left (e.g. a compile that outran its share, given the window).

  python benchmarks/gpu_suite.py --out=gpu/suite.jsonl [--budget=540] [--xla_flags=...]
  python benchmarks/gpu_suite.py --smoke --out=/tmp/smoke.jsonl    # tiny model, any machine
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import sides
from bench_train_step import peak_flops

HERE = os.path.dirname(os.path.abspath(__file__))
OBJECT_COUNTS = (1, 5, 20)
MIN_PART_S = 20  # a part is not started with less time than this left (smoke: 1 s)


@dataclasses.dataclass
class Part:
    """One side of one benchmark: ``script`` run with ``flags`` (``{checkpoint}`` filled in from the
    weights part), at most ``share`` of the budget; ``kind`` says how to read its RESULT line."""
    name: str
    side: str
    script: str
    flags: list[str]
    share: float
    kind: str
    frames: int = 0


def build_parts(args) -> list[Part]:
    """The parts in the order they run. ``--smoke``: the tiny model, 2-frame clips, short videos, one
    object count (2) per video task and no 16-frame steps, so that the whole list runs in minutes."""
    size = "tiny" if args.smoke else "official"
    frames = 2 if args.smoke else 8
    threads = ["--torch-threads=1"] if args.smoke else []
    counts = (2,) if args.smoke else OBJECT_COUNTS
    video = [f"--size={size}", f"--frames={4 if args.smoke else 16}", f"--repeats={1 if args.smoke else 2}"]

    def train(mode, side, n_frames, share):
        flags = [f"--mode={mode}", f"--size={size}", f"--frames={n_frames}", "--objects=3", "--dtype=bfloat16",
                 "--repeats=3", f"--side={side}", "--json", *threads]
        return Part(f"train_{mode}_{n_frames}", side, "bench_train_step.py", flags, share, "train", n_frames)

    def tracks(side, share):
        return [Part(f"video_{task}_{n}", side, "bench_video.py",
                     [f"--task={task}", f"--objects={n}", f"--side={side}", "--checkpoint={checkpoint}", *video,
                      *threads], share, "video") for task in ("track", "text") for n in counts]

    def image(side, share):
        return Part("image", side, "bench_detector.py", [f"--only={side}", f"--size={size}", "--dtype=bfloat16",
                                                         "--repeats=3", "--checkpoint={checkpoint}"], share, "image")

    parts = [Part("header", "jax", os.path.basename(__file__), ["--header"], 0.1, "header"),
             train("detector", "jax", frames, 0.7), train("tracker", "jax", frames, 0.4),
             train("joint", "jax", frames, 0.5),
             Part("weights", "torch", "bench_video.py", [f"--size={size}", "--convert-to={weights_dir}"], 0.3,
                  "weights"),
             image("jax", 0.15), *tracks("jax", 0.12),
             train("detector", "torch", frames, 0.2), train("tracker", "torch", frames, 0.2),
             train("joint", "torch", frames, 0.25), image("torch", 0.1), *tracks("torch", 0.1)]
    if not args.smoke:
        parts += [train(mode, "jax", 16, 0.4) for mode in ("tracker", "joint", "detector")]
    if args.parts:  # the header, the chosen parts and the weights they read
        wanted = {"header", *args.parts.split(",")}
        if any("{checkpoint}" in " ".join(p.flags) for p in parts if p.name in wanted):
            wanted.add("weights")
        parts = [p for p in parts if p.name in wanted]
    return parts


# ---------------------------------------------------------------------------------------- figures
def positive(x):
    """A device-memory figure, or None where the platform has none (a CPU reports 0)."""
    return x if x else None


def train_figures(part: Part, res: dict, done: dict) -> dict:
    """Compile and step time, frames/s, MFU and HFU over the card's dense bf16 peak (None off GPUs
    and on cards of unknown peak), peak memory. The reference's MFU uses the JAX side's model FLOPs."""
    r = res[part.side]
    out = {"step_s": r["step_s"], "frames_per_s": part.frames / r["step_s"] / r["devices"],
           "device_peak_gib": positive(r["device_peak_gib"]), "peak_rss_gib": r["peak_rss_gib"],
           "losses": r["losses"], "frames": part.frames}
    jax_side = r if part.side == "jax" else done.get((part.name, "jax"), {})
    header = done.get(("header", "jax"), {})
    peak = peak_flops(header.get("device_kind", "")) if header.get("platform") == "gpu" else None

    def util(flops):
        return flops / r["step_s"] / (peak * r["devices"]) if peak and flops else None

    out["mfu"] = util(jax_side.get("model_flops"))
    if part.side == "jax":
        out.update(compile_s=r["compile_s"], model_flops=r["model_flops"], step_flops=r["step_flops"],
                   hfu=util(r["step_flops"]), devices=r["devices"], device_kind=r["device_kind"])
    return out


def figures(part: Part, res: dict, done: dict) -> dict:
    if part.kind == "train":
        return train_figures(part, res, done)
    if part.kind == "image":
        out = {"latency_s": res["forward_s"], "device_peak_gib": positive(res["device_peak_gib"]),
               "peak_rss_gib": res["peak_rss_gib"]}
        return {**out, "compile_s": res["compile_s"]} if part.side == "jax" else out
    if part.kind == "video":
        keys = ("fps", "first_run_s", "first_frame_s", "objects_mean", "objects_max", "peak_rss_gib")
        return {**{k: res[k] for k in keys}, "device_peak_gib": positive(res["device_peak_gib"])}
    return res  # header, weights: as the child emitted them


# ------------------------------------------------------------------------------------------ header
def header() -> dict:
    """In a child process (it initialises the device): versions, device, its memory, the driver."""
    import importlib.metadata as md

    import jax

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    out = {"jax": jax.__version__, "jaxlib": version("jaxlib"), "torch": version("torch"),
           "sam3": version("sam3"), "python": platform.python_version(), "platform": dev.platform,
           "device_kind": dev.device_kind, "device": str(dev), "device_count": jax.device_count(),
           "bytes_limit": stats.get("bytes_limit"), "cpus": os.cpu_count(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    smi = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    out["nvidia_smi"] = command_output(smi).splitlines() if shutil.which("nvidia-smi") else None
    out["commit"] = command_output(["git", "rev-parse", "HEAD"]) or None
    return out


def command_output(cmd: list[str]) -> str:
    """What ``cmd`` printed, or "" where it is missing, fails or hangs."""
    try:
        return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ------------------------------------------------------------------------------------------ running
RUNNING = []  # the child now running, for the signal handler


def run_child(cmd: list[str], env: dict, cap: float, log_path: str) -> tuple[str, dict | None, int | None]:
    """Runs ``cmd`` in a process group of its own, output to ``log_path``, for at most ``cap``
    seconds; returns (status, its last RESULT, exit status). On timeout the whole group is killed
    (a benchmark's sides are its grandchildren) and waited for, so that the device is free again."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        RUNNING[:] = [proc]
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return "timeout", None, None
        finally:
            RUNNING.clear()
    with open(log_path) as log:
        lines = [line for line in log.read().splitlines() if line.startswith(sides.PREFIX)]
    if rc or not lines:
        return "failed", None, rc
    return "ok", json.loads(lines[-1][len(sides.PREFIX):]), rc


def on_signal(signum, frame):
    """Killed from outside (SIGTERM, SIGINT, SIGHUP): take the running part's process group along,
    since it is not in ours; what finished is already in --out."""
    for proc in RUNNING:
        kill_group(proc)
    sys.exit(128 + signum)


def kill_group(proc) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.2)
    proc.wait()


def tail(path: str, n: int = 15) -> list[str]:
    with open(path, errors="replace") as f:
        return f.read().splitlines()[-n:]


def count_files(directory: str) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


def write_lines(path: str, records: list[dict]) -> None:
    """The whole file, under a temporary name then renamed: a reader never sees half a line."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def child_env(args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [sides.ROOT, os.environ.get("PYTHONPATH")]))
    env["JAX_COMPILATION_CACHE_DIR"] = args.cache_dir
    env["PYTHONUNBUFFERED"] = "1"  # a killed part's log still shows how far it got
    if args.xla_flags:
        env["XLA_FLAGS"] = args.xla_flags
    if args.smoke:  # only the plumbing is under test: XLA's cheaper compile (benchmarks/README.md)
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    return env


def run_suite(args) -> list[dict]:
    start = time.monotonic()
    env = child_env(args)
    logs = os.path.splitext(args.out)[0] + "_logs"
    os.makedirs(logs, exist_ok=True)
    os.makedirs(args.cache_dir, exist_ok=True)
    weights_dir = tempfile.mkdtemp(prefix="gpu_suite_weights_")
    fill = {"weights_dir": weights_dir, "checkpoint": None}
    records, done = [], {}
    min_s = 1 if args.smoke else MIN_PART_S
    try:
        for part in build_parts(args):
            left = args.budget - (time.monotonic() - start)
            cap = left if args.parts or args.smoke else min(part.share * args.budget, left)
            rec = {"part": part.name, "side": part.side, "cap_s": round(max(cap, 0), 1)}
            if cap < min_s:
                rec["status"] = "skipped: no time left"
            elif "{checkpoint}" in " ".join(part.flags) and not fill["checkpoint"]:
                rec["status"] = "skipped: no converted weights (the weights part did not finish)"
            else:
                cmd = [sys.executable, os.path.join(HERE, part.script), *(f.format(**fill) for f in part.flags)]
                log = os.path.join(logs, f"{part.name}_{part.side}.log")
                cached = count_files(args.cache_dir)
                t0 = time.monotonic()
                status, res, rc = run_child(cmd, env, cap, log)
                rec.update(status=status, wall_s=round(time.monotonic() - t0, 2),
                           cache_files_added=count_files(args.cache_dir) - cached)
                if status == "ok":
                    done[(part.name, part.side)] = res
                    rec.update(figures(part, res, done))
                    if part.kind == "weights":
                        fill["checkpoint"] = res["checkpoint"]
                    if part.kind == "header":
                        rec.update(xla_flags=args.xla_flags, budget_s=args.budget, smoke=args.smoke,
                                   cache_dir=os.path.abspath(args.cache_dir),
                                   jax_disable_most_optimizations=args.smoke)
                else:
                    rec.update(exit_status=rc, log_tail=tail(log))
            records.append(rec)
            write_lines(args.out, records)
            print(f"[{time.monotonic() - start:6.0f} s] {part.name} ({part.side}): {rec['status']}", file=sys.stderr,
                  flush=True)
    finally:
        shutil.rmtree(weights_dir, ignore_errors=True)
    return records


def usage_error(message: str) -> None:
    print(f"gpu_suite: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON lines, one object per part, rewritten as each part ends")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 540; smoke: 1800)")
    parser.add_argument("--smoke", action="store_true",
                        help="every part at tiny size, each with all the budget left (a CPU: minutes)")
    parser.add_argument("--xla_flags", default="", help="XLA_FLAGS for every child (default: none)")
    parser.add_argument("--parts", help="comma-separated part names (e.g. train_detector_8): only those, each "
                                        "side, with all the budget that is left (default: every part, each its share)")
    parser.add_argument("--cache_dir", help="persistent compilation cache (default: jax_cache beside --out)")
    parser.add_argument("--header", action="store_true", help=argparse.SUPPRESS)  # internal: the header part
    args = parser.parse_args()
    if args.header:
        sides.emit(header())
        return
    if not args.out:
        usage_error("give --out=FILE (JSON lines)")
    if args.budget is None:
        args.budget = 1800 if args.smoke else 540
    if not (args.budget > 0 and math.isfinite(args.budget)):
        usage_error(f"--budget must be a positive number of seconds, got {args.budget}")
    known = {p.name for p in build_parts(argparse.Namespace(**{**vars(args), "parts": None}))}
    unknown = set(args.parts.split(",")) - known if args.parts else set()
    if unknown:
        usage_error(f"unknown --parts {sorted(unknown)}; the parts are {sorted(known)}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        usage_error(f"cannot create the folder of --out: {e}")
    args.cache_dir = args.cache_dir or os.path.join(out_dir, "jax_cache")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    records = run_suite(args)
    finished = sum(r["status"] == "ok" for r in records)
    print(f"{finished} of {len(records)} parts finished; figures in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
