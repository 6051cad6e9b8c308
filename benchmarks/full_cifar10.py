"""Fast-NTK on the full CIFAR-10 training set, and deletion requests at that scale.

ResNet-20 (CIFAR-10 weights from ../shared) with BatchNorm scale/shift + a new
head as PEFT parameters (P = 2,026), fine-tuned on D with the ``--loss`` recipe
(MSE or cross-entropy; Fast-NTK then solves the same loss), then:

1. ``unlearn`` from scratch: forget a class (5,000 images) from the 50,000;
   the solver is chosen by ``solver="auto"`` (parameter space here).
2. ``deletion.prepare`` over D once, then requests: ``--request`` random
   images (timed), and the same class as in 1 (compared with 1).
3. The request of ``--request`` images checked against ``unlearn`` from
   scratch on D without them (``--check-request``; one more pass over D).

Accuracy on D_r, D_f and the test set before and after; wall time per stage
(compilation reported separately, from JAX's compile events); peak resident
memory of the whole process. Writes JSON atomically.

    python benchmarks/full_cifar10.py                       # all of it
    python benchmarks/full_cifar10.py --n-train 2000 --test-n 1000   # smoke
    python benchmarks/full_cifar10.py --n-train 10000 --loss ce \
        --out benchmarks/results/full_cifar10_n10000_ce_cpu.json

The Jacobian and kernel work is sharded over all local devices (the default
``jax.sharding`` mesh); on a CPU host ``--host-devices`` (default: one per
core) makes XLA expose one CPU device per core.
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

from cifar_setup import Stages, accuracy as _acc, finetune, load_cifar10
from cifar_setup import peak_rss_gib as _peak_rss_gib, peft_resnet20
from cifar_setup import rel as _rel, write_json as _write
from fastntk_jax import unlearn
from fastntk_jax.core import deletion
from fastntk_jax.evaluation import timing
from fastntk_jax.io.environment import environment, request_host_devices


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n-train", type=int, default=50000)
  ap.add_argument("--test-n", type=int, default=10000)
  ap.add_argument("--forget-class", type=int, default=0)
  ap.add_argument("--request", type=int, default=100)
  ap.add_argument("--finetune-epochs", type=int, default=1)
  ap.add_argument("--damping", type=float, default=1.0)
  ap.add_argument("--loss", choices=["mse", "ce"], default="mse",
                  help="fine-tuning loss, and the loss Fast-NTK solves")
  ap.add_argument("--linearize-at", choices=["w_D", "w_0"], default="w_D",
                  help="where J is taken (default w_D)")
  ap.add_argument("--anchor", choices=["w_0", "w_D"], default="w_0",
                  help="the ridge term's centre (default w_0)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--check-request", action=argparse.BooleanOptionalAction,
                  default=True)
  ap.add_argument("--host-devices", type=int, default=os.cpu_count() or 1,
                  help="CPU devices XLA exposes (--xla_force_host_platform_"
                       "device_count; default: one per core). The Jacobian "
                       "work is sharded over jax.local_devices(), so on a CPU "
                       "host this runs one XLA program per core (about 1.5x "
                       "faster on 2 cores than one program using both). No "
                       "effect on the devices of a GPU backend.")
  ap.add_argument("--out", type=Path,
                  default=Path("benchmarks/results/full_cifar10_cpu.json"))
  args = ap.parse_args(argv)
  if args.request < 1 or args.n_train < 100:
    ap.error("--request must be >= 1 and --n-train >= 100")
  if args.host_devices < 1:
    ap.error("--host-devices must be >= 1")
  try:
    request_host_devices(args.host_devices)
  except RuntimeError as e:
    raise SystemExit(f"--host-devices: {e}")

  t_start = time.perf_counter()
  out = {"benchmark": "full_cifar10", **environment(),
         "cpu_count": os.cpu_count(),
         "mesh_devices": [str(d) for d in jax.local_devices()],
         "config": vars(args) | {
             "out": str(args.out), "model": "resnet20 (CIFAR-10 weights), "
             "BatchNorm scale/shift + new head", "recipe": args.loss,
             "solve_dtype": "float64"},
         "stages": {}}
  stages = out["stages"]
  stage = Stages(stages)
  x, y, x_te, y_te, rng = load_cifar10(stage, args.n_train, args.test_n,
                                       args.seed)
  model, pretrained = peft_resnet20(args.seed)
  out["num_params"] = int(ravel_pytree(model.init_params)[0].shape[0])
  out["pretrained_backbone"] = pretrained
  out["n_train"], out["n_test"] = int(len(y)), int(len(y_te))
  w_0 = model.init_params
  points = {"anchor": w_0 if args.anchor == "w_0" else None,
            "linearize_at": args.linearize_at, "loss": args.loss}
  w_d = finetune(stage, model, x, y, args.loss, args.finetune_epochs,
                 args.seed)
  forget = y == args.forget_class
  sets = {"retain": (x[~forget], y[~forget]), "forget": (x[forget], y[forget])}

  def accuracy(params):
    return {"acc_retain": _acc(model.apply_fn, params, *sets["retain"]),
            "acc_forget": _acc(model.apply_fn, params, *sets["forget"]),
            "acc_test": _acc(model.apply_fn, params, x_te, y_te),
            "acc_test_retained": _acc(model.apply_fn, params,
                                      x_te[y_te != args.forget_class],
                                      y_te[y_te != args.forget_class])}

  out["accuracy_finetuned"] = accuracy(w_d)
  print("fine-tuned:", out["accuracy_finetuned"], flush=True)

  # 1. Fast-NTK from scratch: the class.
  t_unlearn = time.perf_counter()
  res = stage("unlearn_class", lambda: unlearn(
      model.apply_fn, w_d, sets["retain"], sets["forget"], **points,
      damping=args.damping, solver="auto"))
  out["unlearn_class"] = {
      "solver": res.solver, "num_retain": res.num_retain,
      "num_forget": res.num_forget, "delta_norm": res.delta_norm,
      "relative_residual": res.relative_residual, "cond": res.cond,
      "solves": [r._asdict() for r in res.solves],
      "kept_jacobian": res.kept_jacobian,
      "wall_seconds_including_validation": time.perf_counter() - t_unlearn,
      **accuracy(res.params)}
  print("unlearned:", out["unlearn_class"], flush=True)

  # 2. Prepare once, then requests.
  ids = np.arange(len(y))
  state = stage("prepare", lambda: deletion.prepare(
      model.apply_fn, w_d, (x, y), **points, damping=args.damping,
      ids=ids, memory_budget=16 * 2**30))
  req = np.sort(rng.choice(len(y), args.request, replace=False))
  with timing.measure() as m:  # the first call compiles for this shape
    r = deletion.forget(state, model.apply_fn, w_d, (x[req], y[req]), ids=req)
    jax.block_until_ready(r.params)
  times = []
  for _ in range(3):
    t = time.perf_counter()
    r = deletion.forget(state, model.apply_fn, w_d, (x[req], y[req]), ids=req)
    jax.block_until_ready(r.params)
    times.append(time.perf_counter() - t)
  out["request"] = {"num_forget": args.request, "seconds_all": times,
                    "seconds_median": float(np.median(times)),
                    "first_call_seconds": m.seconds,
                    "first_call_compile_seconds": m.compile_seconds,
                    "relative_residual": r.relative_residual,
                    "solve": None if r.solve is None else r.solve._asdict()}
  print("request:", out["request"], flush=True)
  cls = np.flatnonzero(forget)
  rc = stage("request_class", lambda: deletion.forget(
      state, model.apply_fn, w_d, sets["forget"], ids=cls))
  out["request_class"] = {"relative_difference_to_unlearn":
                          _rel(rc.params, res.params),
                          "relative_update_size": _rel(w_d, res.params)}
  print("request_class:", out["request_class"], flush=True)
  out["peak_rss_gib"] = _peak_rss_gib()
  out["total_seconds"] = time.perf_counter() - t_start
  _write(args.out, out)

  # 3. The request against unlearning from scratch (one more pass over D).
  if args.check_request:
    keep = np.ones(len(y), bool)
    keep[req] = False
    ref = stage("unlearn_request_from_scratch", lambda: unlearn(
        model.apply_fn, w_d, (x[keep], y[keep]), (x[req], y[req]),
        **points, damping=args.damping, solver="primal"))
    out["request"]["relative_difference_to_unlearn"] = _rel(r.params,
                                                            ref.params)
    out["request"]["relative_update_size"] = _rel(w_d, ref.params)
    print("request check:", out["request"], flush=True)
  out["peak_rss_gib"] = _peak_rss_gib()
  out["total_seconds"] = time.perf_counter() - t_start
  _write(args.out, out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  sys.exit(main())
