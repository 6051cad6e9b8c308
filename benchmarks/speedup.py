"""The honest speed-up of Fast-NTK over Retrain, measured side by side in one run.

ResNet-20 (the shipped CIFAR-10 weights), BatchNorm scale/shift + a new head
(P = 2,026), MSE recipe (Adam, batch 250, lr 1e-2). For each ``--n-train``,
in one process and on the same devices:

1. ``w_D``: the recipe for ``--finetune-epochs`` on D (``--n-train`` CIFAR-10
   train images).
2. **Retrain (class)**: the same recipe from ``w_0`` on D_r (class
   ``--forget-class`` removed), epoch by epoch, until its accuracy on the test
   images of the retained classes reaches ``w_D``'s (at most
   ``--max-retrain-epochs``). Its seconds are its training epochs; the
   accuracy checks between epochs are not counted, the compilation is (it
   was already compiled by step 1, which favours Retrain).
3. **Fast-NTK from scratch** on the same class: the exact parameter-space
   solver, and the sketch ``Sketched(cotangents=s)`` for each
   ``--cotangents`` (approximate; ``docs/scale.md``). Wall seconds include
   compilation.
4. **prepare + one request**: ``deletion.prepare`` over D once, then one
   request of ``--request`` random images (its first call, which compiles,
   and a warm repeat).
5. **Retrain (request)**: the recipe on D without the request, until its
   accuracy on the whole test set reaches ``w_D``'s.

Accuracy on D_f, D_r and the test set for every model, and the ratios
``Retrain seconds / method seconds``. The JSON is rewritten after every
stage, so a killed run keeps what it finished.

    python benchmarks/speedup.py --n-train 10000 50000 \\
        --out benchmarks/results/speedup_cpu.json
    python benchmarks/speedup.py --n-train 1000 --test-n 500 \\
        --finetune-epochs 1 --out /tmp/speedup_smoke.json      # smoke

On a GPU the same command runs there (``--host-devices`` only affects CPU
hosts).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from cifar_setup import Stages, accuracy, load_cifar10, peak_rss_gib
from cifar_setup import peft_resnet20, rel, use_host_devices, write_json
from fastntk_jax import ParameterSpace, Sketched, unlearn
from fastntk_jax.core import deletion
from fastntk_jax.evaluation import timing
from fastntk_jax.io.environment import environment
from fastntk_jax.training import train


def _args(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n-train", type=int, nargs="+", default=[10000, 50000])
  ap.add_argument("--test-n", type=int, default=10000)
  ap.add_argument("--forget-class", type=int, default=0)
  ap.add_argument("--finetune-epochs", type=int, default=3)
  ap.add_argument("--max-retrain-epochs", type=int, default=None,
                  help="cap on Retrain's epochs (default: 3 x "
                       "--finetune-epochs)")
  ap.add_argument("--damping", type=float, default=1.0)
  ap.add_argument("--cotangents", type=int, nargs="*", default=[1],
                  help="sketch sizes s (none: no sketch rows)")
  ap.add_argument("--request", type=int, default=100)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--host-devices", type=int, default=os.cpu_count() or 1,
                  help="CPU devices XLA exposes (default: one per core)")
  ap.add_argument("--out", type=Path, required=True)
  args = ap.parse_args(argv)
  if min(args.n_train) < 100 or args.test_n < 10:
    ap.error("--n-train must all be >= 100 and --test-n >= 10")
  if args.finetune_epochs < 1:
    ap.error("--finetune-epochs must be >= 1")
  args.max_retrain_epochs = args.max_retrain_epochs or 3 * args.finetune_epochs
  if args.max_retrain_epochs < 1:
    ap.error("--max-retrain-epochs must be >= 1")
  if args.cotangents and min(args.cotangents) < 1:
    ap.error(f"--cotangents must all be >= 1, got {args.cotangents}")
  if not 1 <= args.request < min(args.n_train):
    ap.error("--request must be >= 1 and below every --n-train")
  use_host_devices(ap, args.host_devices)
  return args


def recipe(args, epochs: int) -> train.FinetuneConfig:
  return train.FinetuneConfig(loss="mse", epochs=epochs, batch_size=250,
                              learning_rate=1e-2, seed=args.seed)


def retrain_to(model, x, y, target: float, eval_set, args) -> dict:
  """The recipe from ``w_0`` on ``(x, y)`` until accuracy on ``eval_set``
  reaches ``target`` (at most ``--max-retrain-epochs``)."""
  accs = []

  def until(epoch, params):
    accs.append(accuracy(model.apply_fn, params, *eval_set))
    return accs[-1] >= target

  t = time.perf_counter()
  res = train.finetune(model.apply_fn, model.init_params, x, y,
                       config=recipe(args, args.max_retrain_epochs),
                       until=until)
  return {"params": res.params, "epochs": len(res.epoch_seconds),
          "seconds": float(np.sum(res.epoch_seconds)),
          "epoch_seconds": [float(s) for s in res.epoch_seconds],
          "wall_seconds_with_checks": time.perf_counter() - t,
          "eval_accuracy_per_epoch": accs, "target": target,
          "reached": bool(accs and accs[-1] >= target)}


def run_size(args, n_train: int, out: dict, save) -> None:
  stage = Stages(out.setdefault("stages", {}))
  x, y, x_te, y_te, rng = load_cifar10(stage, n_train, args.test_n, args.seed)
  model, out["pretrained_backbone"] = peft_resnet20(args.seed)
  out["num_params"] = int(ravel_pytree(model.init_params)[0].shape[0])
  forget = y == args.forget_class
  retain, forget_set = (x[~forget], y[~forget]), (x[forget], y[forget])
  kept_te = y_te != args.forget_class
  out["n_train"], out["n_retain"] = int(len(y)), int((~forget).sum())

  def acc(params):
    return {"acc_forget": accuracy(model.apply_fn, params, *forget_set),
            "acc_retain": accuracy(model.apply_fn, params, *retain),
            "acc_test": accuracy(model.apply_fn, params, x_te, y_te),
            "acc_test_retained_classes": accuracy(
                model.apply_fn, params, x_te[kept_te], y_te[kept_te])}

  ft = stage("finetune", lambda: train.finetune(
      model.apply_fn, model.init_params, x, y,
      config=recipe(args, args.finetune_epochs)))
  w_d = ft.params
  out["finetune"] = {"epochs": args.finetune_epochs,
                     "epoch_seconds": [float(s) for s in ft.epoch_seconds],
                     **acc(w_d)}
  save()

  # Retrain on D_r until it reaches w_D's accuracy on the retained classes.
  rt = retrain_to(model, *retain, out["finetune"]["acc_test_retained_classes"],
                  (x_te[kept_te], y_te[kept_te]), args)
  out["retrain_class"] = {k: v for k, v in rt.items() if k != "params"}
  out["retrain_class"].update(acc(rt["params"]))
  print("retrain (class):", {k: out["retrain_class"][k] for k in (
      "epochs", "seconds", "acc_forget", "acc_retain", "acc_test")},
      flush=True)
  save()

  rows = out.setdefault("unlearn_class", {})
  exact = None
  solvers = [("exact", ParameterSpace())] + [
      (f"sketch_s{s}", Sketched(cotangents=s, seed=args.seed))
      for s in args.cotangents]
  for name, solver in solvers:
    with timing.measure() as m:
      res = unlearn(model.apply_fn, w_d, retain, forget_set,
                    anchor=model.init_params, damping=args.damping,
                    solver=solver)
      jax.block_until_ready(res.params)
    row = {"solver": res.solver, "seconds": m.seconds,
           "compile_seconds": m.compile_seconds, **acc(res.params),
           "speedup_over_retrain": out["retrain_class"]["seconds"] / m.seconds}
    if exact is None:
      exact = res.params
    else:
      row["relative_difference_to_exact"] = rel(res.params, exact)
    rows[name] = row
    print(f"unlearn ({name}):", row, flush=True)
    save()

  ids = np.arange(len(y))
  with timing.measure() as m:
    state = deletion.prepare(model.apply_fn, w_d, (x, y), ids=ids,
                             anchor=model.init_params, damping=args.damping,
                             memory_budget=16 * 2**30)
  prep = {"seconds": m.seconds, "compile_seconds": m.compile_seconds}
  req = np.sort(rng.choice(len(y), args.request, replace=False))
  with timing.measure() as m:
    r = deletion.forget(state, model.apply_fn, w_d, (x[req], y[req]), ids=req)
    jax.block_until_ready(r.params)
  first = {"seconds": m.seconds, "compile_seconds": m.compile_seconds}
  t = time.perf_counter()
  r = deletion.forget(state, model.apply_fn, w_d, (x[req], y[req]), ids=req)
  jax.block_until_ready(r.params)
  warm = time.perf_counter() - t
  keep = np.ones(len(y), bool)
  keep[req] = False
  req_acc = {"acc_forget": accuracy(model.apply_fn, r.params, x[req], y[req]),
             "acc_retain": accuracy(model.apply_fn, r.params, x[keep],
                                    y[keep]),
             "acc_test": accuracy(model.apply_fn, r.params, x_te, y_te)}
  out["request"] = {"num_forget": args.request, "prepare": prep,
                    "first_request": first, "warm_request_seconds": warm,
                    "accuracy_before": {
                        "acc_forget": accuracy(model.apply_fn, w_d, x[req],
                                               y[req])},
                    **req_acc}
  save()
  rr = retrain_to(model, x[keep], y[keep], out["finetune"]["acc_test"],
                  (x_te, y_te), args)
  out["retrain_request"] = {k: v for k, v in rr.items() if k != "params"}
  out["retrain_request"].update({
      "acc_forget": accuracy(model.apply_fn, rr["params"], x[req], y[req]),
      "acc_retain": accuracy(model.apply_fn, rr["params"], x[keep], y[keep]),
      "acc_test": accuracy(model.apply_fn, rr["params"], x_te, y_te)})
  rs = out["retrain_request"]["seconds"]
  out["request"]["speedup_over_retrain"] = {
      "warm_request": rs / warm,
      "first_request": rs / first["seconds"],
      "prepare_plus_first_request": rs / (prep["seconds"] + first["seconds"])}
  out["ratios"] = {
      **{f"retrain_class_over_{k}": v["speedup_over_retrain"]
         for k, v in rows.items()},
      **{f"retrain_request_over_{k}": v
         for k, v in out["request"]["speedup_over_retrain"].items()}}
  print("request:", out["request"], flush=True)
  print("ratios:", out["ratios"], flush=True)
  out["peak_rss_gib"] = peak_rss_gib()
  save()


def main(argv=None):
  args = _args(argv)
  t0 = time.perf_counter()
  result = {"benchmark": "speedup", **environment(),
            "cpu_count": os.cpu_count(),
            "mesh_devices": [str(d) for d in jax.local_devices()],
            "config": vars(args) | {
                "out": str(args.out), "recipe": "mse, Adam, batch 250, "
                "lr 1e-2, flips", "model": "resnet20 (CIFAR-10 weights), "
                "BatchNorm scale/shift + new head",
                "retrain_rule": "the recipe from w_0, epoch by epoch, until "
                "its test accuracy (retained classes for the class; all for "
                "the request) reaches w_D's"},
            "sizes": {}}

  def save():
    result["total_seconds"] = time.perf_counter() - t0
    write_json(args.out, result)

  for n in args.n_train:
    print(f"== n_train {n}", flush=True)
    run_size(args, n, result["sizes"].setdefault(str(n), {}), save)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  sys.exit(main())
