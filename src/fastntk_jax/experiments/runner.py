"""``run_experiment``: every method, every seed, every metric, resumable.

Layout of a results directory::

  OUT/config.json            the complete configuration (defaults filled in)
  OUT/manifest.json          the data: selection rule, digests, forget indices
  OUT/runs/seed<S>/finetune.ckpt      w_0 and w_D of seed S (resume point)
  OUT/runs/seed<S>/<method>.ckpt      the method's parameters
  OUT/runs/seed<S>/<method>.json      its metrics, hyperparameters, timings
  OUT/runs/seed<S>/probe.json         the linear-probe analysis
  OUT/sittings.json          each run of the command on OUT: when it started,
                             its wall time, how many records it wrote new or
                             changed, whether it completed, its peak RSS
  OUT/results.json, OUT/table.md, OUT/metrics.png, OUT/relearn.png

Every file is written atomically. A rerun in the same directory skips what is
done (a method whose hyperparameters changed is run again), so an interrupted
experiment resumes where it stopped; a directory holding another
configuration is refused.

Per seed ``s``: the new head is initialised with ``s``, the fine-tuning recipe
uses ``seed = s`` (data order, augmentation), every method gets ``seed = s``,
and a random forget request ``random:F:seed=K`` draws its set with seed
``K + s``. The training and test images are the same for every seed.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax.io import checkpoint
from fastntk_jax.io.environment import environment
from fastntk_jax.core import kernels
from fastntk_jax import methods as methods_lib
from fastntk_jax.data import splits
from fastntk_jax.training import train
from fastntk_jax.core.tangent import tangent_model
from fastntk_jax.models import zoo
from fastntk_jax.experiments import evaluate
from fastntk_jax.experiments import report
from fastntk_jax.experiments.config import ConfigError, backbone_record, config_hash

__all__ = ["Progress", "environment", "finetuned", "forget_spec", "load_data",
           "preprocess",
           "random_init_model", "run_experiment", "shared_apply_fn"]


def _digest(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _write_json(path: Path, obj) -> None:
  checkpoint.atomic_write_json(path, report.json_safe(obj))


def _read_json(path: Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None  # missing or torn: the step is simply run again


# ----------------------------------------------------------------- data
def _skipped(ds, skip: int):
  """``ds`` without the first ``skip`` images of each class."""
  if not skip:
    return ds
  drop = np.zeros(len(ds.y), bool)
  drop[splits.first_per_class(ds.y, skip)] = True
  return ds._replace(x=ds.x[~drop], y=ds.y[~drop])


def load_data(cfg: dict):
  """Training and test images (uint8), labels, class names and source.

  ``data.skip`` passes over the first ``skip`` images of each class of the
  training split (of the one split, when train and test share it) before the
  selection: a validation pool disjoint from the evaluation's.
  """
  from fastntk_jax import data as data_lib
  d, m = cfg["data"], cfg["model"]
  size = zoo.spec(m["name"]).image_size
  classes = d["classes"] or None
  skip = int(d.get("skip", 0))
  if d["train_split"] == d["test_split"]:
    # One split only (e.g. ImageNet-R's): the first test_ipc images of each
    # class are the test set, the next ipc the training set.
    ds = _skipped(data_lib.load_dataset(
        d["source"], d["train_split"], ipc=skip + d["ipc"] + d["test_ipc"],
        classes=classes, image_size=size), skip)
    test_idx = splits.first_per_class(ds.y, d["test_ipc"])
    is_test = np.zeros(len(ds.y), bool)
    is_test[test_idx] = True
    return (ds.x[~is_test], ds.y[~is_test], ds.x[is_test], ds.y[is_test],
            ds.class_names, ds.source)
  tr = _skipped(data_lib.load_dataset(d["source"], d["train_split"],
                                      ipc=skip + d["ipc"], classes=classes,
                                      image_size=size), skip)
  te = data_lib.load_dataset(d["source"], d["test_split"],
                             ipc=d["test_ipc"] or None, classes=classes,
                             image_size=size)
  return tr.x, tr.y, te.x, te.y, tr.class_names, tr.source


def forget_spec(text: str, seed: int) -> splits.ForgetSpec:
  """The forget request of ``seed`` (a random one draws with seed ``K + seed``)."""
  spec = splits.parse_forget(text)
  if spec.kind == "random":
    spec = spec._replace(seed=spec.seed + seed)
  return spec


# --------------------------------------------------------------- runner
class Progress:
  """A tqdm bar on a terminal, one line per step otherwise."""

  def __init__(self, total: int, enabled: bool, log: Callable[[str], None]):
    self._bar = None
    self._log = log
    self._enabled = enabled
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, unit="run", dynamic_ncols=True)

  def step(self, text: str) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(text)
      self._bar.update(1)
    elif self._enabled:
      self._log(text)

  def note(self, text: str) -> None:
    """Shows ``text`` beside the bar without advancing it (terminal only)."""
    if self._bar is not None:
      self._bar.set_postfix_str(text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _check_dir(out: Path, cfg: dict) -> None:
  saved = _read_json(out / "config.json")
  if saved is None:
    if out.exists() and any(out.iterdir()):
      raise ConfigError(f"--out {out} exists and holds other files; give a new "
                        "or empty directory.")
    return
  if saved.get("_hash") != config_hash(cfg):
    changed = sorted(k for k in cfg if k not in ("seeds", "methods", "method",
                                                 "description")
                     and json.dumps(saved.get(k), sort_keys=True, default=str)
                     != json.dumps(cfg[k], sort_keys=True, default=str))
    raise ConfigError(
        f"--out {out} holds results of a different configuration (changed: "
        f"{changed or 'unknown'}); use another --out directory, or delete "
        "this one to start over.")


def run_experiment(cfg: dict, out: str | Path, *, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> dict:
  """Runs (or resumes) an experiment and writes its results directory.

  Args:
    cfg: a complete configuration (:func:`fastntk_jax.experiments.config.resolve`).
    out: the results directory (created).
    progress: progress bars (or lines when stderr is not a terminal).
    log: where messages go (default: stderr).

  Returns:
    The ``results.json`` content.
  """
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  out = Path(out)
  _check_dir(out, cfg)
  m = cfg["model"]
  # Everything cheap that can fail is checked before the heavy work.
  module, variables, pretrained = zoo.load_backbone(
      m["name"], m["weights"] or None,
      num_prompts=m["num_prompts"] if zoo.spec(m["name"]).family == "vit" else 0,
      seed=0)
  if not pretrained and m["require_pretrained"]:
    raise ConfigError(
        f"model.weights: there are no pretrained weights for {m['name']!r} "
        "here; pass a checkpoint from `fastntk pretrain` as model.weights, or "
        "set model.require_pretrained = false to run on a random backbone.")
  x_tr, y_tr, x_te, y_te, class_names, source = load_data(cfg)
  num_classes = len(class_names)
  specs = {s: forget_spec(cfg["data"]["forget"], s) for s in cfg["seeds"]}
  idx = {s: splits.apply_forget(specs[s], y_tr, class_names)
         for s in cfg["seeds"]}

  cfg_all = _write_records(out, cfg, specs, idx, (x_tr, y_tr, x_te, y_te),
                           class_names, source)

  xn, xt = preprocess(m["name"], x_tr), preprocess(m["name"], x_te)
  bar = Progress(len(cfg["seeds"]) * (len(cfg["methods"]) + 1), progress, log)
  try:
    with Sitting(out, "runs/seed*/*.json") as sitting:
      for s in cfg["seeds"]:
        model = shared_apply_fn(zoo.peft_model(
            m["name"], module, variables, num_classes=num_classes,
            mode=m["peft"], head_scale=m["head_scale"], seed=s), m["peft"])
        random_init = (random_init_model(m, module, num_classes, s)
                       if "bad_teacher" in cfg["methods"] else None)
        _run_seed(cfg, out / "runs" / f"seed{s}", s, model, xn, y_tr, xt,
                  y_te, idx[s], specs[s], num_classes, bar, log, random_init)
  finally:
    bar.close()
  results = report.aggregate(out, cfg_all, {**environment(),
                                           "backbone": backbone_record(cfg),
                                           "sittings": sitting.sittings})
  report.write_all(out, results)
  return results


def _peak_rss_mib() -> float | None:
  """The process's peak resident memory so far, in MiB (None where the
  ``resource`` module is missing, as on Windows)."""
  try:
    import resource  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # B, KiB


class Sitting:
  """One run of a resumable command (``fastntk experiment``, ``fastntk
  tune``) on the directory ``out``: appended to ``OUT/sittings.json`` when
  it ends, whether it completed or raised, so the wall time of a directory
  built over several runs is on record. ``records`` is the glob, under
  ``out``, of the per-step records whose new or changed ones it counts.

  Use it as a context manager; afterwards ``sittings`` holds every run on
  record, this one last.
  """

  def __init__(self, out: Path, records: str):
    self._path = out / "sittings.json"
    self._out, self._records = out, records
    self._started = datetime.datetime.now(datetime.timezone.utc)
    self._t0 = time.perf_counter()
    self._before = self._stamps()
    self.sittings: list[dict] = []

  def _stamps(self) -> dict:
    # By content: a resumed run rewrites the records it reuses unchanged.
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in self._out.glob(self._records)}

  def __enter__(self) -> Sitting:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close(completed=True)
    else:
      with contextlib.suppress(OSError):  # the run's own error matters more
        self.close(completed=False)

  def close(self, completed: bool) -> list[dict]:
    after = self._stamps()
    written = sum(1 for p, t in after.items() if self._before.get(p) != t)
    record = {
        "started": self._started.isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - self._t0,
        "records_new_or_changed": written, "completed": completed,
        "peak_rss_mib": _peak_rss_mib()}
    earlier = _read_json(self._path)
    sittings = [*(earlier if isinstance(earlier, list) else []), record]
    _write_json(self._path, sittings)
    self.sittings = sittings
    return sittings


def preprocess(name: str, x: np.ndarray) -> np.ndarray:
  """The model's input preprocessing, in blocks of 500 images."""
  prep = jax.jit(zoo.preprocess_fn(name))
  return np.concatenate([np.asarray(prep(jnp.asarray(x[i:i + 500])))
                         for i in range(0, len(x), 500)])


