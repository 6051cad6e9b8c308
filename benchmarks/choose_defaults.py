"""Measures which Eq. (1) settings come closest to Retrain on the quickstart.

For each seed: fine-tune BatchNorm + a new head of the pretrained ResNet-20 on
the embedded CIFAR-10 subset with MSE and with cross-entropy (w_D), retrain on
D_r from w_0 (Retrain), then apply Eq. (1) (parameter space) for every
linearisation point (w_0 = init, w_D = trained), residual (mse, ce) and damping,
and record accuracies on D_r, D_f and test beside Retrain's.

    python benchmarks/choose_defaults.py --seeds 0 1 2 --out benchmarks/results/defaults_sweep.json
    python benchmarks/choose_defaults.py --summarize   # the Markdown table

Resumable: seeds already in --out are skipped. Writes JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import fastntk_jax as F
from fastntk_jax import _io, data, kernels, metrics, setups, train, update
from fastntk_jax.models import normalize_cifar
from fastntk_jax.unlearn import _residuals


def atomic_json(path: Path, obj) -> None:
  text = json.dumps(obj, indent=1)
  _io.atomic_write(path, lambda f: f.write(text.encode()))


def run_seed(seed, args, x, y, xt, yt):
  m = setups.resnet_bn_head(20, seed=seed)
  retain, forget = setups.class_split(x, y, args.forget_classes)
  test = (xt, yt)
  cfg = lambda loss: train.FinetuneConfig(loss=loss, epochs=args.epochs, seed=seed)
  rep = lambda p: metrics.class_forgetting_report(m.apply_fn, p, retain, forget,
                                                  test, args.forget_classes)
  out = {"seed": seed, "finetune": {}, "rows": []}
  grams = {}

  def grams_at(key, lin):
    if key not in grams:
      t = time.perf_counter()
      a_r, _ = kernels.gram(m.apply_fn, lin, retain[0])
      a_f, _ = kernels.gram(m.apply_fn, lin, forget[0])
      jax.block_until_ready((a_r, a_f))
      grams[key] = (a_r, a_f, time.perf_counter() - t)
      print(f"  gram at {key}: {grams[key][2]:.1f}s", flush=True)
    return grams[key]

  for ft in args.finetune_losses:
    w_d = train.finetune(m.apply_fn, m.init_params, x, y, config=cfg(ft))
    w_r = train.finetune(m.apply_fn, m.init_params, *retain, config=cfg(ft))
    out["finetune"][ft] = {"full": rep(w_d.params), "retrain": rep(w_r.params),
                           "seconds_finetune": w_d.seconds,
                           "seconds_retrain": w_r.seconds,
                           "final_loss": float(w_d.losses[-1])}
    print(f" seed {seed} {ft}: full {out['finetune'][ft]['full']} retrain "
          f"{out['finetune'][ft]['retrain']}", flush=True)
    flat_d, unravel = ravel_pytree(w_d.params)
    flat_r, _ = ravel_pytree(w_r.params)
    for lin_name, lin in (("init", m.init_params), ("trained", w_d.params)):
      if lin_name not in args.linearize:
        continue
      a_r, a_f, _ = grams_at("init" if lin_name == "init" else f"trained-{ft}", lin)
      f_r = kernels.predict(m.apply_fn, lin, retain[0])
      f_f = kernels.predict(m.apply_fn, lin, forget[0])
      for res in ("mse", "ce"):
        r_r = _residuals(f_r, retain[1], res).reshape(f_r.shape)
        r_f = _residuals(f_f, forget[1], res).reshape(f_f.shape)
        b_r = ravel_pytree(kernels.vjp(m.apply_fn, lin, retain[0], r_r))[0]
        b_f = ravel_pytree(kernels.vjp(m.apply_fn, lin, forget[0], r_f))[0]
        for lam in args.dampings:
          upd = update.parameter_space(a_r, a_f, b_r, b_f, lam)
          ok = all(bool(i.ok) for i in upd.infos)
          new = unravel(flat_d + upd.delta)
          row = {"finetune": ft, "linearize": lin_name, "residual": res,
                 "damping": lam, "ok": ok,
                 "delta_norm": float(jnp.linalg.norm(upd.delta)),
                 "dist_to_retrain": float(jnp.linalg.norm(flat_d + upd.delta - flat_r)),
                 "dist_full_to_retrain": float(jnp.linalg.norm(flat_d - flat_r)),
                 **(rep(new) if ok else {})}
          out["rows"].append(row)
          print("  ", {k: (round(v, 3) if isinstance(v, float) else v)
                       for k, v in row.items()}, flush=True)
  return out


def summarize(path: Path) -> str:
  """Markdown table: mean ± std over seeds, and the mean gap to Retrain.

  gap = (|ΔD_r| + |ΔD_f| + |Δtest|) / 3 in accuracy points against Retrain
  fine-tuned with the same loss and seed.
  """
  res = json.loads(path.read_text())
  seeds = sorted(res["seeds"])
  groups, failed = {}, {}
  for s in seeds:
    r = res["seeds"][s]
    for row in r["rows"]:
      key = (row["finetune"], row["linearize"], row["residual"], row["damping"])
      ret = r["finetune"][row["finetune"]]["retrain"]
      failed.setdefault(key, 0)
      if not row["ok"]:
        failed[key] += 1
        continue
      gap = 100 * (abs(row["retain"] - ret["retain"]) + abs(row["forget"] - ret["forget"])
                   + abs(row["test"] - ret["test"])) / 3
      groups.setdefault(key, []).append((row, gap))
  ms = lambda v: f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}"
  lines = [f"Seeds {', '.join(seeds)}; accuracy in % (mean ± std over seeds).", "",
           "| fine-tune | model | D_r | D_f | test | test (retained classes) |",
           "|---|---|---|---|---|---|"]
  for ft in res["config"].get("finetune_losses", ["mse", "ce"]):
    for name in ("full", "retrain"):
      rows = [res["seeds"][s]["finetune"][ft][name] for s in seeds]
      lines.append(f"| {ft} | {name} | " + " | ".join(
          ms([r[k] for r in rows]) for k in ("retain", "forget", "test", "test_retained")) + " |")
  lines += ["", "| fine-tune | J and f_0 at | residual | λ | D_r | D_f | test | "
            "test (retained) | ‖Δw‖ | gap to Retrain (points) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for key in sorted(failed, key=lambda k: (k[0] != "mse", k[1], k[2] != "mse", k[3])):
    if key not in groups:
      lines.append(f"| {key[0]} | {'w_0' if key[1] == 'init' else 'w_D'} | {key[2]} | "
                   f"{key[3]:g} | factorisation failed in all {failed[key]} seeds |||||||")
      continue
    rows = [g[0] for g in groups[key]]
    gaps = [g[1] for g in groups[key]]
    note = f" ({failed[key]} seed(s) failed)" if failed[key] else ""
    lines.append(
        f"| {key[0]} | {'w_0' if key[1] == 'init' else 'w_D'} | {key[2]} | {key[3]:g} | "
        + " | ".join(ms([r[k] for r in rows]) for k in ("retain", "forget", "test", "test_retained"))
        + f" | {np.mean([r['delta_norm'] for r in rows]):.2f} | {np.mean(gaps):.1f}{note} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--summarize", action="store_true",
                  help="print the Markdown summary of --out and exit")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--epochs", type=int, default=30)
  ap.add_argument("--dampings", type=float, nargs="+",
                  default=[0.01, 0.1, 1.0, 10.0, 100.0])
  ap.add_argument("--finetune-losses", nargs="+", default=["mse", "ce"],
                  choices=["mse", "ce"])
  ap.add_argument("--linearize", nargs="+", default=["init", "trained"],
                  choices=["init", "trained"])
  ap.add_argument("--forget-classes", type=int, nargs="+", default=[0])
  ap.add_argument("--out", type=Path,
                  default=Path("benchmarks/results/defaults_sweep.json"))
  args = ap.parse_args(argv)
  if args.summarize:
    print(summarize(args.out))
    return
  xtr, ytr, xte, yte = data.load_embedded_cifar10()
  x, xt = np.asarray(normalize_cifar(xtr)), np.asarray(normalize_cifar(xte))
  result = {"config": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items()},
            "data": "embedded CIFAR-10 JPEG subset, 100 train + 100 test a class",
            "model": "ResNet-20 (shipped weights), PEFT = BatchNorm + new head",
            "device": str(jax.devices()[0]), "platform": platform.platform(),
            "versions": {"jax": jax.__version__, "fastntk_jax": F.__version__,
                         "python": sys.version.split()[0]},
            "seeds": {}}
  if args.out.exists():
    old = json.loads(args.out.read_text())
    same = ("epochs", "dampings", "finetune_losses", "linearize", "forget_classes")
    if all(old.get("config", {}).get(k) == result["config"].get(k) for k in same):
      result["seeds"] = old.get("seeds", {})
  for seed in args.seeds:
    if str(seed) in result["seeds"]:
      print(f"seed {seed}: already in {args.out}, skipped")
      continue
    result["seeds"][str(seed)] = run_seed(seed, args, x, ytr, xt, yte)
    atomic_json(args.out, result)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
