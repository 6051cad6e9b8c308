"""Experiment configurations: a TOML (or JSON) file, checked before any work.

A configuration names the model, the data, the forget request, the
fine-tuning recipe, the seeds, the methods and their hyperparameters. Every
key has a default here, so a config file states only what it changes; an
unknown key is an error that names it (a typo must not silently fall back to a
default). ``configs/`` holds the named protocols.

Example (``configs/demo.toml``)::

  name = "demo"
  seeds = [0, 1, 2]
  [data]
  source = "embedded"
  ipc = 20
  [finetune]
  loss = "mse"
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastntk_jax.data import splits
from fastntk_jax.training import train

__all__ = ["ConfigError", "DEFAULTS", "backbone_record", "config_hash",
           "load_config", "resolve", "METHOD_ORDER"]

#: The methods of the bench, in the order the tables list them.
METHOD_ORDER = ("full", "retrain", "retrain_other_seed",
                "fast_ntk", "max_loss", "random_label",
                "ft", "ga", "salun", "bad_teacher", "scrub", "sfr_on")

DEFAULTS: dict[str, Any] = {
    "name": "",
    "description": "",
    "seeds": [0, 1, 2],
    "methods": list(METHOD_ORDER),
    "model": {
        "name": "resnet20",
        "weights": "",        # "" = the zoo's default (shipped/shared weights)
        "peft": "peft",       # "peft" (BatchNorm/prompts + head) or "all"
        "num_prompts": 5,
        "head_scale": 0.1,
        "require_pretrained": True,
    },
    "data": {
        "source": "embedded",
        "train_split": "train",
        "test_split": "test",
        "ipc": 20,            # training images per class (first in source order)
        "skip": 0,            # images per class passed over first (validation)
        "test_ipc": 100,      # 0 = the whole test split
        "classes": [],        # [] = all classes
        "forget": "class:0",  # splits.parse_forget syntax
    },
    "finetune": {k: v for k, v in train.FinetuneConfig()._asdict().items()
                 if k != "seed"},
    "metrics": {
        "relearn": True,
        "relearn_threshold": "full",  # or a loss, e.g. the paper's 0.05
        "relearn_max_epochs": 100,
        "mia": True,
        "probe": True,
        "probe_epochs": 100,
    },
    "method": {},             # per-method hyperparameters: [method.fast_ntk]
    # A TOML file (relative to the config) of [method.X] tables written by
    # `fastntk tune`; the config's own [method.X] keys override it.
    "tuned": "",
    "tune": {
        "seeds": [100],       # tuning seeds: disjoint from the reported ones
        "ipc": 0,             # validation D per class (0 = data.ipc)
        "test_ipc": 0,        # validation held-out per class (0 = data.test_ipc)
        "reference_seed_offset": 1000,  # Retrain of another recipe seed
        "methods": [],        # [] = every tunable method of `methods`
    },
}

# Keys whose change does not invalidate finished runs: seeds and methods may
# be extended, the text is documentation, and each method's run records its
# own hyperparameters (a changed [method.X] re-runs method X only).
_RESUMABLE_KEYS = ("seeds", "methods", "description", "method", "tuned",
                   "tune")


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the key and the fix."""


def _merge(defaults: Mapping, given: Mapping, where: str) -> dict:
  out = copy.deepcopy(dict(defaults))
  for key, value in given.items():
    path = f"{where}.{key}" if where else key
    if key not in defaults:
      raise ConfigError(f"unknown key {path!r}; valid keys here: "
                        f"{sorted(defaults)}.")
    if isinstance(defaults[key], dict) and key not in ("method",):
      if not isinstance(value, Mapping):
        raise ConfigError(f"{path!r} must be a table ([{path}]), got "
                          f"{type(value).__name__}.")
      out[key] = _merge(defaults[key], value, path)
    else:
      out[key] = copy.deepcopy(value)
  return out


