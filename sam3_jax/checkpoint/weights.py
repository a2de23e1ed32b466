"""Weights as the predictors read them, from a converted checkpoint or from a training run.

A run is named by its workdir (its newest checkpoint), ``WORKDIR/checkpoints_best`` or one step
(``WORKDIR/checkpoints/<step>``); its model sizes are the ``model.json`` the trainer writes beside
``config.json``. A model the run does not train (the tracker of a detector run) is the one the run
started from: its ``init_from``'s, else the run's own random initialisation, and a warning says so.
Every layer stack comes scanned, only the models a predictor uses are read (an image predictor skips
the tracker), and weights holding NaN or Inf are refused, naming them.
"""
from __future__ import annotations

import json
import logging
import os
from typing import NamedTuple

import jax

from sam3_jax.checkpoint import converted, finite, restore
from sam3_jax.model import detector, tokenizer
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker import tracker as tracker_lib
from sam3_jax.model.tracker.config import TrackerConfig

MODEL = "model.json"  # beside a run's config.json: its model configs, under the manifest's keys
CONFIG = "config.json"
INITS = {"detector": detector.init_params, "tracker": tracker_lib.init_params}

log = logging.getLogger(__name__)


class Weights(NamedTuple):
    params: dict  # {"detector": ..., "tracker": ...} ("tracker" only when asked for and there is one)
    model_cfg: ModelConfig
    tracker_cfg: TrackerConfig | None
    vocab: str  # the tokenizer's BPE vocabulary file


def init_keys(seed: int) -> dict[str, jax.Array]:
    """The PRNG key each model of a run starting from scratch is initialised with."""
    return dict(zip(INITS, jax.random.split(jax.random.key(seed))))


def write_run_models(workdir: str, model_cfg: ModelConfig, tracker_cfg: TrackerConfig | None) -> None:
    """``WORKDIR/model.json``: the run's model sizes, what makes its workdir a checkpoint to predict with."""
    tracker_json = converted.config_to_json(tracker_cfg) if tracker_cfg is not None else None
    text = json.dumps({"model_config": converted.config_to_json(model_cfg), "tracker_config": tracker_json},
                      indent=1, sort_keys=True)
    path = os.path.join(workdir, MODEL)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read(directory: str, *, tracker: bool, allow_nonfinite: bool = False) -> Weights:
    """The weights in ``directory`` (a converted checkpoint, or a run as in the module docstring), the
    configs set to scan every stack. With ``tracker`` False, or sizes without one, params holds only
    "detector". Non-finite weights raise ``finite.NonFiniteError`` unless ``allow_nonfinite``."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory does not exist: {directory}")
    if os.path.isfile(os.path.join(directory, converted.MANIFEST)):
        manifest, workdir, vocab = converted.read_manifest(directory), None, os.path.join(directory, converted.VOCAB)
    else:
        workdir = run_dir(directory)
        with open(os.path.join(workdir, MODEL), encoding="utf-8") as f:
            manifest, vocab = json.load(f), tokenizer.DEFAULT_BPE_PATH
    stored_cfg, stored_tracker_cfg = converted.configs(manifest)
    cfg, tracker_cfg = stored_cfg, stored_tracker_cfg
    abstract = converted.abstract_params(cfg, tracker_cfg if tracker else None)
    if workdir is None:
        params = restore.load_params(directory, abstract)
    else:
        params = _read_run(directory, workdir, abstract, {"detector": stored_cfg, "tracker": stored_tracker_cfg})
    finite.check_finite(params, f"checkpoint {directory}", allow=allow_nonfinite)
    return Weights(params, cfg, tracker_cfg, vocab)


def run_dir(directory: str) -> str:
    """The workdir of the run ``directory`` is, or holds a checkpoint of (``model.json`` is there)."""
    for candidate in (directory, os.path.dirname(directory), os.path.dirname(os.path.dirname(directory))):
        if os.path.isfile(os.path.join(candidate, MODEL)):
            return candidate
    raise FileNotFoundError(f"{directory}: neither a converted checkpoint ({converted.MANIFEST}) nor a training run's "
                     f"directory ({MODEL} beside {CONFIG}, written by train.py)")


def _read_run(directory: str, workdir: str, abstract: dict, run_cfgs: dict) -> dict:
    """The run's parameters of the models in ``abstract``; those it does not hold, as it started them
    (initialised with the run's own configs, ``run_cfgs``, then laid out as ``abstract``)."""
    try:
        stored = restore.stored_models(directory)
    except ValueError:
        raise FileNotFoundError(f"{directory}: the run has written no checkpoint yet") from None
    params = restore.load_params(directory, {k: v for k, v in abstract.items() if k in stored})
    missing = sorted(abstract.keys() - stored)
    if not missing:
        return params
    with open(os.path.join(workdir, CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    init_from = config.get("init_from") or ""
    from_init = set(missing) & restore.stored_models(init_from) if init_from else set()
    if from_init:
        params.update(restore.load_params(init_from, {k: abstract[k] for k in from_init}))
    keys = init_keys(config.get("seed", 0))
    for name in sorted(set(missing) - from_init):
        fresh = {name: jax.jit(INITS[name], static_argnums=0)(run_cfgs[name], keys[name])}
        params[name] = fresh[name]
    for name in missing:
        log.warning("%s: the run did not train the %s; it is the run's starting point (%s)", directory, name,
                    f"init_from={init_from}" if name in from_init else f"random, seed {config.get('seed', 0)}")
    return params
