"""Which Fast-NTK settings come closest to Retrain: anchor, linearisation point, λ.

For each seed: fine-tune BatchNorm + a new head of the pretrained ResNet-20 on
the embedded CIFAR-10 subset with every recipe of ``--recipes`` (``mse``,
``ce``, and ``mse:prox=L`` / ``ce:prox=L`` with the proximal term
``(L/N)/2‖w − w_0‖²``), retrain each on D_r from w_0 with the same recipe
(Retrain), and unlearn class 0 with every anchor (w_0, or w_D as when
``unlearn`` is not given w_0), linearisation point (w_D, w_0) and damping λ,
with the recipe's loss (Eq. (1) for mse, the linearised cross-entropy retrain
for ce).

The selection criterion is fixed here, before any run, and uses the training
data only: ``gap_train = (|ΔRA| + |ΔFA|) / 2`` in accuracy points against
Retrain of the same recipe and seed (RA on D_r, FA on D_f), averaged over
seeds. Test accuracy is reported beside it and never used to choose.

The sweep reuses one Gram pass (mse) or one kept Jacobian (ce) per
linearisation point for all anchors and λ, through the library's own solvers
(``update.parameter_space``, ``newton.solve_primal``); for every seed and
recipe one setting is also run through ``unlearn`` itself and must agree.

    python benchmarks/choose_defaults.py --seeds 0 1 2 3 4 \\
        --out benchmarks/results/defaults_sweep_v2.json
    python benchmarks/choose_defaults.py --summarize \\
        --out benchmarks/results/defaults_sweep_v2.json

Resumable: seeds already in --out (with the same epochs, dampings, anchors
and linearisation points) are skipped. Seeds may run different ``--recipes``;
each seed records its own, and the summary gives the number of seeds behind
every row. Writes JSON atomically.
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
from fastntk_jax import data
from fastntk_jax.io import atomic
from fastntk_jax.core import kernels
from fastntk_jax.evaluation import metrics
from fastntk_jax.core import newton
from fastntk_jax.core import objective
from fastntk_jax.models import zoo
from fastntk_jax.data import splits
from fastntk_jax.training import train
from fastntk_jax.core import update
from fastntk_jax.models import normalize_cifar
from fastntk_jax.core.unlearn import RESIDUAL_FNS


def atomic_json(path: Path, obj) -> None:
  text = json.dumps(obj, indent=1)
  atomic.atomic_write(path, lambda f: f.write(text.encode()))


def parse_recipe(text: str) -> tuple[str, float]:
  """``"ce"`` -> ("ce", 0.0); ``"mse:prox=10"`` -> ("mse", 10.0)."""
  loss, _, opt = text.partition(":")
  if loss not in ("mse", "ce") or (opt and not opt.startswith("prox=")):
    raise argparse.ArgumentTypeError(
        f"recipe {text!r}: expected mse, ce, mse:prox=L or ce:prox=L")
  return loss, float(opt[5:]) if opt else 0.0


def _flat(tree):
  return ravel_pytree(tree)[0]


def _delta_rows(loss, lin, w_0, w_d, retain, forget, args, apply_fn):
  """``{(anchor, λ): Δw}`` for one linearisation point (all anchors, all λ)."""
  x_all = jnp.concatenate([jnp.asarray(retain[0]), jnp.asarray(forget[0])])
  y_all = np.concatenate([retain[1], forget[1]])
  n_r = len(retain[1])
  out = {}
  with jax.enable_x64(True):
    shifts = {"w_0": (_flat(w_0).astype(jnp.float64)
                      - _flat(lin).astype(jnp.float64)),
              "w_D": (_flat(w_d).astype(jnp.float64)
                      - _flat(lin).astype(jnp.float64))}
  if loss == "mse":
    res = RESIDUAL_FNS["mse"]
    a_r, g_r = kernels.gram(apply_fn, lin, retain[0], res, y=retain[1],
                            solve_dtype="float64")
    a_f, g_f = kernels.gram(apply_fn, lin, forget[0], res, y=forget[1],
                            solve_dtype="float64")
    with jax.enable_x64(True):
      for anc in args.anchors:
        d = shifts[anc]
        for lam in args.dampings:
          upd = update.parameter_space(a_r, a_f, g_r + a_r @ d, g_f + a_f @ d,
                                       lam)
          ok = all(bool(i.ok) for i in upd.infos)
          out[(anc, lam)] = (upd.delta if ok else None, [])
    return out
  op = newton.DenseJacobian(kernels.jacobian(apply_fn, lin, x_all), 10)
  f0 = kernels.predict(apply_fn, lin, x_all)
  ce = objective.cross_entropy
  for anc in args.anchors:
    with jax.enable_x64(True):
      b = f0.astype(jnp.float64) + op.matvec(shifts[anc])
      weights = jnp.concatenate([jnp.ones(n_r), jnp.zeros(len(y_all) - n_r)])
    for lam in args.dampings:
      x_d, rep_d = newton.solve_primal(op, b, y_all, ce, lam)
      x_r, rep_r = newton.solve_primal(op, b, y_all, ce, lam, weights=weights,
                                       x0=x_d)
      reps = [rep_d._asdict(), rep_r._asdict()]
      ok = rep_d.converged and rep_r.converged
      with jax.enable_x64(True):
        out[(anc, lam)] = ((x_r - x_d) if ok else None, reps)
  return out


def run_seed(seed, args, x, y, xt, yt):
  m = zoo.resnet_bn_head(20, seed=seed)
  retain, forget = splits.class_split(x, y, [0])
  test = (xt, yt)
  rep = lambda p: metrics.class_forgetting_report(m.apply_fn, p, retain,
                                                  forget, test, [0])
  out = {"seed": seed, "recipes": {}, "rows": [], "checks": []}
  for name in args.recipes:
    loss, prox = parse_recipe(name)
    cfg = train.FinetuneConfig(loss=loss, epochs=args.epochs, seed=seed,
                               proximal=prox)
    w_d = train.finetune(m.apply_fn, m.init_params, x, y, config=cfg)
    w_r = train.finetune(m.apply_fn, m.init_params, *retain, config=cfg)
    out["recipes"][name] = {"full": rep(w_d.params),
                            "retrain": rep(w_r.params),
                            "seconds_finetune": w_d.seconds,
                            "seconds_retrain": w_r.seconds,
                            "final_loss": float(w_d.losses[-1])}
    print(f" seed {seed} {name}: full {out['recipes'][name]['full']} "
          f"retrain {out['recipes'][name]['retrain']}", flush=True)
    flat_d, unravel = ravel_pytree(w_d.params)
    flat_r = _flat(w_r.params)
    for lin_name in args.linearize_at:
      lin = w_d.params if lin_name == "w_D" else m.init_params
      t = time.perf_counter()
      deltas = _delta_rows(loss, lin, m.init_params, w_d.params, retain,
                           forget, args, m.apply_fn)
      print(f"  {name} J at {lin_name}: {time.perf_counter() - t:.1f}s",
            flush=True)
      for (anc, lam), (delta, reps) in deltas.items():
        row = {"recipe": name, "loss": loss, "proximal": prox,
               "anchor": anc, "linearize_at": lin_name, "damping": lam,
               "ok": delta is not None, "solves": reps}
        if delta is not None:
          with jax.enable_x64(True):
            norm = float(jnp.linalg.norm(delta))
            delta = delta.astype(flat_d.dtype)
          new = unravel(flat_d + delta)
          row.update(rep(new), delta_norm=norm,
                     dist_to_retrain=float(jnp.linalg.norm(_flat(new) - flat_r)),
                     dist_full_to_retrain=float(jnp.linalg.norm(flat_d - flat_r)))
        out["rows"].append(row)
        print("   ", {k: (round(v, 3) if isinstance(v, float) else v)
                      for k, v in row.items() if k != "solves"}, flush=True)
    # The sweep's shortcut against the library's entry point, one setting.
    chk = F.unlearn(m.apply_fn, w_d.params, retain, forget,
                    anchor=m.init_params, linearize_at="w_D", damping=1.0,
                    loss=loss, solver="primal")
    mine = [r for r in out["rows"] if r["recipe"] == name and r["anchor"] ==
            "w_0" and r["linearize_at"] == "w_D" and r["damping"] == 1.0]
    if mine:
      got = rep(chk.params)
      out["checks"].append({"recipe": name, "unlearn": got,
                            "sweep": {k: mine[0][k] for k in got}})
      assert all(abs(got[k] - mine[0][k]) < 2e-3 for k in got), (got, mine)
  return out


def _gap(row, ret, keys):
  return 100 * np.mean([abs(row[k] - ret[k]) for k in keys])


def summarize(path: Path) -> str:
  """Markdown: mean ± std over seeds, gap_train (the criterion) and gap with
  test, for every recipe and setting."""
  res = json.loads(path.read_text())
  seeds = sorted(res["seeds"], key=int)
  ms = lambda v: f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}"
  cols = ("retain", "forget", "test", "test_retained")
  lines = [f"Seeds {', '.join(seeds)}; accuracy in % (mean ± std over "
           "the n seeds of each row). gap_train = (|ΔRA| + |ΔFA|)/2 against "
           "Retrain (the selection criterion, training data only); gap_test "
           "adds |ΔTA|: (|ΔRA| + |ΔFA| + |ΔTA|)/3.", "",
           "| recipe | model | n | D_r | D_f | test | test (retained classes) |",
           "|---|---|---|---|---|---|---|"]
  recipes = list(dict.fromkeys(
      name for s in seeds for name in res["seeds"][s]["recipes"]))
  for name in recipes:
    for who in ("full", "retrain"):
      rows = [res["seeds"][s]["recipes"][name][who] for s in seeds
              if name in res["seeds"][s]["recipes"]]
      lines.append(f"| {name} | {who} | {len(rows)} | " + " | ".join(
          ms([r[k] for r in rows]) for k in cols) + " |")
  lines += ["", "| recipe | anchor | J at | λ | n | D_r | D_f | test | test "
            "(retained) | D_f per seed | ‖Δw‖ | gap_train | gap_test |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  groups = {}
  for s in seeds:
    r = res["seeds"][s]
    for row in r["rows"]:
      key = (row["recipe"], row["anchor"], row["linearize_at"], row["damping"])
      groups.setdefault(key, []).append((row, r["recipes"][row["recipe"]]
                                         ["retrain"]))
  order = lambda k: (recipes.index(k[0]), k[1] != "w_0", k[2] != "w_D", k[3])
  for key in sorted(groups, key=order):
    good = [(r, ret) for r, ret in groups[key] if r["ok"]]
    if not good:
      lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | "
                   f"{len(groups[key])} | failed in every seed ||||||||")
      continue
    rows = [r for r, _ in good]
    g_tr = np.mean([_gap(r, ret, ("retain", "forget")) for r, ret in good])
    g_te = np.mean([_gap(r, ret, ("retain", "forget", "test"))
                    for r, ret in good])
    per = ", ".join(f"{100 * r['forget']:.0f}" for r in rows)
    note = (f" ({len(groups[key]) - len(good)} failed)"
            if len(good) < len(groups[key]) else "")
    lines.append(
        f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {len(rows)} | "
        + " | ".join(ms([r[k] for r in rows]) for k in cols)
        + f" | {per} | {np.mean([r['delta_norm'] for r in rows]):.2f} | "
        f"{g_tr:.1f}{note} | {g_te:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--summarize", action="store_true",
                  help="print the Markdown summary of --out and exit")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  ap.add_argument("--epochs", type=int, default=30)
  ap.add_argument("--recipes", nargs="+",
                  default=["mse", "ce", "mse:prox=1", "ce:prox=1",
                           "mse:prox=10", "ce:prox=10"])
  ap.add_argument("--dampings", type=float, nargs="+",
                  default=[0.3, 1.0, 3.0, 10.0])
  ap.add_argument("--anchors", nargs="+", default=["w_0", "w_D"],
                  choices=["w_0", "w_D"])
  ap.add_argument("--linearize-at", nargs="+", default=["w_D", "w_0"],
                  choices=["w_D", "w_0"])
  ap.add_argument("--out", type=Path,
                  default=Path("benchmarks/results/defaults_sweep_v2.json"))
  args = ap.parse_args(argv)
  if args.summarize:
    print(summarize(args.out))
    return
  for r in args.recipes:
    parse_recipe(r)
  xtr, ytr, xte, yte = data.load_embedded_cifar10()
  x, xt = np.asarray(normalize_cifar(xtr)), np.asarray(normalize_cifar(xte))
  result = {"config": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items() if k != "summarize"},
            "data": "embedded CIFAR-10 JPEG subset, 100 train + 100 test a "
                    "class; class 0 forgotten",
            "model": "ResNet-20 (shipped weights), PEFT = BatchNorm + new head",
            "criterion": "gap_train = (|ΔRA| + |ΔFA|)/2 vs Retrain, training "
                         "data only",
            "device": str(jax.devices()[0]), "platform": platform.platform(),
            "versions": {"jax": jax.__version__, "fastntk_jax": F.__version__,
                         "python": sys.version.split()[0]},
            "seeds": {}}
  if args.out.exists():
    old = json.loads(args.out.read_text())
    same = ("epochs", "dampings", "anchors", "linearize_at")
    if all(old.get("config", {}).get(k) == result["config"].get(k)
           for k in same):
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
