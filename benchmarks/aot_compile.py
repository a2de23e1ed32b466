"""Does a training config fit a TPU slice? Compiles the real train step for a TPU topology on a
machine without a TPU, and prints the TPU compiler's own per-chip memory and FLOP figures.

  pip install -e ".[tpu-aot]"      # libtpu: the TPU compiler, usable without a TPU
  python benchmarks/aot_compile.py --config=configs/video.py --topology=v5e:2x4 --mode=detector \\
      --config.data.num_frames=8 --config.mesh.frame=8 --config.mesh.shard_params=True

``--config`` and every ``--config.*`` override are ``train.py``'s; the step compiled is the one
``train.py`` runs (`sam3_jax.train.program`), traced with the TPU's kernel choices
(`sam3_jax.nn.platform`). ``--topology`` takes libtpu's names (``v5e:2x4``, ``v5p:2x2x1``,
``v6e:2x4``, ...). The global batch is ``data.batch_size`` x the slice's hosts, as a multi-host run
assembles it: libtpu's ``v5e:2x4`` has two hosts of 4 chips; ``--chips_per_host=2x4`` makes it the
single-host v5e-8. A step that does not fit is still compiled (libtpu's no-crash-on-OOM option), so
its figure comes back with ``fits: false``. Over a chip's memory that option can fail too (seen:
"Invalid TPU program", and an allocation larger than the chip); the step is then compiled as a pod
would compile it, and the peak is read from the compiler's refusal, the one figure it gives
(``refused: true``, the parts and flops null).

Prints a table, then as its last line one JSON object: topology, chips, hosts, device_kind, mode,
frames, shard_params, compile_s, per_chip_bytes (the compiler's peak where it reports one, else
arguments + outputs + temporaries - aliased), its parts, hbm_bytes (what the compiler lets one
program use of a chip's memory), fits, flops
(XLA's count for one chip's program, a loop body counted once), per_chip_param_bytes, refused.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own backend; the TPU is only a target
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: compiles may run side by side

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sam3_jax.train import overrides, validate  # noqa: E402

DEFAULT_CONFIG = "configs/video.py"
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Training config file[:variant].",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x4", "TPU topology as libtpu names it, e.g. v5e:2x4, v5p:2x2x1.")
_MODE = flags.DEFINE_enum("mode", None, ["detector", "tracker", "joint"], "Overrides config.mode.")
_CHIPS_PER_HOST = flags.DEFINE_string(
    "chips_per_host", "", "Chips of one host, e.g. 2x4 (a single-host v5e-8); default: libtpu's for the topology.")

GIB = 2**30
# The HBM one program may use on a chip, by jax's device_kind: what the TPU compiler's out-of-memory
# error reports as available (libtpu 0.0.42), a little under the chip's memory. A step fits when the
# compiler's peak is at most this: the compiler refuses it otherwise.
HBM_BYTES = {"TPU v4": int(15.25 * GIB), "TPU v5 lite": int(15.75 * GIB), "TPU v5": int(95.74 * GIB),
             "TPU v6 lite": int(31.25 * GIB)}
NO_CRASH_ON_OOM = {"xla_tpu_no_crash_on_oom": "true"}
PARTS = ("argument", "output", "alias", "temp", "generated_code")  # memory_analysis()'s *_size_in_bytes
# libtpu's out-of-memory refusal, e.g. "... the total memory required for HLO temporaries (17.54G)
# exceeds available HBM (15.75G)": G is GiB, the figure is the compiler's peak for one chip.
REFUSAL = re.compile(r"required for HLO temporaries \(([0-9.]+)G\) exceeds available HBM")


def parse_flags(argv):
    """Unknown ``--config.*`` fields are refused in one line each, before anything is built."""
    paths = overrides.override_paths(argv)
    if paths:
        config = overrides.load_config(overrides.config_spec(argv, DEFAULT_CONFIG))
        if errors := [e for e in (overrides.unknown_field(config, p) for p in paths) if e]:
            print("\n".join(errors), file=sys.stderr)
            sys.exit(2)
    return flags.FLAGS(argv)


def per_chip_bytes(memory) -> tuple[int, dict]:
    """(peak bytes a chip, the parts it is made of) from ``compiled.memory_analysis()``."""
    parts = {name: int(getattr(memory, f"{name}_size_in_bytes")) for name in PARTS}
    peak = getattr(memory, "peak_memory_in_bytes", 0) or (
        parts["argument"] + parts["output"] - parts["alias"] + parts["temp"])
    return int(peak), parts


def compile_or_refusal(lowered):
    """``(compiled, None)``, or ``(None, peak bytes)`` read from the compiler's refusal when not even
    no-crash-on-OOM gets a program out of it (module docstring)."""
    import jax

    try:
        return lowered.compile(NO_CRASH_ON_OOM), None
    except jax.errors.JaxRuntimeError as no_crash_error:
        print(f"no-crash-on-OOM compile failed ({str(no_crash_error).splitlines()[0][:200]}); "
              "compiling without it for the compiler's own figure", file=sys.stderr)
        try:
            return lowered.compile(), None
        except jax.errors.JaxRuntimeError as e:
            if refusal := REFUSAL.search(str(e)):
                return None, int(float(refusal.group(1)) * GIB)
            raise no_crash_error from e


def compile_step(config, topology: str, chips_per_host: str = "") -> dict:
    """Compiles ``config``'s train step for ``topology``; returns the figures (see module docstring)."""
    import jax
    from jax.experimental import topologies

    from sam3_jax.nn import platform
    from sam3_jax.train import mesh as mesh_lib
    from sam3_jax.train import program, sharding

    try:
        options = {}
        if chips_per_host:
            bounds = [int(n) for n in chips_per_host.split("x")]
            options["chips_per_host_bounds"] = bounds + [1] * (3 - len(bounds))
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **options)
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(f"--topology={topology} --chips_per_host={chips_per_host}: libtpu refuses it "
                         f"({str(e).splitlines()[0]})") from e
    devices = list(desc.devices)
    hosts = len({d.process_index for d in devices})
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.frame, devices=devices)
    global_batch = config.data.batch_size * hosts
    mesh_lib.check_divisible(mesh, global_batch, config.data.num_frames)
    start = time.perf_counter()
    with platform.target("tpu"):
        prog = program.build(config, mesh)
        with jax.set_mesh(mesh):
            lowered = prog.train_step.lower(prog.abstract_state, prog.abstract_batch(global_batch))
        compiled, refused_peak = compile_or_refusal(lowered)
    compile_s = time.perf_counter() - start
    if compiled is None:
        peak, parts, flops = refused_peak, dict.fromkeys(PARTS), None
    else:
        peak, parts = per_chip_bytes(compiled.memory_analysis())
        cost = compiled.cost_analysis()
        flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost).get("flops", 0.0))
    kind = devices[0].device_kind
    hbm = HBM_BYTES.get(kind)
    _, param_bytes = sharding.sharded_bytes(prog.abstract_params, prog.param_specs, mesh)
    return {"topology": topology, "chips": len(devices), "hosts": hosts, "device_kind": kind,
            "mode": config.mode, "frames": config.data.num_frames, "global_batch": global_batch,
            "mesh": dict(mesh.shape), "shard_params": bool(config.mesh.shard_params),
            "compile_s": round(compile_s, 1), "per_chip_bytes": peak,
            **{f"{name}_bytes": value for name, value in parts.items()},
            "per_chip_param_bytes": param_bytes, "hbm_bytes": hbm,
            "fits": None if hbm is None else peak <= hbm, "flops": flops, "refused": compiled is None}


