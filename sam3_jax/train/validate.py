"""Every training config value checked before anything is compiled or written: ``errors(config)``
gives one line per bad field (ranges, enums, mesh sizes), ``check(config)`` raises them together.

The checks that need the model (sizes that must agree) stay with the code that builds it; these
are the ones a typo on the command line can break.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from sam3_jax.checkpoint import training
from sam3_jax.data.sources import KINDS
from sam3_jax.train import config as config_lib
from sam3_jax.train import param_groups

# (dotted field, rule, what the rule asks for): the integer ranges.
AT_LEAST = (("total_steps", 1), ("checkpoint_every", 1), ("log_every", 1), ("keep_checkpoints", 1),
            ("max_consecutive_nonfinite", 0), ("overlay_every", 0), ("eval.every", 0), ("eval.num_batches", 1),
            ("eval.coco_max_detections", 0), ("data.batch_size", 1), ("data.num_frames", 1),
            ("data.max_objects", 1), ("data.max_phrases", 1), ("data.num_workers", 0),
            ("data.worker_buffer_size", 1), ("data.num_threads", 1), ("data.prefetch_buffer_size", 1),
            ("data.max_retries", 0), ("optim.warmup_steps", 0), ("optim.accumulate_steps", 1))
# (dotted field, the values it may take).
ONE_OF = (("nonfinite", ("skip", "stop")), ("mode", config_lib.MODES),
          ("optim.schedule", ("inverse_sqrt", "cosine")), ("eval.keep_best_mode", training.BEST_MODES),
          ("data.on_error", ("raise", "skip")))


class ConfigError(ValueError):
    """One or more config values are invalid; the message has one line per bad field."""


def _get(config, path: str):
    node = config
    for key in path.split("."):
        if key not in node:
            return None
        node = node[key]
    return node


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ranges(config) -> list[str]:
    out = []
    for path, low in AT_LEAST:
        value = _get(config, path)
        if value is not None and (not _is_int(value) or value < low):
            out.append(f"{path}={value!r}: must be an integer >= {low}")
    for path, allowed in ONE_OF:
        value = _get(config, path)
        if value is not None and value not in allowed:
            out.append(f"{path}={value!r}: must be one of {', '.join(map(repr, allowed))}")
    return out


def mesh_errors(data, frame) -> list[str]:
    """``mesh.data`` and ``mesh.frame``: each a positive device count or -1 (the devices the other
    leaves, fitted to the batch); at most one of them -1."""
    out = []
    for name, value in (("data", data), ("frame", frame)):
        if not _is_int(value) or (value < 1 and value != -1):
            out.append(f"mesh.{name}={value!r}: must be a positive number of devices or -1 (as many as fit)")
    if data == -1 and frame == -1:
        out.append("mesh.data=-1 and mesh.frame=-1: at most one of them may be -1; give the other a size")
    return out


def _data(config) -> list[str]:
    data, out = config.data, []
    if _is_int(data.mask_size) and (data.mask_size < 8 or data.mask_size % 8):
        out.append(f"data.mask_size={data.mask_size}: must be a positive multiple of 8 (masks travel bit-packed)")
    if not data.sources:
        out.append("data.sources is empty: configure at least one dataset")
    for where, sources in (("data.sources", data.sources), ("eval.sources", config.eval.sources)):
        for name, source in sources.items():
            if source.kind not in KINDS:
                out.append(f"{where}.{name}.kind={source.kind!r}: must be one of {', '.join(map(repr, KINDS))}")
            if not source.weight > 0:
                out.append(f"{where}.{name}.weight={source.weight!r}: must be > 0")
    return out


def _optim(config) -> list[str]:
    """The parameter groups' rules against their lrs and weight decays; the regexes compile."""
    optim, out = config.optim, param_groups.group_errors(config.optim)
    for field in ("freeze", "layer_decay_exempt"):
        try:
            re.compile(optim[field])
        except (re.error, TypeError) as e:
            out.append(f"optim.{field}={optim[field]!r}: not a regex: {e}")
    return out


def _keep_best(config) -> list[str]:
    from sam3_jax.train import loop  # the trainer knows which val_* keys an evaluation writes

    if config.mode not in config_lib.MODES:  # no tasks to ask; `_ranges` names the mode
        return []
    try:
        loop.check_keep_best(config)
    except ValueError as e:
        return [str(e)]
    return []


CHECKS: tuple[Callable, ...] = (_ranges, lambda c: mesh_errors(c.mesh.data, c.mesh.frame), _data, _optim,
                                _keep_best)


def errors(config) -> list[str]:
    """One line per invalid field of a training config (empty when it is valid)."""
    return [line for check in CHECKS for line in check(config)]


def check(config) -> None:
    """Raises `ConfigError` listing every invalid field."""
    found = errors(config)
    if found:
        raise ConfigError("\n".join(found))