def _write_records(out: Path, cfg, specs, idx, arrays, class_names,
                   source) -> dict:
  """Writes ``config.json`` and ``manifest.json``; returns the configuration
  with every seed the directory holds."""
  x_tr, y_tr, x_te, y_te = arrays
  # A directory extended with other seeds (``--seeds 2`` after ``--seeds 0
  # 1``) keeps the earlier seeds' record: config, forget indices, results.
  saved_cfg = _read_json(out / "config.json") or {}
  saved_forget = (_read_json(out / "manifest.json") or {}).get("forget", {})
  all_seeds = list(dict.fromkeys(
      [int(s) for s in saved_cfg.get("seeds", [])] + list(cfg["seeds"])))
  forget_record = {str(s): v for s, v in saved_forget.items()
                   if int(s) in all_seeds}
  forget_record.update({str(s): {"spec": str(specs[s]),
                                 "forget_indices": idx[s][1].tolist()}
                        for s in cfg["seeds"]})
  cfg_all = {**cfg, "seeds": all_seeds}

  out.mkdir(parents=True, exist_ok=True)
  _write_json(out / "config.json", {**cfg_all, "_hash": config_hash(cfg)})
  _write_json(out / "manifest.json", {
      "source": source, "class_names": list(class_names),
      "selection": {k: cfg["data"][k] for k in
                    ("train_split", "test_split", "ipc", "test_ipc",
                     "classes", "skip")},
      "train": {"num": len(y_tr), "images_sha256": _digest(x_tr),
                "labels_sha256": _digest(y_tr.astype(np.int32)),
                "labels": y_tr.tolist()},
      "test": {"num": len(y_te), "images_sha256": _digest(x_te),
               "labels_sha256": _digest(y_te.astype(np.int32))},
      "forget": dict(sorted(forget_record.items(), key=lambda kv: int(kv[0]))),
      "backbone": backbone_record(cfg),
  })
  return cfg_all


