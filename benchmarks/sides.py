"""Each benchmark runs its JAX and PyTorch sides in separate processes (so that peak memory is each
side's own): the script calls itself with the side's flags, and the side prints one RESULT line."""
from __future__ import annotations

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
    with its stderr's tail, naming ``what``, when it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, os.path.abspath(script), *flags], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(PREFIX)]
    if proc.returncode or not lines:
        sys.exit(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(PREFIX):])
