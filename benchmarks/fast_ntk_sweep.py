"""Fast-NTK's settings on a finished bench run: loss, anchor, J's point, λ.

Loads the fine-tuned model of one seed of a `fastntk experiment` results
directory (its ``finetune.ckpt``), re-runs Fast-NTK with every combination of
the linearised problem's loss (mse: Eq. (1); ce: the linearised cross-entropy
retrain), the anchor (w_0, or w_D as when ``unlearn`` is given no w_0), the
linearisation point (w_D, w_0) and the damping λ, and compares with that
seed's Retrain. Test accuracy is printed beside D_r and D_f; it is not used to
choose anything (docs/defaults.md chooses on D_r and D_f).

    python benchmarks/fast_ntk_sweep.py RESULTS_DIR --seed 0 \
        --out benchmarks/results/fast_ntk_sweep_ipc50_ce_v2.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax import methods

from fastntk_jax.io import checkpoint

from fastntk_jax.data import splits

from fastntk_jax.training import train

from fastntk_jax.models import zoo
from fastntk_jax.experiments import runner
from fastntk_jax.core.unlearn import UnlearningError


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("results", type=Path, help="a `fastntk experiment` --out dir")
  ap.add_argument("--seed", type=int, default=0, help="which seed's model")
  ap.add_argument("--dampings", type=float, nargs="+",
                  default=[0.1, 1.0, 10.0, 100.0], help="λ values")
  ap.add_argument("--losses", nargs="+", default=["ce", "mse"],
                  choices=["ce", "mse"])
  ap.add_argument("--out", type=Path, required=True, help="JSON to write")
  args = ap.parse_args(argv)
  cfg = json.loads((args.results / "config.json").read_text())
  m = cfg["model"]
  module, variables, _ = zoo.load_backbone(m["name"], m["weights"] or None,
                                           seed=0)
  x_tr, y_tr, x_te, y_te, names, _ = runner.load_data(cfg)
  spec = runner._forget_spec(cfg["data"]["forget"], args.seed)
  r_idx, f_idx = splits.apply_forget(spec, y_tr, names)
  model = zoo.peft_model(m["name"], module, variables, num_classes=len(names),
                      mode=m["peft"], head_scale=m["head_scale"],
                      seed=args.seed)
  prep = jax.jit(zoo.preprocess_fn(m["name"]))
  xn, xt = np.asarray(prep(jnp.asarray(x_tr))), np.asarray(prep(jnp.asarray(x_te)))
  sdir = args.results / "runs" / f"seed{args.seed}"
  ck = checkpoint.load(sdir / "finetune.ckpt", expect_kind="bench-finetune")
  w_d = checkpoint.restore_like(model.init_params, ck.trees["w_D"])
  recipe = train.FinetuneConfig(**cfg["finetune"], seed=args.seed)
  problem = methods.UnlearningProblem(
      model.apply_fn, model.init_params, w_d, (xn[r_idx], y_tr[r_idx]),
      (xn[f_idx], y_tr[f_idx]), recipe, len(names))

  def acc(params):
    out = {}
    for k, (x, y) in {"retain": problem.retain, "forget": problem.forget,
                      "test": (xt, y_te)}.items():
      logits = model.apply_fn(params, x)
      out[k] = 100 * float(np.mean(np.argmax(logits, -1) == y))
    return out

  rows = [{"method": "retrain", **json.loads(
      (sdir / "retrain.json").read_text())["metrics"]}]
  for loss, anchor, lin, lam in itertools.product(
      args.losses, ("w_0", "w_D"), ("w_D", "w_0"), args.dampings):
    if anchor == "w_D" and lin == "w_0":
      continue  # J at w_0 needs w_0, which is then the anchor
    key = {"method": "fast_ntk", "loss": loss, "anchor": anchor,
           "linearize_at": lin, "damping": lam}
    try:
      res = methods.run_method("fast_ntk", problem, seed=args.seed, loss=loss,
                               anchor=anchor, linearize_at=lin, damping=lam)
    except UnlearningError as err:  # reported, not hidden
      rows.append({**key, "error": str(err)})
      print(f"{loss:3s} anchor {anchor} J at {lin} λ={lam:<5g} failed: {err}")
      continue
    a = acc(res.params)
    rows.append({**key, "acc_retain": a["retain"], "acc_forget": a["forget"],
                 "acc_test": a["test"], "delta_norm": res.info.get("delta_norm"),
                 "newton_steps": res.info.get("newton_steps"),
                 "seconds": res.seconds})
    print(f"{loss:3s} anchor {anchor} J at {lin} λ={lam:<5g} D_r "
          f"{a['retain']:5.1f} D_f {a['forget']:5.1f} test {a['test']:5.1f}",
          flush=True)
  checkpoint.atomic_write_json(args.out, {
      "results": str(args.results), "seed": args.seed,
      "finetune_loss": cfg["finetune"]["loss"], "rows": rows,
      **runner.environment()})


if __name__ == "__main__":
  main()
