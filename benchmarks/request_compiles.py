"""How much XLA compilation deletion requests of different sizes pay.

ResNet-20 BatchNorm + head (P = 2,026) at its shipped CIFAR-10 weights,
``deletion.prepare`` over ``--n-train`` CIFAR-10 training images (``--loss``),
then requests of ``--sizes`` images in sequence, each through
``deletion.forget``; for each request, the number of XLA compilations and
their seconds (``jax.monitoring``'s backend-compile events) and the wall
time. A long-lived process or a CLI process with a warm compilation cache
pays a request size's compilations once; a stream of requests of many sizes
pays them for every new shape. The counts are the machine-independent
figure; the seconds depend on the load.

    python benchmarks/request_compiles.py --loss mse \\
        --out benchmarks/results/request_compiles_mse_cpu.json
    python benchmarks/request_compiles.py --loss ce \\
        --out benchmarks/results/request_compiles_ce_cpu.json
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import jax
import numpy as np

import deletion_store
from fastntk_jax.core import deletion
from fastntk_jax.io.checkpoint import atomic_write_json
from fastntk_jax.io.environment import environment
from fastntk_jax.models import zoo

_EVENT = "/jax/core/compile/backend_compile_duration"


def _commit() -> str | None:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True,
                          cwd=Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def run(args) -> dict:
  x, y = deletion_store._data(args.n_train, args.seed)
  module, variables, _ = zoo.load_backbone("resnet20")
  model = zoo.peft_model("resnet20", module, variables, num_classes=10,
                         mode="peft", seed=args.seed)
  ids = np.arange(len(y))
  t = time.perf_counter()
  state = deletion.prepare(model.apply_fn, model.init_params, (x, y),
                           anchor=model.init_params, ids=ids, loss=args.loss,
                           damping=args.damping)
  prepare_seconds = time.perf_counter() - t
  events: list[float] = []

  def listen(event, seconds, **kw):
    del kw
    if event == _EVENT:
      events.append(float(seconds))

  jax.monitoring.register_event_duration_secs_listener(listen)
  rows, params, start = [], model.init_params, 0
  try:
    for size in args.sizes:
      sel = ids[start:start + size]
      start += size
      events.clear()
      t = time.perf_counter()
      res = deletion.forget(state, model.apply_fn, params, (x[sel], y[sel]),
                            ids=sel, **({"newton_max_steps": 400}
                                        if args.loss == "ce" else {}))
      jax.block_until_ready(res.params)
      wall = time.perf_counter() - t
      state, params = res.state, res.params
      rows.append({"size": int(size), "seconds": wall,
                   "compilations": len(events),
                   "compile_seconds": float(sum(events)),
                   "solve_steps": None if res.solve is None
                   else int(res.solve.iterations)})
      print(f"request of {size}: {wall:.2f} s, {len(events)} compilations "
            f"({sum(events):.2f} s)", flush=True)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  return {"benchmark": "request_compiles", **environment(),
          "git_commit": _commit(),
          "config": {k: (str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
          "prepare_seconds": prepare_seconds, "requests": rows}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n-train", type=int, default=600)
  ap.add_argument("--loss", choices=["mse", "ce"], default="mse")
  ap.add_argument("--damping", type=float, default=1.0)
  ap.add_argument("--sizes", type=int, nargs="+", default=[10, 37, 100, 100,
                                                           23, 61])
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", type=Path, required=True)
  args = ap.parse_args(argv)
  if min(args.sizes) < 1 or sum(args.sizes) >= args.n_train:
    ap.error("--sizes must be >= 1 and sum to less than --n-train.")
  atomic_write_json(args.out, run(args))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
