"""A small sweep that picks each unlearning method's defaults (docs/methods.md).

Setting: the pretrained ResNet-20 with BatchNorm + a new head as PEFT
parameters (2,026), the embedded CIFAR-10 subset cut to the first
``--per-class`` training images of each class, fine-tuned with the default
recipe (Adam 1e-2, 30 epochs, batch 100, flips; ``--loss``) to ``w_D``;
class 0 forgotten. For every method and every setting of its small grid, the
method runs through ``methods.run_method`` and its D_f / D_r / test
accuracies are compared with Retrain's (the recipe from ``w_0`` on D_r):
gap = mean of the three absolute differences, in accuracy points. The setting
with the smallest gap is reported per method.

    python benchmarks/tune_baselines.py --out benchmarks/results/tune_baselines.json
    python benchmarks/tune_baselines.py --summarize --out benchmarks/results/tune_baselines.json

Resumable: rows already in --out are skipped. Writes JSON atomically after
every row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from pathlib import Path

import jax
import numpy as np

from fastntk_jax import data, methods

from fastntk_jax.io import atomic

from fastntk_jax.evaluation import metrics

from fastntk_jax.models import zoo

from fastntk_jax.data import splits

from fastntk_jax.training import train
from fastntk_jax.models import normalize_cifar


def grid(**axes):
  keys = list(axes)
  return [dict(zip(keys, vals)) for vals in itertools.product(*axes.values())]


# Kept small: the whole sweep should take ~10 minutes of 2 CPU cores.
GRIDS = {
    "fast_ntk": grid(linearize_at=["w_D", "w_0"]),
    "max_loss": grid(epochs=[5, 10, 20],
                     learning_rate=[5e-4, 1e-3, 2e-3, 3e-3, 1e-2]),
    "random_label": grid(epochs=[5, 10, 20],
                         learning_rate=[1e-3, 2e-3, 3e-3, 1e-2]),
    "ft": grid(epochs=[5, 10, 20], learning_rate=[1e-2, 3e-2]),
    "ga": grid(epochs=[5, 10, 20], learning_rate=[1e-3, 1e-2, 3e-2]),
    "salun": grid(epochs=[5, 10], learning_rate=[1e-2, 3e-2, 1e-1]),
    "bad_teacher": grid(epochs=[5, 10, 20], learning_rate=[1e-3, 1e-2]),
    "scrub": (grid(optimizer=["sgd"], learning_rate=[1e-2, 1e-1], epochs=[10],
                   max_steps=[3, 5])
              + grid(optimizer=["adam"], learning_rate=[1e-3, 1e-2],
                     epochs=[10], max_steps=[3, 5])),
    "sfr_on": (grid(steps=[50, 100], learning_rate=[1e-2, 3e-2], alpha=[25.0])
               + grid(steps=[100], learning_rate=[3e-2], alpha=[5.0, 100.0])
               + grid(steps=[25, 50], learning_rate=[3e-3, 1e-2],
                      clip_norm=[1.0])
               + grid(steps=[25], learning_rate=[3e-3, 1e-2])),
}


def load(per_class: int):
  xtr, ytr, xte, yte = data.load_embedded_cifar10()
  idx = np.concatenate([np.flatnonzero(ytr == c)[:per_class]
                        for c in range(10)])
  x = np.asarray(normalize_cifar(xtr[idx]), np.float32)
  xt = np.asarray(normalize_cifar(xte), np.float32)
  return x, ytr[idx].astype(np.int32), xt, yte.astype(np.int32)


def gap(acc, ref) -> float:
  return float(np.mean([abs(acc[k] - ref[k]) for k in ("forget", "retain",
                                                        "test")]) * 100)


def sweep(args) -> None:
  out = args.out
  res = json.loads(out.read_text()) if out.exists() else {}
  res.setdefault("config", {"per_class": args.per_class, "loss": args.loss,
                            "seed": args.seed, "forget_classes": [0],
                            "epochs": 30})
  res["device"] = str(jax.devices()[0])
  res["platform"] = platform.platform()
  res["versions"] = {"jax": jax.__version__, "python": sys.version.split()[0]}
  res.setdefault("rows", [])
  done = {(r["method"], json.dumps(r["hp"], sort_keys=True))
          for r in res["rows"]}

  def save():
    atomic.atomic_write(out, lambda f: f.write(json.dumps(res, indent=1).encode()))

  x, y, xt, yt = load(args.per_class)
  m = zoo.resnet_bn_head(20, seed=args.seed)
  recipe = train.FinetuneConfig(loss=args.loss, epochs=30, seed=args.seed)
  w_d = train.finetune(m.apply_fn, m.init_params, x, y, config=recipe).params
  retain, forget = splits.class_split(x, y, [0])
  problem = methods.UnlearningProblem(m.apply_fn, m.init_params, w_d, retain,
                                      forget, recipe, 10)

  def report(p):
    return metrics.class_forgetting_report(m.apply_fn, p, retain, forget,
                                           (xt, yt), [0])

  ref = methods.run_method("retrain", problem, seed=args.seed)
  res["retrain"] = report(ref.params)
  res["full"] = report(w_d)
  save()
  rt = res["retrain"]
  print(f"retrain: {rt}\nfull: {res['full']}", flush=True)
  names = args.methods or list(GRIDS)
  for name in names:
    for hp in GRIDS[name]:
      tag = (name, json.dumps(hp, sort_keys=True))
      if tag in done:
        continue
      r = methods.run_method(name, problem, seed=args.seed, **hp)
      acc = report(r.params)
      row = {"method": name, "hp": hp,
             "hyperparameters": r.info["hyperparameters"],
             "acc": acc, "gap": gap(acc, rt),
             "seconds": r.seconds, "compile_seconds": r.compile_seconds}
      res["rows"].append(row)
      save()
      print(f"{name:12s} {hp} gap {row['gap']:5.1f}  D_f {acc['forget']:.3f} "
            f"D_r {acc['retain']:.3f} test {acc['test']:.3f}  "
            f"{r.seconds:.1f}s", flush=True)


def summarize(path: Path) -> str:
  res = json.loads(path.read_text())
  rt = res["retrain"]
  lines = ["| method | setting | D_f | D_r | test | gap (points) | seconds |",
           "|---|---|---|---|---|---|---|"]
  for ref in ("full", "retrain"):
    a = res[ref]
    lines.append(f"| {ref} | – | {a['forget']*100:.1f} | {a['retain']*100:.1f} "
                 f"| {a['test']*100:.1f} | {gap(a, rt):.1f} | |")
  best = {}
  for r in res["rows"]:
    if r["method"] not in best or r["gap"] < best[r["method"]]["gap"]:
      best[r["method"]] = r
  order = {m: i for i, m in enumerate(methods.METHOD_NAMES)}
  for r in sorted(res["rows"], key=lambda r: order[r["method"]]):
    a = r["acc"]
    # The setting as it differs from the current defaults.
    now = methods.defaults(r["method"])
    hp = ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items()
                   if now.get(k) != v) or "defaults"
    mark = " **best**" if best[r["method"]] is r else ""
    lines.append(f"| {r['method']} | {hp}{mark} | {a['forget']*100:.1f} | "
                 f"{a['retain']*100:.1f} | {a['test']*100:.1f} | "
                 f"{r['gap']:.1f} | {r['seconds']:.1f} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", type=Path,
                  default=Path("benchmarks/results/tune_baselines.json"))
  ap.add_argument("--summarize", action="store_true",
                  help="print the Markdown table of --out and exit")
  ap.add_argument("--per-class", type=int, default=20,
                  help="training images per class (first ones)")
  ap.add_argument("--loss", default="mse", choices=["mse", "ce"],
                  help="the fine-tuning recipe's loss")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--methods", nargs="*", choices=list(GRIDS),
                  help="only these methods (default: all)")
  args = ap.parse_args()
  if args.summarize:
    print(summarize(args.out))
    return
  sweep(args)


if __name__ == "__main__":
  main()