#: ``(module, PEFT mode, frozen digest) -> apply_fn`` of the latest models.
_APPLY_FNS: collections.OrderedDict = collections.OrderedDict()
_APPLY_FNS_KEPT = 4


def shared_apply_fn(model, mode: str):
  """``model`` with the ``apply_fn`` of an earlier model that is the same
  function: the same module and frozen variables. Seeds differ only in the
  new head (a PEFT leaf), and a resumed or extended experiment in the same
  process prepares the same model again: sharing the function shares every
  jitted function built on it (no recompilation). The last few are kept."""
  key = (repr(model.module), mode, _tree_digest(model.frozen))
  if key in _APPLY_FNS:
    _APPLY_FNS.move_to_end(key)
    return model._replace(apply_fn=_APPLY_FNS[key])
  _APPLY_FNS[key] = model.apply_fn
  while len(_APPLY_FNS) > _APPLY_FNS_KEPT:
    _APPLY_FNS.popitem(last=False)
  return model


def _tree_digest(tree) -> str:
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def random_init_model(m: dict, module, num_classes: int, seed: int):
  """``(apply_fn, params)`` of a randomly initialised network of the same
  architecture, with a head at Flax's default scale: Bad Teacher's
  incompetent teacher, as its released code builds it (seeded per seed)."""
  rand = zoo.init_variables(module, zoo.spec(m["name"]).image_size,
                            10_000 + seed)
  r = zoo.peft_model(m["name"], module, rand, num_classes=num_classes,
                     mode=m["peft"], head_scale=1.0, seed=10_000 + seed)
  return (r.apply_fn, r.init_params)


