"""``fastntk tune``: hyperparameters chosen on a validation split, by a rule
fixed before any trial runs (docs/tuning.md).

The protocol:

1. **Validation data, disjoint from every evaluation image.** From the
   configuration's pool, the images the evaluation uses are passed over
   (``data.skip``) and a validation D and held-out set of the same sizes are
   taken after them (``[tune] ipc``/``test_ipc`` change the sizes):

   * one split (``train_split == test_split``, e.g. the leakage-free
     protocols on CIFAR-10's test split): evaluation uses the first
     ``test_ipc + ipc`` images of each class, validation the next ones;
   * two splits (D from train, test from test): the validation D *and* its
     held-out images both come from the training split, after the first
     ``ipc`` images, so no image of the test split is ever seen.
2. **The same budget for every method**: each tunable method has a grid of
   exactly :data:`TRIALS` settings (:data:`GRIDS`, published here and in
   docs/tuning.md), each including the method's released setting where one
   exists. Full, Retrain and the noise-floor Retrain have nothing to tune.
3. **A fixed criterion**: per tuning seed, the fine-tuned model, the
   validation problem and a Retrain with another recipe seed
   (``reference_seed_offset``) are built; each trial's Avg.D (mean absolute
   gap in FA, RA, TA and MIA, points) to that Retrain is averaged over the
   tuning seeds; the smallest wins, ties to the first in grid order. The
   tuning seeds must not be among the reported seeds.
4. **Stored beside the configs**: ``tuning.json`` (every trial, its
   validation metrics and seconds, the environment) and ``chosen.toml``
   (``[method.X]`` tables), which an experiment configuration names with
   ``tuned = "..."``.

Every trial is written atomically when done, so an interrupted run resumes.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from fastntk_jax import methods as methods_lib
from fastntk_jax.data import splits
from fastntk_jax.experiments.config import config_hash
from fastntk_jax.evaluation import metrics
from fastntk_jax.evaluation import mia
from fastntk_jax.experiments import evaluate
from fastntk_jax.experiments import report
from fastntk_jax.experiments import runner
from fastntk_jax.experiments.config import ConfigError
from fastntk_jax.io import atomic
from fastntk_jax.io import checkpoint
from fastntk_jax.io.environment import environment
from fastntk_jax.models import zoo
from fastntk_jax.training import train

__all__ = ["GRIDS", "TRIALS", "chosen_toml", "grid", "tune",
           "validation_config"]

#: Trials per tunable method: the same budget for all.
TRIALS = 6

#: ``method -> {hyperparameter: values}``; the trials are the product, in
#: order. Each has :data:`TRIALS` points and includes the released setting
#: (learning rate and epochs/steps) where the method follows released code.
GRIDS: dict[str, dict[str, list]] = {
    "fast_ntk": {"damping": [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]},
    "max_loss": {"learning_rate": [5e-4, 2e-3, 5e-3], "epochs": [5, 10]},
    "random_label": {"learning_rate": [3e-3, 1e-2, 3e-2], "epochs": [5, 10]},
    "ft": {"learning_rate": [1e-3, 1e-2, 3e-2], "epochs": [10, 20]},
    "ga": {"learning_rate": [1e-4, 1e-2, 1.0], "epochs": [9, 20]},
    "salun": {"learning_rate": [1.3e-3, 1.3e-2, 1.3e-1], "epochs": [5, 10]},
    "bad_teacher": {"learning_rate": [1e-4, 1e-3, 1e-2], "epochs": [1, 10]},
    "scrub": {"learning_rate": [5e-4, 5e-3, 5e-2], "epochs": [3, 10]},
    "sfr_on": {"learning_rate": [1e-3, 1e-2, 3e-2], "steps": [300, 1500]},
}

_GAP_KEYS = ("acc_forget", "acc_retain", "acc_test", "mia")


def grid(method: str) -> list[dict]:
  """The trials of ``method``: the product of :data:`GRIDS` ``[method]``."""
  g = GRIDS[method]
  keys = list(g)
  return [dict(zip(keys, vals)) for vals in itertools.product(*g.values())]


def validation_config(cfg: dict) -> dict:
  """The configuration of the validation problem (see the module docstring).

  Raises:
    ConfigError: when a validation set cannot be carved out disjointly.
  """
  d, t = cfg["data"], cfg["tune"]
  if d["test_ipc"] < 1:
    raise ConfigError("data.test_ipc = 0 (the whole test split) leaves no "
                      "room for a disjoint validation set; set data.test_ipc.")
  overlap = sorted(set(t["seeds"]) & set(cfg["seeds"]))
  if overlap:
    raise ConfigError(f"tune.seeds {overlap} are also reported seeds; tuning "
                      "seeds must differ from 'seeds'.")
  v = copy.deepcopy(cfg)
  vd = v["data"]
  ipc, test_ipc = t["ipc"] or d["ipc"], t["test_ipc"] or d["test_ipc"]
  if d["train_split"] == d["test_split"]:
    vd["skip"] = d["skip"] + d["test_ipc"] + d["ipc"]
  else:
    vd["skip"] = d["skip"] + d["ipc"]
    vd["test_split"] = d["train_split"]
  vd["ipc"], vd["test_ipc"] = ipc, test_ipc
  v["seeds"] = list(t["seeds"])
  v["metrics"] = {**v["metrics"], "relearn": False, "probe": False}
  return v


def _check_out(out: Path, vcfg: dict) -> None:
  """Claims ``out`` for this validation problem, or refuses another's."""
  saved = _read(out / "validation_config.json")
  digest = config_hash(vcfg)
  if saved is not None and saved.get("_hash") != digest:
    raise ConfigError(f"--out {out} holds a tuning run of another "
                      "configuration (data, model or recipe changed); use "
                      "another --out directory, or delete this one.")
  if saved is None and out.exists() and any(out.iterdir()):
    raise ConfigError(f"--out {out} exists and holds other files; give a new "
                      "or empty directory.")
  out.mkdir(parents=True, exist_ok=True)
  checkpoint.atomic_write_json(out / "validation_config.json",
                               report.json_safe({**vcfg, "_hash": digest}))


