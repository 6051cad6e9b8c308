"""Fast-NTK quickstart: make a fine-tuned ResNet-20 forget a CIFAR-10 class.

1. Pretrained ResNet-20 backbone (shipped weights), a new 10-class head, as a
   Flax NNX module; an NNX filter selects BatchNorm scale/shift + the head
   (2,026 of 269,722 weights) as the PEFT pytree.
2. Fine-tune only those with optax on the embedded CIFAR-10 subset (MSE on
   one-hot targets).
3. Forget class 0 with the one-shot NTK update of Eq. (1), computed over the
   PEFT parameters only, and write it back into the NNX model.
4. Compare with Retrain: the same recipe from w_0 on the retain set only.

    python examples/quickstart.py            # ~3-4 minutes on 2 CPU cores
    python examples/quickstart.py --ipc 20 --epochs 10   # faster
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import fastntk_jax as F
from fastntk_jax import data
from fastntk_jax.data import splits
from fastntk_jax.evaluation import metrics
from fastntk_jax.models import normalize_cifar
from fastntk_jax.models import zoo
from fastntk_jax.peft import nnx as peft_nnx
from fastntk_jax.training import train


def parse_args(argv=None):
  ap = argparse.ArgumentParser(
      description="Fine-tune ResNet-20's BatchNorm + head on embedded CIFAR-10, "
      "forget a class with Fast-NTK, compare with retraining.")
  ap.add_argument("--ipc", type=int, default=100,
                  help="training images per class, 1..100 (default 100)")
  ap.add_argument("--test-ipc", type=int, default=100,
                  help="test images per class, 1..100 (default 100)")
  ap.add_argument("--epochs", type=int, default=30,
                  help="fine-tuning epochs (default 30)")
  ap.add_argument("--loss", choices=("mse", "ce"), default="mse",
                  help="fine-tuning loss, and the loss of the linearised "
                  "problem Fast-NTK solves (default mse)")
  ap.add_argument("--forget-class", type=int, default=0,
                  help="class to forget, 0..9 (default 0, airplane)")
  ap.add_argument("--damping", type=float, default=F.DEFAULT_DAMPING,
                  help=f"λ (default {F.DEFAULT_DAMPING})")
  ap.add_argument("--linearize-at", choices=("w_D", "w_0"), default="w_D",
                  help="take J and f at the fine-tuned parameters (w_D, "
                  "default) or at w_0 before fine-tuning")
  ap.add_argument("--anchor", choices=("w_0", "w_D"), default="w_0",
                  help="centre of the ridge term: w_0 (default) or w_D (what "
                  "unlearn does when it is not given w_0)")
  ap.add_argument("--solver", choices=("auto", "dual", "primal", "cg"),
                  default="auto")
  ap.add_argument("--head-scale", type=float, default=0.1,
                  help="scale of the new head's initial kernel (default 0.1; "
                  "see fastntk_jax.models.zoo.resnet_bn_head)")
  ap.add_argument("--seed", type=int, default=0,
                  help="head initialisation, data order, augmentation")
  ap.add_argument("--json", type=Path, default=None,
                  help="also write the results to this JSON file (atomically)")
  args = ap.parse_args(argv)
  if not 1 <= args.ipc <= 100 or not 1 <= args.test_ipc <= 100:
    ap.error("--ipc and --test-ipc must be in 1..100 (the embedded subset has "
             "100 train and 100 test images a class)")
  if not 0 <= args.forget_class <= 9:
    ap.error("--forget-class must be in 0..9")
  if args.epochs < 1:
    ap.error("--epochs must be >= 1")
  return args


def first_per_class(x, y, k):
  idx = np.concatenate([np.flatnonzero(y == c)[:k] for c in range(10)])
  return x[idx], y[idx]


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  xtr, ytr, xte, yte = data.load_embedded_cifar10()
  xtr, ytr = first_per_class(xtr, ytr, args.ipc)
  xte, yte = first_per_class(xte, yte, args.test_ipc)
  x, xt = np.asarray(normalize_cifar(xtr)), np.asarray(normalize_cifar(xte))
  net = zoo.nnx_model("resnet20", seed=args.seed, head_scale=args.head_scale)
  model = peft_nnx.make_apply_fn(net.model, net.peft_filter)
  retain, forget = splits.class_split(x, ytr, [args.forget_class])
  print(f"ResNet-20: {model.num_total:,} parameters, PEFT (BatchNorm + head): "
        f"{model.num_peft:,} ({100 * model.num_peft / model.num_total:.2f} %)")
  print(f"D: {len(ytr)} images ({args.ipc} a class), D_f: class "
        f"{args.forget_class} ({data.CIFAR10_CLASSES[args.forget_class]}, "
        f"{len(forget[1])} images), test: {len(yte)} images")

  cfg = train.FinetuneConfig(loss=args.loss, epochs=args.epochs, seed=args.seed)
  full = train.finetune(model.apply_fn, model.init_params, x, ytr, config=cfg)
  print(f"fine-tuned on D ({args.loss}, {args.epochs} epochs): {full.seconds:.1f}s")
  retrain = train.finetune(model.apply_fn, model.init_params, *retain,
                           config=cfg)
  print(f"retrained on D_r: {retrain.seconds:.1f}s")
  res = F.unlearn(model.apply_fn, full.params, retain, forget,
                  anchor=model.init_params if args.anchor == "w_0" else None,
                  linearize_at=args.linearize_at, damping=args.damping,
                  loss=args.loss, solver=args.solver)
  print(f"Fast-NTK ({res.solver} solver, λ={res.damping}, J at "
        f"{res.linearized_at}, anchored at {res.anchored_at}): "
        f"{res.seconds:.1f}s, ‖Δw‖={res.delta_norm:.3f}, Newton steps "
        f"{[r.iterations for r in res.solves]}")
  peft_nnx.update(net.model, res.params)  # the deployed NNX model forgets
  gap = float(np.max(np.abs(np.asarray(net.model(xt))
                            - np.asarray(model.apply_fn(res.params, xt)))))
  print(f"written back into the NNX model (max logit difference {gap:.1e})")

  report = lambda p: metrics.class_forgetting_report(
      model.apply_fn, p, retain, forget, (xt, yte), [args.forget_class])
  rows = {"Before (fine-tuned on D)": (report(full.params), full.seconds),
          "Fast-NTK": (report(res.params), res.seconds),
          "Retrain (on D_r)": (report(retrain.params), retrain.seconds)}
  head = (f"{'':26s}{'D_r':>8s}{'D_f':>8s}{'test':>8s}{'test D_r cls':>14s}"
          f"{'test D_f cls':>14s}{'seconds':>9s}")
  print("\nAccuracy (%)\n" + head)
  for name, (r, sec) in rows.items():
    print(f"{name:26s}{100 * r['retain']:8.1f}{100 * r['forget']:8.1f}"
          f"{100 * r['test']:8.1f}{100 * r['test_retained']:14.1f}"
          f"{100 * r['test_forgotten']:14.1f}{sec:9.1f}")
  print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
  if args.json is not None:
    out = {"args": {k: str(v) for k, v in vars(args).items()},
           "rows": {k: {**r, "seconds": s} for k, (r, s) in rows.items()},
           "unlearn": res.summary(), "write_back_max_logit_gap": gap}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(args.json.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.json)
  return rows


if __name__ == "__main__":
  main()
  sys.exit(0)