def _run_seed(cfg, sdir: Path, seed, model, xn, y_tr, xt, y_te, idx, spec,
              num_classes, bar, log, random_init=None) -> None:
  mcfg = cfg["metrics"]
  recipe = train.FinetuneConfig(**cfg["finetune"], seed=seed)
  if recipe.tangent:
    # The deployed model is the tangent model at this seed's w_0: every
    # method, metric and Retrain sees it (and trains it as it is).
    model = model._replace(apply_fn=tangent_model(model.apply_fn,
                                                  model.init_params))
    recipe = recipe._replace(tangent=False)
  w_d, ft_info = finetuned(sdir / "finetune.ckpt", model, xn, y_tr, recipe,
                           seed, bar)
  bar.step(f"seed {seed}: fine-tuned on D ({ft_info['seconds']:.0f} s)")
  r_idx, f_idx = idx
  sets = ((xn[r_idx], y_tr[r_idx]), (xn[f_idx], y_tr[f_idx]), (xt, y_te))
  problem = methods_lib.UnlearningProblem(
      model.apply_fn, model.init_params, w_d, sets[0], sets[1], recipe,
      num_classes, random_init)
  forget_classes = (np.unique(y_tr[f_idx]) if spec.kind == "class"
                    else np.asarray([], int))
  retrain_logits, retrain_ref = None, None
  relearn_at = (evaluate.relearn_threshold(model.apply_fn, w_d, sets[1], recipe,
                                           mcfg) if mcfg["relearn"] else None)
  # Retrain first: every other method's KL is measured against it.
  order = sorted(cfg["methods"], key=lambda n: n != "retrain")
  for name in order:
    hp = {**methods_lib.defaults(name), **cfg["method"].get(name, {})}
    params, timing, done = _method_params(name, hp, sdir, model, problem, seed)
    if name == "retrain":
      retrain_ref = _tree_digest(params)
    # Metrics depend on the method's parameters and on Retrain's (KL).
    if done is not None and done.get("retrain_ref") == retrain_ref:
      values = done["metrics"]
      extra = {k: done[k] for k in ("relearn_curve", "relearn_reached")
               if k in done}
      if name == "retrain":
        retrain_logits = {k: np.asarray(kernels.predict(model.apply_fn, params,
                                                        xs[0]))
                          for k, xs in (("forget", sets[1]), ("test", sets[2]))}
    else:
      values, extra = evaluate.evaluate(
          model.apply_fn, params, sets, forget_kind=spec.kind,
          forget_classes=forget_classes, recipe=recipe, mcfg=mcfg, seed=seed,
          retrain_logits=retrain_logits, relearn_at=relearn_at)
      logits = extra.pop("_logits")
      if name == "retrain":
        retrain_logits = logits
        values["kl_to_retrain"] = 0.0
        values["kl_to_retrain_test"] = 0.0
        values["js_to_retrain"] = 0.0
    _write_json(sdir / f"{name}.json", {
        "method": name, "seed": seed, "hyperparameters": hp,
        "metrics": values, **extra, **timing, "retrain_ref": retrain_ref,
        "finetune_seconds": ft_info["seconds"]})
    bar.step(f"seed {seed}: {name} FA {values['acc_forget']:.1f} RA "
             f"{values['acc_retain']:.1f} TA {values['acc_test']:.1f} "
             f"({timing['seconds']:.1f} s)")
  if mcfg["probe"] and "fast_ntk" in cfg["methods"]:
    _probe(cfg, sdir, model, xn, y_tr, idx, num_classes, seed)