def _trial_path(out: Path, method: str, k: int) -> Path:
  return out / "trials" / method / f"{k}.json"


def _read(path: Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


class _Problem:
  """One tuning seed's validation problem and its reference Retrain."""

  def __init__(self, vcfg, seed, module, variables, data, out, log):
    m = vcfg["model"]
    x_tr, y_tr, x_te, y_te, class_names, _ = data
    self.num_classes = len(class_names)
    model = runner.shared_apply_fn(zoo.peft_model(
        m["name"], module, variables, num_classes=self.num_classes,
        mode=m["peft"], head_scale=m["head_scale"], seed=seed), m["peft"])
    xn, xt = runner.preprocess(m["name"], x_tr), runner.preprocess(m["name"],
                                                                   x_te)
    spec = runner.forget_spec(vcfg["data"]["forget"], seed)
    r_idx, f_idx = splits.apply_forget(spec, y_tr, class_names)
    recipe = train.FinetuneConfig(**vcfg["finetune"], seed=seed)
    bar = runner.Progress(0, False, log)
    w_d, _ = runner.finetuned(out / "runs" / f"seed{seed}" / "finetune.ckpt",
                              model, xn, y_tr, recipe, seed, bar)
    self.sets = ((xn[r_idx], y_tr[r_idx]), (xn[f_idx], y_tr[f_idx]),
                 (xt, y_te))
    self.kind = spec.kind
    self.forget_classes = (np.unique(y_tr[f_idx]) if spec.kind == "class"
                           else np.asarray([], int))
    rand = (runner.random_init_model(m, module, self.num_classes, seed)
            if "bad_teacher" in vcfg["methods"] else None)
    self.apply_fn, self.recipe, self.seed = model.apply_fn, recipe, seed
    self.problem = methods_lib.UnlearningProblem(
        model.apply_fn, model.init_params, w_d, self.sets[0], self.sets[1],
        recipe, self.num_classes, rand)
    self.reference = self.evaluate(_reference_params(
        out / "runs" / f"seed{seed}" / "reference.ckpt", self.problem, seed,
        int(vcfg["tune"]["reference_seed_offset"])))

  def evaluate(self, params) -> dict:
    values, _ = evaluate.evaluate(
        self.apply_fn, params, self.sets, forget_kind=self.kind,
        forget_classes=self.forget_classes, recipe=self.recipe,
        mcfg={"mia": True, "relearn": False}, seed=self.seed,
        retrain_logits=None)
    return values


def _reference_params(path: Path, problem, seed: int, offset: int):
  """The reference Retrain (recipe seed + ``offset``): from its checkpoint
  when a resumed run has one, else trained and saved."""
  if path.is_file():
    try:
      ck = checkpoint.load(path, expect_kind="tune-reference")
      if ck.config.get("seed_offset") == offset:
        return checkpoint.restore_like(problem.init_params, ck.trees["params"])
    except (checkpoint.CheckpointError, KeyError, ValueError, OSError):
      pass
  res = methods_lib.run_method("retrain_other_seed", problem, seed=seed,
                               seed_offset=offset)
  checkpoint.save(path, {"params": jax.device_get(res.params)},
                  config={"seed_offset": offset}, kind="tune-reference")
  return res.params


def _tunable(cfg: dict) -> list[str]:
  wanted = cfg["tune"]["methods"] or cfg["methods"]
  unknown = [m for m in wanted if m not in methods_lib.METHOD_NAMES]
  if unknown:
    raise ConfigError(f"tune.methods: unknown {unknown}; choose from "
                      f"{sorted(GRIDS)}.")
  return [m for m in methods_lib.METHOD_NAMES if m in wanted and m in GRIDS]


def _run_trial(problems, method, hp) -> dict:
  per_seed, t0 = [], time.perf_counter()
  for p in problems:
    res = methods_lib.run_method(method, p.problem, seed=p.seed, **hp)
    try:
      vals = p.evaluate(res.params)
    except mia.NonFiniteLogitsError as e:
      # A diverged trial is a result of the grid, not a failure of the
      # protocol: it ranks last (Avg.D NaN, written as null).
      per_seed.append({"seed": p.seed, "metrics": None, "avg_d": float("nan"),
                       "diverged": str(e), "seconds": res.seconds})
      continue
    gap = metrics.avg_gap(vals, p.reference, keys=_GAP_KEYS)
    per_seed.append({"seed": p.seed, "metrics": vals, "avg_d": float(gap),
                     "seconds": res.seconds})
  gaps = [r["avg_d"] for r in per_seed]
  return {"method": method, "hyperparameters": hp, "per_seed": per_seed,
          "avg_d": float(np.mean(gaps)) if all(np.isfinite(gaps))
          else float("nan"), "seconds": time.perf_counter() - t0}


def tune(cfg: dict, out: str | Path, *,
         log: Callable[[str], None] | None = None) -> dict:
  """Runs (or resumes) the tuning protocol; writes ``OUT/tuning.json`` and
  ``OUT/chosen.toml``; returns the tuning record.

  Args:
    cfg: a complete configuration (:func:`~fastntk_jax.experiments.config.resolve`).
    out: the tuning directory.
    log: where progress lines go (default: stderr).
  """
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  out = Path(out)
  vcfg = validation_config(cfg)
  todo = _tunable(cfg)
  vcfg["methods"] = todo
  m = vcfg["model"]
  module, variables, _ = zoo.load_backbone(
      m["name"], m["weights"] or None,
      num_prompts=m["num_prompts"] if zoo.spec(m["name"]).family == "vit" else 0,
      seed=0)
  _check_out(out, vcfg)
  data = runner.load_data(vcfg)
  with runner.Sitting(out, "trials/*/*.json") as sitting:
    problems = [_Problem(vcfg, s, module, variables, data, out, log)
                for s in vcfg["tune"]["seeds"]]
    trials = {}
    for method in todo:
      trials[method] = []
      for k, point in enumerate(grid(method)):
        hp = {**methods_lib.defaults(method), **cfg["method"].get(method, {}),
              **point}
        path = _trial_path(out, method, k)
        rec = _read(path)
        if rec is None or rec.get("hyperparameters") != report.json_safe(hp):
          rec = report.json_safe(_run_trial(problems, method, hp))
          checkpoint.atomic_write_json(path, rec)
        gap = ("diverged" if rec["avg_d"] is None else f"{rec['avg_d']:.2f}")
        log(f"[tune] {method} {point}: validation Avg.D {gap} "
            f"({rec['seconds']:.1f} s)")
        trials[method].append(rec)
  return _write_record(out, cfg, vcfg, problems, trials, sitting.sittings)


def _best(recs: list[dict]) -> int:
  gaps = [r["avg_d"] if r["avg_d"] is not None else np.inf for r in recs]
  return int(np.argmin(gaps))  # the first of equal gaps


def _write_record(out, cfg, vcfg, problems, trials, sittings) -> dict:
  chosen = {m: {k: recs[_best(recs)]["hyperparameters"][k] for k in GRIDS[m]}
            for m, recs in trials.items()}
  record = {
      "protocol": "docs/tuning.md", "config": cfg["name"],
      "validation_data": vcfg["data"], "tune": cfg["tune"],
      "criterion": "mean over tuning seeds of Avg.D (FA, RA, TA, MIA; points) "
                   "to a Retrain with recipe seed + reference_seed_offset; "
                   "smallest wins, ties to the first in grid order",
      "grids": {m: GRIDS[m] for m in trials}, "trials_per_method": TRIALS,
      "reference": {str(p.seed): p.reference for p in problems},
      "trials": trials, "chosen": chosen, "sittings": sittings,
      **environment()}
  atomic.atomic_write(out / "tuning.json", lambda f: f.write(
      json.dumps(report.json_safe(record), indent=1).encode()))
  text = chosen_toml(cfg["name"], chosen)
  atomic.atomic_write(out / "chosen.toml", lambda f: f.write(text.encode()))
  return record


def chosen_toml(name: str, chosen: dict) -> str:
  """The ``[method.X]`` tables of the chosen values, as TOML text."""
  lines = [f"# Chosen by `fastntk tune` for {name} (docs/tuning.md); every "
           "trial is in tuning.json beside this file, or,",
           "# for a copy made by `fastntk tune --write`, in the .json of the "
           "same name.", ""]
  for m, hp in chosen.items():
    lines.append(f"[method.{m}]")
    for k, v in hp.items():
      lines.append(f"{k} = {json.dumps(v)}")
    lines.append("")
  return "\n".join(lines)
