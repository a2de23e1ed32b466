"""Command-line overrides of a config (``--config.a.b=value``) checked against the config's fields.

ml_collections rejects an unknown field with a bare traceback; here the error names the override
and lists the fields valid at the level where the path went wrong.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path/to/file.py[:arg]`` -> ``get_config(arg)`` of that file, as ``--config`` loads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_config_module", path)
    if module_spec is None:
        raise FileNotFoundError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def config_spec(argv: Sequence[str], default: str, flag: str = "config") -> str:
    """The value of ``--<flag>=...`` (or ``--<flag> ...``) in argv."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def override_paths(argv: Sequence[str], flag: str = "config") -> list[str]:
    """The dotted paths of ``--<flag>.<path>[=value]`` arguments."""
    prefix = f"--{flag}."
    return [arg[len(prefix):].split("=", 1)[0] for arg in argv if arg.startswith(prefix)]


def unknown_field(config: ml_collections.ConfigDict, path: str) -> str | None:
    """None if ``path`` names a field of ``config``, else a message listing the valid keys."""
    node, walked = config, []
    for key in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"--config.{path}: {'.'.join(walked)} is a value, it has no field {key!r}"
        if key not in node:
            where = f"config.{'.'.join(walked)}" if walked else "config"
            return f"--config.{path}: {where} has no field {key!r}; valid keys: {', '.join(sorted(node.keys()))}"
        node = node[key]
        walked.append(key)
    return None