def _check_type(path: str, value, types, what: str) -> None:
  if isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                              else (types,)):
    raise ConfigError(f"{path!r} must be {what}, got {value!r}.")
  if not isinstance(value, types):
    raise ConfigError(f"{path!r} must be {what}, got {value!r}.")


def resolve(raw: Mapping) -> dict:
  """Fills in defaults and validates a configuration mapping.

  Args:
    raw: the parsed file (nested dicts).

  Returns:
    The complete configuration (a new dict).

  Raises:
    ConfigError: an unknown key, a wrong type or value, an unknown method or
      hyperparameter name.
  """
  if not isinstance(raw, Mapping):
    raise ConfigError("a configuration is a table of keys, got "
                      f"{type(raw).__name__}.")
  cfg = _merge(DEFAULTS, raw, "")
  if not cfg["name"] or not isinstance(cfg["name"], str):
    raise ConfigError("'name' is required: a short identifier for the "
                      "experiment, e.g. name = \"table1_ipc50_mse\".")
  _check_seeds("'seeds'", cfg["seeds"])
  methods = cfg["methods"]
  if not isinstance(methods, list) or not methods:
    raise ConfigError("'methods' must be a non-empty list of method names "
                      f"from {list(METHOD_ORDER)}.")
  for m in methods:
    if m not in METHOD_ORDER:
      raise ConfigError(f"'methods': unknown method {m!r}; choose from "
                        f"{list(METHOD_ORDER)}.")
  if len(set(methods)) != len(methods):
    raise ConfigError(f"'methods' lists a method twice: {methods!r}.")
  cfg["methods"] = [m for m in METHOD_ORDER if m in methods]
  from fastntk_jax import methods as methods_lib  # heavy import, here only
  for m, hp in cfg["method"].items():
    if m not in METHOD_ORDER:
      raise ConfigError(f"[method.{m}]: unknown method; choose from "
                        f"{list(METHOD_ORDER)}.")
    if not isinstance(hp, Mapping):
      raise ConfigError(f"[method.{m}] must be a table of hyperparameters.")
    valid = methods_lib.defaults(m)
    for k in hp:
      if k not in valid:
        raise ConfigError(f"[method.{m}]: unknown hyperparameter {k!r}; valid: "
                          f"{sorted(valid)}.")
  _check_model(cfg["model"])
  _check_data(cfg["data"])
  _check_finetune(cfg["finetune"])
  _check_metrics(cfg["metrics"])
  _check_tune(cfg["tune"])
  return cfg


def _check_seeds(what: str, seeds) -> None:
  if (not isinstance(seeds, list) or not seeds
      or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                 for s in seeds) or len(set(seeds)) != len(seeds)):
    raise ConfigError(f"{what} must be a non-empty list of distinct integers "
                      f">= 0, got {seeds!r}.")


def _check_tune(t: dict) -> None:
  _check_seeds("tune.seeds", t["seeds"])
  for k in ("ipc", "test_ipc", "reference_seed_offset"):
    _check_type(f"tune.{k}", t[k], int, "an integer >= 0")
    if t[k] < 0:
      raise ConfigError(f"tune.{k} must be >= 0.")
  if t["reference_seed_offset"] < 1:
    raise ConfigError("tune.reference_seed_offset must be >= 1 (the reference "
                      "Retrain uses another recipe seed).")
  if not isinstance(t["methods"], list):
    raise ConfigError("tune.methods must be a list of method names ([] = "
                      "all).")


