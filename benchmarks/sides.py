"""Each benchmark runs its JAX and PyTorch sides in separate processes (so that peak memory is each
side's own): the script calls itself with the side's flags, and the side prints one RESULT line."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

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
