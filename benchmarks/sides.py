"""Each benchmark runs its JAX and PyTorch sides in separate processes (so that peak memory is each
side's own): the script calls itself with the side's flags, and the side prints one RESULT line."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "RESULT "


def emit(result: dict) -> None:
    """In the side's process: hand the result to the caller."""
    print(PREFIX + json.dumps(result))


def run(script: str, flags: list[str], what: str) -> dict:
    """Runs ``script`` with ``flags`` (the repository importable) and returns what it emitted; exits
    naming ``what`` when it fails. The side's stderr goes straight to ours, so its progress (e.g.
    ``JAX_LOG_COMPILES=1`` during a long GPU compile) and its errors show as they happen."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, os.path.abspath(script), *flags], stdout=subprocess.PIPE, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(PREFIX)]
    if proc.returncode or not lines:
        sys.exit(f"{what} failed (exit status {proc.returncode}; its stderr is above)")
    return json.loads(lines[-1][len(PREFIX):])


def add_flags(parser) -> None:
    """The flags every two-sided benchmark takes."""
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads for the reference (0: torch's default). On a CPU shared with "
                             "other work its OpenMP threads wait on each other: 1 is then the fair setting")
    parser.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)  # internal: one side


def over_object_counts(script: str, args, run_jax, run_torch, flags: list[str]):
    """Both sides for each of ``args.objects`` (comma-separated counts): [(objects, jax, torch)]. In a
    side's own process (``args.side`` set) it runs that side for the one count, emits, returns None."""
    counts = [int(c) for c in args.objects.split(",")]
    if args.side:
        emit((run_jax if args.side == "jax" else run_torch)(args, counts[0]))
        return None
    rows = []
    for objects in counts:
        common = [f"--objects={objects}", f"--torch-threads={args.torch_threads}", *flags]
        res = {side: run(script, [f"--side={side}", *common], f"{side} run ({objects} objects)")
               for side in ("jax", "torch")}
        rows.append((objects, res["jax"], res["torch"]))
    return rows


def torch_reference(args):
    """In the PyTorch side's process: (torch, device) with the reference loaded, at
    ``args.torch_threads`` threads where given."""
    from sam3_jax.testing import reference

    torch = reference.load().torch
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    return torch, "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def converted_weights(script: str, flags: list[str]):
    """The weights both sides of a benchmark load, as a user's run loads them: ``script
    --convert-to=DIR`` (a process of its own, calling `convert_random_weights`) writes them; yields
    the converted directory (its ``sam3.pt`` beside it), removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="bench_weights_")
    try:
        yield run(script, [f"--convert-to={tmp}", *flags], "weight conversion")["checkpoint"]
    finally:
        shutil.rmtree(tmp)


def convert_random_weights(model_cfg, tracker_cfg, directory: str) -> str:
    """Random reference weights (the parity tests' seeds) saved as a video-model ``sam3.pt`` in
    ``directory`` and converted by our converter beside it; returns the converted directory."""
    from sam3_jax.testing import reference
    from sam3_jax.testing.parity import randomize_

    image_model = reference.build_image_model(model_cfg)
    randomize_(image_model, seed=3)
    return reference.convert_video_models(image_model, reference.build_tracker(tracker_cfg, seed=7), directory,
                                          model_cfg, tracker_cfg)


def reference_models(checkpoint: str, model_cfg, tracker_cfg, torch):
    """(image model, tracker) of the reference, holding the weights of the ``sam3.pt`` beside the
    converted ``checkpoint``; the image model scores boxes jointly where ``model_cfg`` says so."""
    from sam3_jax.testing import reference

    image_model = reference.build_image_model(model_cfg, joint_box_scores=model_cfg.joint_box_scores)
    tracker = reference.build_tracker(tracker_cfg)
    weights = torch.load(os.path.join(os.path.dirname(checkpoint), "sam3.pt"))["model"]
    for prefix, module in (("detector.", image_model), ("tracker.", tracker)):
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    return image_model, tracker