def _check_model(m: dict) -> None:
  from fastntk_jax.models import zoo
  if m["name"] not in zoo.MODEL_NAMES:
    raise ConfigError(f"model.name {m['name']!r} is not a known model; choose "
                      f"from {list(zoo.MODEL_NAMES)}.")
  if m["peft"] not in ("peft", "all"):
    raise ConfigError(f"model.peft must be 'peft' or 'all', got {m['peft']!r}.")
  _check_type("model.weights", m["weights"], str, "a path or \"\"")
  _check_type("model.num_prompts", m["num_prompts"], int, "an integer >= 0")
  if m["num_prompts"] < 0:
    raise ConfigError("model.num_prompts must be >= 0.")
  _check_type("model.head_scale", m["head_scale"], (int, float), "a number")
  _check_type("model.require_pretrained", m["require_pretrained"], bool,
              "true or false")


def _check_data(d: dict) -> None:
  _check_type("data.source", d["source"], str, "a data source string")
  for k in ("train_split", "test_split"):
    if d[k] not in ("train", "test"):
      raise ConfigError(f"data.{k} must be 'train' or 'test', got {d[k]!r}.")
  for k in ("ipc", "test_ipc", "skip"):
    _check_type(f"data.{k}", d[k], int, "an integer")
  if d["skip"] < 0:
    raise ConfigError("data.skip must be >= 0 (images per class passed over "
                      "before the selection).")
  if d["ipc"] < 1:
    raise ConfigError("data.ipc must be >= 1 (training images per class).")
  if d["test_ipc"] < 0:
    raise ConfigError("data.test_ipc must be >= 0 (0 = the whole test split).")
  if d["train_split"] == d["test_split"] and d["test_ipc"] < 1:
    raise ConfigError(
        "data.train_split == data.test_split: the test images are carved out "
        "of the same split (the first test_ipc of each class), so "
        "data.test_ipc must be >= 1.")
  if not isinstance(d["classes"], list):
    raise ConfigError("data.classes must be a list of class names or indices "
                      "([] = all).")
  try:
    splits.parse_forget(d["forget"])
  except (ValueError, TypeError) as e:
    raise ConfigError(f"data.forget: {e}") from None


def _check_finetune(f: dict) -> None:
  try:
    cfg = train.FinetuneConfig(**f)
  except TypeError as e:
    raise ConfigError(f"[finetune]: {e}") from None
  if cfg.loss not in ("mse", "ce"):
    raise ConfigError(f"finetune.loss must be 'mse' or 'ce', got {cfg.loss!r}.")
  if cfg.schedule not in ("constant", "cosine"):
    raise ConfigError("finetune.schedule must be 'constant' or 'cosine'.")
  for k in ("epochs", "batch_size"):
    _check_type(f"finetune.{k}", f[k], int, "a positive integer")
    if f[k] < 1:
      raise ConfigError(f"finetune.{k} must be >= 1.")
  lr = f["learning_rate"]
  _check_type("finetune.learning_rate", lr, (int, float), "a number > 0")
  if not (math.isfinite(lr) and lr > 0):
    raise ConfigError("finetune.learning_rate must be finite and > 0.")
  prox = f["proximal"]
  _check_type("finetune.proximal", prox, (int, float), "a number >= 0")
  if not (math.isfinite(prox) and prox >= 0):
    raise ConfigError("finetune.proximal must be finite and >= 0 (λ of "
                      "(λ/N)/2‖w − w_0‖²).")
  _check_type("finetune.tangent", f["tangent"], bool, "true or false")


def _check_metrics(m: dict) -> None:
  for k in ("relearn", "mia", "probe"):
    _check_type(f"metrics.{k}", m[k], bool, "true or false")
  thr = m["relearn_threshold"]
  if thr != "full":
    _check_type("metrics.relearn_threshold", thr, (int, float),
                "\"full\" (calibrated to w_D's loss on D_f) or a number > 0")
    if not thr > 0:
      raise ConfigError("metrics.relearn_threshold must be \"full\" or a "
                        "number > 0.")
  for k in ("relearn_max_epochs", "probe_epochs"):
    _check_type(f"metrics.{k}", m[k], int, "a positive integer")
    if m[k] < 1:
      raise ConfigError(f"metrics.{k} must be >= 1.")