def table(result: dict) -> str:
    def gib(key):
        return "-" if result[key] is None else f"{result[key] / GIB:.2f}"

    rows = [("topology", f"{result['topology']} ({result['chips']} x {result['device_kind']}, "
                         f"{result['hosts']} host(s))"),
            ("mode, frames, mesh", f"{result['mode']}, {result['frames']}, {result['mesh']}"),
            ("parameters sharded", str(result["shard_params"])),
            ("compile", f"{result['compile_s']:.1f} s"),
            ("per chip: peak", f"{gib('per_chip_bytes')} GiB" + (" (the compiler's refusal)" if result["refused"] else "")),
            ("  arguments / outputs / aliased", f"{gib('argument_bytes')} / {gib('output_bytes')} / {gib('alias_bytes')} GiB"),
            ("  temporaries", f"{gib('temp_bytes')} GiB"),
            ("  parameters", f"{gib('per_chip_param_bytes')} GiB"),
            ("chip HBM available", "unknown" if result["hbm_bytes"] is None else f"{gib('hbm_bytes')} GiB"),
            ("fits", str(result["fits"])),
            ("XLA flops (one chip)", "-" if result["flops"] is None else f"{result['flops']:.4g}")]
    return "\n".join(f"{name:<32} {value}" for name, value in rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if _MODE.value:
        with config.unlocked():
            config.mode = _MODE.value
    try:
        import libtpu  # noqa: F401
    except ImportError:
        print("libtpu is not installed: pip install -e \".[tpu-aot]\"", file=sys.stderr)
        sys.exit(2)
    try:
        validate.check(config)
        result = compile_step(config, _TOPOLOGY.value, _CHIPS_PER_HOST.value)
    except ValueError as e:  # a config the mesh or the model refuses: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
