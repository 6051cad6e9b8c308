"""Approximate Grams for large N: the sketched solver against the exact one.

ResNet-20 (the shipped CIFAR-10 weights) with BatchNorm scale/shift + a new
head (P = 2,026), fine-tuned with MSE on ``--n-train`` CIFAR-10 train images;
a class forgotten. In one run: ``unlearn`` with the exact parameter-space
solver, then with ``Sketched(cotangents=s)`` for each ``--cotangents`` (``s``
reverse passes a retained sample instead of C = 10 for ``A_r``; ``J_rᵀ r``
and everything on D_f exact). For each: wall time (compilation separately),
FA / RA / TA and their differences to the exact update in points, the
relative difference of the parameters, the split-half error estimate, and
(``--check-residual``) the exact retain system's residual.

    python benchmarks/approximate_gram.py --n-train 10000 \\
        --out benchmarks/results/approximate_gram_n10000_cpu.json
    python benchmarks/approximate_gram.py --n-train 50000 \\
        --out benchmarks/results/approximate_gram_n50000_cpu.json

The JSON is rewritten after every solver, so a killed run keeps what it
finished. Target (issue 18): 50,000 images in at most 3 minutes on 2 CPU
cores, FA, RA and TA within 1 point of the exact update.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
from jax.flatten_util import ravel_pytree

from cifar_setup import Stages, accuracy, finetune, load_cifar10
from cifar_setup import peak_rss_gib, peft_resnet20, rel, use_host_devices
from cifar_setup import write_json
from fastntk_jax import ParameterSpace, Sketched, unlearn
from fastntk_jax.io.environment import environment


def _args(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n-train", type=int, default=50000)
  ap.add_argument("--test-n", type=int, default=10000)
  ap.add_argument("--forget-class", type=int, default=0)
  ap.add_argument("--finetune-epochs", type=int, default=1)
  ap.add_argument("--damping", type=float, default=1.0)
  ap.add_argument("--cotangents", type=int, nargs="+", default=[1, 2, 4],
                  help="sketch sizes s to run (each >= 1; default 1 2 4)")
  ap.add_argument("--sketch-seed", type=int, default=0)
  ap.add_argument("--check-residual", action=argparse.BooleanOptionalAction,
                  default=False, help="one more pass over D_r per sketch for "
                  "the exact retain residual (not in the timed target)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--host-devices", type=int, default=os.cpu_count() or 1,
                  help="CPU devices XLA exposes (default: one per core)")
  ap.add_argument("--out", type=Path, required=True)
  args = ap.parse_args(argv)
  if args.n_train < 100 or args.test_n < 1:
    ap.error("--n-train must be >= 100 and --test-n >= 1")
  if min(args.cotangents) < 1:
    ap.error(f"--cotangents must all be >= 1, got {args.cotangents}")
  use_host_devices(ap, args.host_devices)
  return args


def main(argv=None):
  args = _args(argv)
  t_start = time.perf_counter()
  out = {"benchmark": "approximate_gram", **environment(),
         "cpu_count": os.cpu_count(),
         "mesh_devices": [str(d) for d in jax.local_devices()],
         "config": vars(args) | {"out": str(args.out), "recipe": "mse",
                                 "model": "resnet20 (CIFAR-10 weights), "
                                 "BatchNorm scale/shift + new head"},
         "stages": {}, "solvers": {}}
  stage = Stages(out["stages"])
  x, y, x_te, y_te, _ = load_cifar10(stage, args.n_train, args.test_n,
                                     args.seed)
  model, out["pretrained_backbone"] = peft_resnet20(args.seed)
  out["num_params"] = int(ravel_pytree(model.init_params)[0].shape[0])
  w_d = finetune(stage, model, x, y, "mse", args.finetune_epochs, args.seed)
  forget = y == args.forget_class
  retain, forget_set = (x[~forget], y[~forget]), (x[forget], y[forget])
  out["n_retain"], out["n_forget"] = int((~forget).sum()), int(forget.sum())

  def acc(params):
    return {"acc_retain": accuracy(model.apply_fn, params, *retain),
            "acc_forget": accuracy(model.apply_fn, params, *forget_set),
            "acc_test": accuracy(model.apply_fn, params, x_te, y_te)}

  out["accuracy_finetuned"] = acc(w_d)
  runs = [("exact", ParameterSpace())] + [
      (f"sketch_s{s}", Sketched(cotangents=s, seed=args.sketch_seed,
                                check_residual=args.check_residual))
      for s in args.cotangents]
  exact = None
  for name, solver in runs:
    res = stage(f"unlearn_{name}", lambda: unlearn(
        model.apply_fn, w_d, retain, forget_set, anchor=model.init_params,
        damping=args.damping, solver=solver))
    row = {"solver": res.solver, "seconds": out["stages"][f"unlearn_{name}"][
        "seconds"], "compile_seconds": out["stages"][f"unlearn_{name}"][
        "compile_seconds"], "approximation": res.approximation,
        "relative_update_size": rel(w_d, res.params), **acc(res.params)}
    if exact is None:
      exact = (res.params, row)
    else:
      row["relative_difference_to_exact"] = rel(res.params, exact[0])
      # The error of the update itself, which split_half_error estimates.
      step = lambda w: jax.tree_util.tree_map(lambda a, b: a - b, w, w_d)
      row["relative_error_of_update"] = rel(step(res.params), step(exact[0]))
      row["points_from_exact"] = {k: row[k] - exact[1][k] for k in (
          "acc_retain", "acc_forget", "acc_test")}
      row["speedup_over_exact"] = exact[1]["seconds"] / row["seconds"]
    out["solvers"][name] = row
    print(name, {k: v for k, v in row.items() if k != "approximation"},
          row["approximation"], flush=True)
    out["peak_rss_gib"] = peak_rss_gib()
    out["total_seconds"] = time.perf_counter() - t_start
    write_json(args.out, out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  sys.exit(main())
