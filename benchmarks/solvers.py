"""Dual (kernel-space) versus primal (parameter-space) Eq. (1) on the quickstart problem.

Fine-tunes ResNet-20's BatchNorm + head on the embedded CIFAR-10 subset (MSE), then runs
`unlearn` with solver="dual" and solver="primal" (twice each: the second run is warm) and
reports wall time, the relative difference of the two updates, and accuracies.

    python benchmarks/solvers.py --out benchmarks/results/solvers_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import fastntk_jax as F
from fastntk_jax import data
from fastntk_jax.io import atomic
from fastntk_jax.evaluation import metrics
from fastntk_jax.models import zoo
from fastntk_jax.data import splits
from fastntk_jax.training import train
from fastntk_jax.models import normalize_cifar


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--epochs", type=int, default=30)
  ap.add_argument("--damping", type=float, default=F.DEFAULT_DAMPING)
  ap.add_argument("--out", type=Path, default=Path("benchmarks/results/solvers_cpu.json"))
  args = ap.parse_args(argv)
  xtr, ytr, xte, yte = data.load_embedded_cifar10()
  x, xt = np.asarray(normalize_cifar(xtr)), np.asarray(normalize_cifar(xte))
  m = zoo.resnet_bn_head(20, seed=args.seed)
  retain, forget = splits.class_split(x, ytr, [0])
  w_d = train.finetune(m.apply_fn, m.init_params, x, ytr,
                       config=train.FinetuneConfig(epochs=args.epochs, seed=args.seed)).params
  flat_d = ravel_pytree(w_d)[0]
  runs, deltas = {}, {}
  for solver in ("dual", "primal"):
    for attempt in ("cold", "warm"):
      r = F.unlearn(m.apply_fn, w_d, retain, forget, damping=args.damping, solver=solver)
      runs[f"{solver}_{attempt}"] = r.summary()
    deltas[solver] = ravel_pytree(r.params)[0] - flat_d
    runs[solver + "_accuracy"] = metrics.class_forgetting_report(
        m.apply_fn, r.params, retain, forget, (xt, yte), [0])
  rel = float(jnp.linalg.norm(deltas["dual"] - deltas["primal"]) /
              jnp.linalg.norm(deltas["primal"]))
  device = jax.devices()[0]
  out = {"benchmark": "solvers", "device": f"{device.platform}: {device.device_kind}",
         "cpu_count": os.cpu_count(), "platform": platform.platform(),
         "versions": {"jax": jax.__version__, "python": sys.version.split()[0],
                      "fastntk_jax": F.__version__},
         "config": {**vars(args), "out": str(args.out), "n_retain": len(retain[1]),
                    "n_forget": len(forget[1]), "num_params": int(flat_d.shape[0])},
         "relative_difference_dual_vs_primal": rel, "runs": runs}
  print(json.dumps(out, indent=1))
  text = json.dumps(out, indent=1)
  atomic.atomic_write(args.out, lambda f: f.write(text.encode()))


if __name__ == "__main__":
  main()