def finetuned(ft_path: Path, model, xn, y_tr, recipe, seed, bar):
  """``(w_D, info)``: from this seed's checkpoint, or fine-tuned and saved."""
  if ft_path.is_file():
    try:
      ck = checkpoint.load(ft_path, expect_kind="bench-finetune")
      return checkpoint.restore_like(model.init_params,
                                     ck.trees["w_D"]), ck.config
    except (checkpoint.CheckpointError, KeyError, ValueError):
      pass
  res = train.finetune(
      model.apply_fn, model.init_params, xn, y_tr, config=recipe,
      progress=lambda e, loss: bar.note(
          f"seed {seed}: fine-tuning epoch {e + 1}/{recipe.epochs} "
          f"loss {loss:.4f}"))
  ft_info = {"seconds": res.seconds, "losses": res.losses.tolist()}
  checkpoint.save(ft_path, {"w_0": jax.device_get(model.init_params),
                            "w_D": jax.device_get(res.params)},
                  config=ft_info, kind="bench-finetune")
  return res.params, ft_info


def _method_params(name, hp, sdir: Path, model, problem, seed):
  """``(params, timing, done)``: a method's result, reused when its record
  and checkpoint match ``hp`` (``done`` is that record), else computed and
  saved (``done`` None)."""
  jpath, ppath = sdir / f"{name}.json", sdir / f"{name}.ckpt"
  done = _read_json(jpath)
  if done is not None and done.get("hyperparameters") == report.json_safe(hp):
    try:
      ck = checkpoint.load(ppath, expect_kind="bench-params")
      params = checkpoint.restore_like(model.init_params, ck.trees["params"])
      return params, {k: done[k] for k in ("seconds", "compile_seconds",
                                           "info")}, done
    except (checkpoint.CheckpointError, KeyError, ValueError, OSError):
      pass
  result = methods_lib.run_method(name, problem, seed=seed, **hp)
  params = jax.device_get(result.params)
  checkpoint.save(ppath, {"params": params}, config={"method": name},
                  kind="bench-params")
  return params, {"seconds": result.seconds,
                  "compile_seconds": result.compile_seconds,
                  "info": result.info}, None


def _probe(cfg, sdir: Path, model, xn, y_tr, idx, num_classes, seed) -> None:
  """The linear probe on Fast-NTK's features, once per seed."""
  path = sdir / "probe.json"
  if _read_json(path) is not None:
    return
  ck = checkpoint.load(sdir / "fast_ntk.ckpt", expect_kind="bench-params")
  w_r = checkpoint.restore_like(model.init_params, ck.trees["params"])
  _write_json(path, evaluate.probe_report(
      model, w_r, xn, y_tr, idx, num_classes,
      image_size=zoo.spec(cfg["model"]["name"]).image_size,
      epochs=cfg["metrics"]["probe_epochs"], seed=seed))
