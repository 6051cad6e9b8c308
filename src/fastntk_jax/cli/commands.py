"""The ``fastntk`` command line: params, evaluate, pretrain, train, unlearn.

Each subcommand parses its flags into plain values, checks them before any
heavy work, and calls the library (``zoo`` for models, ``data`` for images,
``train`` for optimisation, ``unlearn`` for Eq. (1)). Results are printed and,
with ``--json PATH``, written atomically together with the device, the
package versions and the full configuration.

Typical session::

  fastntk params
  fastntk evaluate --model resnet20 --data cifar10-jpeg --split test --first 1000
  fastntk train --model resnet20 --data embedded --ipc 100 --out run/full.ckpt
  fastntk unlearn --checkpoint run/full.ckpt --forget class:0 --out run/unlearned.ckpt
  fastntk pretrain --model mobilenetv2 --data cifar10-jpeg --out run/mnv2.ckpt
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fastntk_jax.cli.common import UsageError
from fastntk_jax.cli.deletion import cmd_deletion
from fastntk_jax.cli.common import checkpoint_data
from fastntk_jax.cli.common import load_images
from fastntk_jax.cli.common import model_from_checkpoint
from fastntk_jax.cli.parser import build_parser

__all__ = ["COMMANDS", "main"]

# The paper's PEFT shares (Li et al. 2023, Sec. 4): CNNs with BatchNorm tuning
# 0.05–4.88 % of the parameters, ViTs with prompts < 0.4 %.
PAPER_RATIOS = {"batchnorm": "0.05–4.88 %", "prompts": "< 0.4 %"}



def _log(args, msg: str) -> None:
  if not getattr(args, "quiet", False):
    print(msg, file=sys.stderr, flush=True)


def _environment() -> dict[str, Any]:
  from fastntk_jax.io.environment import environment
  return environment()


def _write_json(path: str | None, payload: dict) -> None:
  if path:
    from fastntk_jax.io import checkpoint
    checkpoint.atomic_write_json(path, {**payload, **_environment()})


def _csv_classes(text: str | None):
  if text is None:
    return None
  items = [t.strip() for t in text.split(",") if t.strip()]
  if not items:
    raise UsageError("--classes: give a comma-separated list, e.g. 0,1,2 or "
                     "cat,dog.")
  return [int(t) if t.lstrip("-").isdigit() else t for t in items]


def _positive(name: str, value, allow_none: bool = True) -> None:
  if value is None and allow_none:
    return
  if value is None or value < 1:
    raise UsageError(f"{name} must be a positive integer, got {value!r}.")


def _predict(apply_fn, params, x, preprocess, batch_size: int = 250):
  """Logits of uint8 images ``x``, preprocessed a block at a time."""
  from fastntk_jax.core import kernels
  return np.asarray(kernels.predict(lambda p, xb: apply_fn(p, preprocess(xb)),
                                    params, x, block_size=batch_size))


def _accuracy(apply_fn, params, x, y, preprocess) -> float:
  if len(y) == 0:
    return float("nan")
  logits = _predict(apply_fn, params, x, preprocess)
  return float(np.mean(np.argmax(logits, -1) == np.asarray(y)))


# ---------------------------------------------------------------- params
def cmd_params(args) -> dict:
  from fastntk_jax.models import zoo
  names = args.models or list(zoo.MODEL_NAMES)
  for n in names:
    zoo.spec(n)
  rows = []
  for n in names:
    total, num_peft = zoo.param_counts(n, num_classes=args.num_classes,
                                       num_prompts=args.num_prompts)
    s = zoo.spec(n)
    rows.append({"model": n, "input": s.image_size,
                 "peft": "BatchNorm + head" if s.peft == "batchnorm"
                         else f"prompts (L_p={args.num_prompts}) + head",
                 "total": total, "peft_params": num_peft,
                 "ratio_percent": 100.0 * num_peft / total,
                 "paper_ratio": PAPER_RATIOS[s.peft]})
  head = "| model | input | PEFT | total | PEFT params | ratio | paper |"
  print(head)
  print("|---|---|---|---:|---:|---:|---|")
  for r in rows:
    print(f"| {r['model']} | {r['input']} px | {r['peft']} | {r['total']:,} | "
          f"{r['peft_params']:,} | {r['ratio_percent']:.3f} % | "
          f"{r['paper_ratio']} |")
  out = {"command": "params", "num_classes": args.num_classes,
         "num_prompts": args.num_prompts, "rows": rows}
  _write_json(args.json, out)
  return out


# -------------------------------------------------------------- evaluate

def cmd_evaluate(args) -> dict:
  from fastntk_jax.models import zoo
  _positive("--first", args.first)
  _positive("--ipc", args.ipc)
  if args.checkpoint and args.weights:
    raise UsageError("give --checkpoint (a `fastntk train` result) or "
                     "--weights (a backbone), not both.")
  if args.checkpoint:
    name, _, apply_fn, ckpt, prep = model_from_checkpoint(args.checkpoint,
                                                           args.params)
    params = ckpt.trees[args.params]
    classes = ckpt.config.get("data", {}).get("classes")
    if args.model and args.model != name:
      raise UsageError(f"--model {args.model} but {args.checkpoint} holds "
                       f"{name}; drop --model.")
  else:
    if not args.model:
      raise UsageError("--model is required with --weights or without "
                       "--checkpoint (see `fastntk params` for names).")
    name = args.model
    module, variables, pretrained = zoo.load_backbone(name, args.weights)
    if not pretrained:
      raise UsageError(f"no pretrained weights for {name}: pass --weights "
                       "(a `fastntk pretrain` checkpoint).")
    params = variables
    apply_fn = lambda v, x: module.apply(v, x, train=False)
    prep = zoo.preprocess_fn(name)
    classes = None
  ds = load_images(args, args.split, image_size=zoo.spec(name).image_size,
             ipc=args.ipc, first=args.first, classes=classes)
  t0 = time.perf_counter()
  logits = _predict(apply_fn, params, ds.x, prep)
  if logits.shape[-1] < len(ds.class_names):
    raise UsageError(f"the model has {logits.shape[-1]} outputs but the data "
                     f"has {len(ds.class_names)} classes.")
  pred = np.argmax(logits, -1)
  acc = float(np.mean(pred == ds.y))
  per_class = {c: float(np.mean(pred[ds.y == i] == i))
               for i, c in enumerate(ds.class_names) if np.any(ds.y == i)}
  print(f"{name} on {args.data}/{args.split}"
        f"{f' first {args.first}' if args.first else ''}: "
        f"accuracy {100 * acc:.2f} % ({int(np.sum(pred == ds.y))}/{len(ds.y)})")
  out = {"command": "evaluate", "model": name, "weights": args.weights,
         "checkpoint": args.checkpoint, "data": args.data, "split": args.split,
         "first": args.first, "ipc": args.ipc, "num_samples": int(len(ds.y)),
         "accuracy": acc, "per_class_accuracy": per_class,
         "seconds": time.perf_counter() - t0}
  _write_json(args.json, out)
  return out


# -------------------------------------------------------------- pretrain
def _pretrain_split(y: np.ndarray, holdout_ipc: int, max_ipc: int | None):
  """Indices of the pre-training images: every class's images after its
  first ``holdout_ipc`` (those are reserved for fine-tuning and unlearning),
  at most ``max_ipc`` per class, in source order."""
  y = np.asarray(y)
  keep = []
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)[holdout_ipc:]
    if max_ipc is not None:
      idx = idx[:max_ipc]
    keep.append(idx)
  keep = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
  if len(keep) == 0:
    raise UsageError(f"--holdout-ipc {holdout_ipc} leaves no pre-training "
                     "images; lower it.")
  return keep


def _pretrain_config(args, family: str):
  """The :class:`~fastntk_jax.training.train.PretrainConfig` of the flags
  (SGD for CNNs, AdamW for ViTs unless ``--optimizer`` says otherwise)."""
  from fastntk_jax.training import train
  _positive("--epochs", args.epochs, allow_none=False)
  _positive("--max-ipc", args.max_ipc)
  _positive("--test-ipc", args.test_ipc)
  if args.holdout_ipc < 0:
    raise UsageError("--holdout-ipc must be >= 0.")
  optimizer = args.optimizer or ("adamw" if family == "vit" else "sgd")
  lr = args.lr if args.lr is not None else (1e-3 if optimizer == "adamw" else 0.1)
  wd = args.weight_decay if args.weight_decay is not None else (
      0.05 if optimizer == "adamw" else 5e-4)
  return train.PretrainConfig(
      epochs=args.epochs, batch_size=args.batch_size, learning_rate=lr,
      optimizer=optimizer, weight_decay=wd, warmup_epochs=args.warmup_epochs,
      crop_padding=args.crop_padding, flip=not args.no_flip,
      label_smoothing=args.label_smoothing, seed=args.seed)


def _pretrain_resume(args, out_path: Path, cfg):
  """The checkpoint to resume (None for a fresh run), checked against the
  flags before any work."""
  from fastntk_jax.io import checkpoint
  if out_path.exists() and not args.resume:
    raise UsageError(f"--out {out_path} exists; pass --resume to continue it "
                     "or choose another path.")
  if not (args.resume and out_path.exists()):
    return None
  resume = checkpoint.load(out_path, expect_kind="backbone")
  old = resume.config
  for key in ("model", "data", "holdout_ipc", "max_ipc", "seed"):
    if old.get(key) != getattr(args, key):
      raise UsageError(f"--resume: {out_path} was made with {key}="
                       f"{old.get(key)!r}, not {getattr(args, key)!r}.")
  if old.get("pretrain") != cfg._asdict():
    raise UsageError(f"--resume: {out_path} used training config "
                     f"{old.get('pretrain')}; pass the same flags.")
  return resume


def cmd_pretrain(args) -> dict:
  import jax
  from fastntk_jax.io import checkpoint
  from fastntk_jax.training import train
  from fastntk_jax.models import zoo
  s = zoo.spec(args.model)
  cfg = _pretrain_config(args, s.family)
  out_path = Path(args.out)
  resume = _pretrain_resume(args, out_path, cfg)
  ds = load_images(args, "train", image_size=s.image_size)
  idx = _pretrain_split(ds.y, args.holdout_ipc, args.max_ipc)
  x, y = ds.x[idx], ds.y[idx]
  test = load_images(args, "test", image_size=s.image_size, ipc=args.test_ipc)
  num_classes = len(ds.class_names)
  # Pre-training is of the plain backbone: ViT prompts are added at fine-tuning.
  module = zoo.build(args.model, num_classes=num_classes, num_prompts=0)
  variables = zoo.init_variables(module, s.image_size, args.seed)
  prep = zoo.preprocess_fn(args.model)
  state = None
  history = []
  if resume is not None:
    fresh = train.init_pretrain_state(variables, cfg, len(x))
    state = train.PretrainState(
        checkpoint.restore_like(fresh.variables, resume.trees["variables"]),
        checkpoint.restore_like(fresh.opt_state, resume.trees["opt_state"]),
        int(resume.config["epoch"]))
    history = list(resume.config.get("history", []))
    _log(args, f"[pretrain] resuming {out_path} at epoch {state.epoch}")
  _log(args, f"[pretrain] {args.model}: {len(x)} train images "
       f"({num_classes} classes, first {args.holdout_ipc} per class held out), "
       f"{len(test.y)} test images; {cfg}")
  config = {"model": args.model, "data": args.data, "num_classes": num_classes,
            "class_names": list(ds.class_names),
            "holdout_ipc": args.holdout_ipc, "max_ipc": args.max_ipc,
            "seed": args.seed, "pretrain": cfg._asdict(),
            "num_train": int(len(x)), "num_prompts": 0}

  def evaluate(variables):
    apply_fn = lambda v, xb: module.apply(v, xb, train=False)
    return _accuracy(apply_fn, variables, test.x, test.y, prep)

  def on_epoch(st, info):
    if args.eval_every and (info["epoch"] % args.eval_every == 0
                            or info["epoch"] == cfg.epochs):
      info["test_accuracy"] = evaluate(st.variables)
    history.append(info)
    _log(args, f"[pretrain] epoch {info['epoch']}/{cfg.epochs} loss "
         f"{info['loss']:.4f} train {100 * info['train_accuracy']:.1f} %"
         + (f" test {100 * info['test_accuracy']:.1f} %"
            if "test_accuracy" in info else "")
         + f" ({info['seconds']:.1f} s)")
    checkpoint.save(out_path, {"variables": jax.device_get(st.variables),
                               "opt_state": jax.device_get(st.opt_state)},
                    config={**config, "epoch": st.epoch, "history": history},
                    kind="backbone")

  t0 = time.perf_counter()
  state = train.pretrain(module, variables, x, y, preprocess=prep, config=cfg,
                         state=state, on_epoch=on_epoch)
  acc = evaluate(state.variables)
  print(f"{args.model} pretrained for {state.epoch} epochs: test accuracy "
        f"{100 * acc:.2f} % on {len(test.y)} images; checkpoint {out_path}")
  out = {"command": "pretrain", **config, "epochs_done": state.epoch,
         "test_accuracy": acc, "num_test": int(len(test.y)),
         "seconds_this_run": time.perf_counter() - t0,
         "seconds_total": float(sum(h["seconds"] for h in history)),
         "history": history, "checkpoint": str(out_path)}
  _write_json(args.json, out)
  return out


# ----------------------------------------------------------------- train
def _finetune_config(args):
  """The :class:`~fastntk_jax.training.train.FinetuneConfig` of the flags,
  checked before any work."""
  from fastntk_jax.training import train
  _positive("--ipc", args.ipc)
  _positive("--test-ipc", args.test_ipc)
  _positive("--epochs", args.epochs, allow_none=False)
  if args.out and Path(args.out).is_dir():
    raise UsageError(f"--out {args.out} is a directory; give a file path.")
  if args.proximal < 0:
    raise UsageError("--proximal must be >= 0.")
  if args.tangent and args.bn_stats == "data":
    raise UsageError("--tangent with --bn-stats data: the tangent model is "
                     "expanded at the backbone's statistics; keep "
                     "--bn-stats pretrained.")
  return train.FinetuneConfig(
      loss=args.loss, epochs=args.epochs, batch_size=args.batch_size,
      learning_rate=args.lr, weight_decay=args.weight_decay,
      augment=not args.no_flip, seed=args.seed, crop_padding=args.crop_padding,
      schedule=args.schedule, warmup_epochs=args.warmup_epochs,
      proximal=args.proximal, tangent=args.tangent)


def cmd_train(args) -> dict:
  import jax
  import jax.numpy as jnp
  from fastntk_jax.training import bn_stats
  from fastntk_jax.io import checkpoint
  from fastntk_jax.data import splits
  from fastntk_jax.training import train
  from fastntk_jax.models import zoo
  s = zoo.spec(args.model)
  cfg = _finetune_config(args)
  exclude = splits.parse_forget(args.exclude) if args.exclude else None
  classes = _csv_classes(args.classes)
  num_prompts = args.num_prompts if s.family == "vit" else 0
  ds = load_images(args, "train", image_size=s.image_size, ipc=args.ipc,
             classes=classes)
  test = load_images(args, "test", image_size=s.image_size, ipc=args.test_ipc,
               classes=classes)
  module, variables, pretrained = zoo.load_backbone(
      args.model, args.weights, num_prompts=num_prompts, seed=args.seed)
  if not pretrained:
    _log(args, f"[train] warning: no pretrained weights for {args.model}; the "
         "backbone is a random initialisation (pass --weights from "
         "`fastntk pretrain`).")
  prep = zoo.preprocess_fn(args.model)
  x_all, y_all = ds.x, ds.y
  if exclude is not None:  # "Retrain": the same recipe on D_r only.
    keep, _ = splits.apply_forget(exclude, y_all, ds.class_names)
    x_all, y_all = x_all[keep], y_all[keep]
  num_classes = len(ds.class_names)
  variables = {k: dict(v) for k, v in variables.items()}
  if args.bn_stats == "data":
    if "batch_stats" not in variables:
      raise UsageError(f"--bn-stats data: {args.model} has no BatchNorm.")
    variables["batch_stats"] = bn_stats.reestimate(
        module, variables, x_all, preprocess=prep)
  model = zoo.peft_model(args.model, module, variables, num_classes=num_classes,
                      mode=args.peft, head_scale=args.head_scale,
                      seed=args.seed)
  _log(args, f"[train] {args.model}: {model.num_peft:,} of {model.num_total:,} "
       f"parameters tuned ({100 * model.num_peft / model.num_total:.3f} %), "
       f"{len(y_all)} images, {num_classes} classes")
  xf = np.asarray(jax.jit(prep)(jnp.asarray(x_all)))

  def progress(epoch, loss):
    _log(args, f"[train] epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f}")

  res = train.finetune(model.apply_fn, model.init_params, xf, y_all,
                       config=cfg, progress=progress)
  acc_train = _accuracy(res.apply_fn, res.params, x_all, y_all, prep)
  acc_test = _accuracy(res.apply_fn, res.params, test.x, test.y, prep)
  print(f"{args.model} fine-tuned ({args.peft}) in {res.seconds:.1f} s: train "
        f"{100 * acc_train:.2f} %, test {100 * acc_test:.2f} %")
  config = {"model": args.model, "num_classes": num_classes,
            "num_prompts": num_prompts, "class_names": list(ds.class_names),
            "peft": args.peft, "weights": args.weights,
            "pretrained": pretrained, "bn_stats": args.bn_stats,
            "head_scale": args.head_scale,
            "data": {"source": args.data, "ipc": args.ipc, "classes": classes,
                     "test_ipc": args.test_ipc},
            "exclude": args.exclude, "finetune": cfg._asdict(),
            "num_total": model.num_total, "num_peft": model.num_peft}
  metrics = {"train_accuracy": acc_train, "test_accuracy": acc_test,
             "num_train": int(len(y_all)), "num_test": int(len(test.y)),
             "seconds": res.seconds, "losses": res.losses.tolist()}
  if args.out:
    checkpoint.save(args.out, {"w_0": jax.device_get(model.init_params),
                               "w_D": jax.device_get(res.params),
                               "frozen": jax.device_get(model.frozen)},
                    config={**config, "metrics": metrics}, kind="peft")
    _log(args, f"[train] checkpoint {args.out}")
  out = {"command": "train", **config, **metrics, "checkpoint": args.out}
  _write_json(args.json, out)
  return out


# --------------------------------------------------------------- unlearn
def _bn_mode(flag: str, cfg, ckpt, name: str) -> str:
  """``"keep"`` or ``"retain"``: what happens to the BatchNorm statistics."""
  mode = flag
  if mode == "auto":
    mode = "retain" if cfg.get("bn_stats") == "data" else "keep"
  if mode == "retain" and "batch_stats" not in ckpt.trees["frozen"]:
    raise UsageError(f"--bn-stats retain: {name} has no BatchNorm statistics.")
  if mode == "retain" and cfg.get("finetune", {}).get("tangent"):
    raise UsageError("--bn-stats retain: this checkpoint is a tangent model, "
                     "expanded at fixed statistics; use --bn-stats keep.")
  return mode


def _accuracies(fn, params, sets, forget_classes, prep) -> dict:
  """Accuracy on D_r, D_f, the test set and its retained/forgotten classes."""
  (x_r, y_r), (x_f, y_f), (x_t, y_t) = sets
  t_mask = np.isin(y_t, forget_classes)
  return {"retain": _accuracy(fn, params, x_r, y_r, prep),
          "forget": _accuracy(fn, params, x_f, y_f, prep),
          "test": _accuracy(fn, params, x_t, y_t, prep),
          "test_retained_classes": _accuracy(fn, params, x_t[~t_mask],
                                             y_t[~t_mask], prep),
          "test_forgotten_classes": _accuracy(fn, params, x_t[t_mask],
                                              y_t[t_mask], prep)}


def cmd_unlearn(args) -> dict:
  import jax
  import jax.numpy as jnp
  import fastntk_jax as F
  from fastntk_jax import peft
  from fastntk_jax.training import bn_stats
  from fastntk_jax.io import checkpoint
  from fastntk_jax.data import splits
  from fastntk_jax.models import zoo
  if args.damping < 0:
    raise UsageError("--damping must be >= 0.")
  if args.out and Path(args.out).resolve() == Path(args.checkpoint).resolve():
    raise UsageError("--out must differ from --checkpoint (keep the trained "
                     "model).")
  spec = splits.parse_forget(args.forget)
  name, module, apply_fn, ckpt, prep = model_from_checkpoint(args.checkpoint)
  cfg = ckpt.config
  d = cfg["data"]
  data_source = args.data or d["source"]
  args.data = data_source
  ds, test = checkpoint_data(args, cfg, zoo.spec(name).image_size)
  r_idx, f_idx = splits.apply_forget(spec, ds.y, ds.class_names)
  bn_mode = _bn_mode(args.bn_stats, cfg, ckpt, name)
  w_d, w_0 = ckpt.trees["w_D"], ckpt.trees["w_0"]
  to_input = jax.jit(prep)
  xr = np.asarray(to_input(jnp.asarray(ds.x[r_idx])))
  xf = np.asarray(to_input(jnp.asarray(ds.x[f_idx])))
  yr, yf = ds.y[r_idx], ds.y[f_idx]
  _log(args, f"[unlearn] {name}: forgetting {len(f_idx)} of {len(ds.y)} "
       f"samples ({args.forget}); damping {args.damping}, solver {args.solver}")
  res = F.unlearn(apply_fn, w_d, (xr, yr), (xf, yf),
                  anchor=w_0 if args.anchor == "w_0" else None,
                  linearize_at=args.linearize_at, damping=args.damping,
                  loss=args.loss or cfg.get("finetune", {}).get("loss", "mse"),
                  solver=args.solver,
                  memory_budget=int(args.memory_budget * 2**30))
  new_params = jax.device_get(res.params)
  frozen = ckpt.trees["frozen"]
  eval_fn = apply_fn
  if bn_mode == "retain":
    full = peft.merge(new_params, frozen)
    stats = bn_stats.reestimate(module, full, ds.x[r_idx], preprocess=prep)
    frozen = dict(frozen, batch_stats=stats)
    eval_fn = lambda p, x: module.apply(peft.merge(p, frozen), x, train=False)
  forget_classes = sorted(set(int(c) for c in yf)) if spec.kind == "class" else []
  sets = ((ds.x[r_idx], yr), (ds.x[f_idx], yf), (test.x, test.y))
  before = _accuracies(apply_fn, w_d, sets, forget_classes, prep)
  after = _accuracies(eval_fn, new_params, sets, forget_classes, prep)
  print(f"{'':10s} {'D_r':>7s} {'D_f':>7s} {'test':>7s}")
  for label, r in (("before", before), ("Fast-NTK", after)):
    print(f"{label:10s} {100 * r['retain']:6.2f}% {100 * r['forget']:6.2f}% "
          f"{100 * r['test']:6.2f}%")
  diag = {k: getattr(res, k) for k in (
      "solver", "damping", "loss", "linearized_at", "anchored_at",
      "num_retain", "num_forget", "num_params", "delta_norm",
      "forget_residual_norm", "relative_residual", "cond", "rank", "seconds",
      "converged", "status", "iterations", "kept_jacobian", "cg_steps")}
  diag["solves"] = [r._asdict() for r in res.solves]
  print(f"unlearned in {res.seconds:.1f} s ({res.solver} solver, "
        f"{res.num_params:,} PEFT parameters); BatchNorm statistics: {bn_mode}")
  uconf = {"forget": args.forget, "damping": args.damping,
           "solver": args.solver, "loss": res.loss,
           "linearize_at": args.linearize_at, "anchor": args.anchor,
           "bn_stats": bn_mode,
           "source_checkpoint": str(args.checkpoint)}
  if args.out:
    checkpoint.save(args.out, {"w_0": w_0, "w_D": new_params,
                               "w_trained": w_d, "frozen": frozen},
                    config={**cfg, "unlearned": uconf, "data": {
                        **d, "source": data_source}}, kind="peft")
    _log(args, f"[unlearn] checkpoint {args.out}")
  out = {"command": "unlearn", "model": name, **uconf, "before": before,
         "after": after, "diagnostics": diag, "checkpoint": args.out}
  _write_json(args.json, out)
  return out


# ------------------------------------------------------------ experiment
def cmd_experiment(args) -> dict:
  from fastntk_jax import experiments
  overrides = {}
  if args.seeds is not None:
    overrides["seeds"] = args.seeds
  if args.methods is not None:
    overrides["methods"] = args.methods
  cfg = experiments.load_config(args.config, overrides)
  out = Path(args.out) if args.out else Path("results") / cfg["name"]
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out} is a file; give a directory.")
  _log(args, f"[experiment] {cfg['name']}: {len(cfg['seeds'])} seeds x "
       f"{len(cfg['methods'])} methods -> {out}")
  results = experiments.run_experiment(cfg, out, progress=not args.quiet)
  print((out / "table.md").read_text())
  print(f"tables: {out / 'table.md'}\nplots: {out / 'metrics.png'}, "
        f"{out / 'relearn.png'}\nall results (per method, metric and seed): "
        f"{out / 'results.json'}; per-seed records in {out / 'runs'}")
  return results


def cmd_tune(args) -> dict:
  from fastntk_jax.experiments import tuning
  from fastntk_jax.io import atomic
  from fastntk_jax import experiments
  # Tuning starts from the released defaults (and the config's explicit
  # [method.X] keys), never from an earlier tuning's choices.
  cfg = experiments.load_config(args.config, {"tuned": ""})
  if args.methods is not None:
    cfg["tune"]["methods"] = list(args.methods)
  out = Path(args.out) if args.out else Path("results") / "tune" / cfg["name"]
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out} is a file; give a directory.")
  if args.write and not args.write.endswith(".toml"):
    raise UsageError(f"--write {args.write}: give a path ending in .toml "
                     "(the tuning record is written beside it as .json).")
  _log(args, f"[tune] {cfg['name']} -> {out}")
  record = tuning.tune(cfg, out, log=(lambda s: None) if args.quiet else None)
  if args.write:
    dest = Path(args.write)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in ((out / "chosen.toml", dest),
                     (out / "tuning.json", dest.with_suffix(".json"))):
      data = src.read_bytes()
      atomic.atomic_write(dst, lambda f, d=data: f.write(d))
  for m, hp in record["chosen"].items():
    print(f"{m}: {hp}")
  print(f"chosen values: {out / 'chosen.toml'}; every trial: "
        f"{out / 'tuning.json'}"
        + (f"; copied to {args.write}" if args.write else ""))
  return record


COMMANDS = {"params": cmd_params, "evaluate": cmd_evaluate,
            "pretrain": cmd_pretrain, "train": cmd_train,
            "unlearn": cmd_unlearn, "experiment": cmd_experiment,
            "tune": cmd_tune, "deletion": cmd_deletion}


def main(argv=None) -> int:
  """Runs ``fastntk``; returns the exit status (2 for a usage error)."""
  args = build_parser().parse_args(argv)
  try:
    COMMANDS[args.command](args)
  except (UsageError, ValueError, FileNotFoundError) as err:
    # Errors that name a flag or a file: no traceback, exit status 2
    # (FASTNTK_DEBUG=1 shows it).
    if os.environ.get("FASTNTK_DEBUG"):
      raise
    print(f"fastntk {args.command}: error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