_CIFAR10_SOURCES = ("embedded", "cifar10-jpeg", "cifar10-lossless")


def backbone_record(cfg: Mapping) -> dict:
  """What the backbone was trained on, and whether that includes the pool
  ``D`` is drawn from (``saw_the_pool``: True, False, or None = unknown).

  The shipped CIFAR-10 ResNets were trained on all of CIFAR-10's train
  split: a protocol that draws D from it measures membership and relearn
  time on images the frozen backbone memorised. Drawing D from the test
  split (``train_split = test_split = "test"``) avoids that.
  """
  from fastntk_jax.models import zoo  # pylint: disable=import-outside-toplevel
  m, d = cfg["model"], cfg["data"]
  seen = zoo.backbone_training_data(m["name"], m["weights"] or None)
  source = str(d["source"])
  is_cifar10 = (source.split(":")[0] in _CIFAR10_SOURCES
                or source.endswith(".zip"))
  if seen is None:
    saw = None
  elif not is_cifar10:
    saw = False
  else:
    saw = seen == f"cifar10/{d['train_split']}"
  return {"trained_on": seen, "saw_the_pool": saw}


def load_config(path: str | Path, overrides: Mapping | None = None) -> dict:
  """Reads, completes and validates a ``.toml`` or ``.json`` configuration.

  Args:
    path: the file.
    overrides: keys to replace after reading (e.g. ``{"seeds": [0]}`` from the
      command line).

  Returns:
    The complete configuration (see :func:`resolve`).
  """
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"CONFIG: no file at {path}; the named protocols are in "
                      "configs/ (e.g. configs/demo.toml).")
  text = path.read_text()
  try:
    raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
  except (ValueError, tomllib.TOMLDecodeError) as e:
    raise ConfigError(f"CONFIG {path}: cannot parse it: {e}") from None
  raw = dict(raw)
  for k, v in (overrides or {}).items():
    raw[k] = v
  if raw.get("tuned"):
    raw["method"] = _with_tuned(path, raw)
  return resolve(raw)


def _with_tuned(path: Path, raw: Mapping) -> dict:
  """``[method.X]`` of the ``tuned`` file, updated by the config's own."""
  tuned = raw["tuned"]
  if not isinstance(tuned, str):
    raise ConfigError(f"'tuned' must be a path to a TOML file, got {tuned!r}.")
  tpath = (path.parent / tuned) if not Path(tuned).is_absolute() else Path(
      tuned)
  if not tpath.is_file():
    raise ConfigError(f"tuned: no file at {tpath}; run `fastntk tune "
                      f"{path} --write {tpath}` first, or remove 'tuned'.")
  try:
    table = tomllib.loads(tpath.read_text())
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"tuned {tpath}: cannot parse it: {e}") from None
  methods = {m: dict(hp) for m, hp in table.get("method", {}).items()}
  for m, hp in dict(raw.get("method", {})).items():
    methods.setdefault(m, {}).update(hp)
  return methods


_LATER_FINETUNE_DEFAULTS = {"proximal": 0.0, "tangent": False}


def config_hash(cfg: Mapping) -> str:
  """A digest of everything that determines the runs' results.

  Seeds, methods, per-method hyperparameters and the description are left
  out so that an interrupted or extended experiment can resume in the same
  directory; each method's run file records its own hyperparameters.
  """
  core = {k: v for k, v in cfg.items() if k not in _RESUMABLE_KEYS}
  # Recipe options added later are left out at their defaults, so that the
  # digests of directories written before them stay the same.
  ft = dict(core.get("finetune", {}))
  for k, off in _LATER_FINETUNE_DEFAULTS.items():
    if k in ft and ft[k] == off:
      del ft[k]
  core["finetune"] = ft
  data = dict(core.get("data", {}))
  if data.get("skip") == 0:
    del data["skip"]
  core["data"] = data
  text = json.dumps(core, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]
