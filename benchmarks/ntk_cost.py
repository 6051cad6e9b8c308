"""Full-model versus PEFT-only empirical NTK: time, peak memory, parameter counts.

Same model, same data, same neural-tangents call (fastntk_jax.kernels.ntk);
only the pytree differentiated differs: every trainable parameter ("full")
or BatchNorm scale/shift + head ("peft"). Each measurement runs in its own
subprocess so that its peak resident memory (ru_maxrss) is its own.

    python benchmarks/ntk_cost.py --models resnet20 --n 64
    python benchmarks/ntk_cost.py --quick        # N = 16, one repeat

Writes benchmarks/results/ntk_cost_<device>.json (atomically): device, versions,
configuration, and per (model, N, pytree, implementation): compile seconds
(first call minus the median of later calls), median run seconds over
--repeats, peak RSS above the pre-kernel baseline, P, and the answer's checksum.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

_MODELS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def measure(model_name: str, n: int, pytree: str, implementation: int,
            repeats: int, seed: int) -> dict:
  """One measurement (runs inside the child process)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fastntk_jax import data, kernels, peft
  from fastntk_jax.models import load_resnet_cifar10, normalize_cifar

  depth = _MODELS[model_name]
  model, variables = load_resnet_cifar10(depth)
  if pytree == "peft":
    pred = peft.any_of(peft.batchnorm(variables), peft.head())
  else:
    pred = lambda path, leaf: path[0] == "params"
  apply_fn, w, _ = peft.make_apply_fn(model, variables, pred)
  xtr, _, _, _ = data.load_embedded_cifar10()
  idx = np.random.default_rng(seed).choice(len(xtr), n, replace=False)
  x = jnp.asarray(normalize_cifar(xtr[idx]))
  jax.block_until_ready(x)
  base = _rss_mib()
  times = []
  for _ in range(repeats + 1):
    t = time.perf_counter()
    k = kernels.ntk(apply_fn, w, x, block_size=n, implementation=implementation)
    jax.block_until_ready(k)
    times.append(time.perf_counter() - t)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  run = statistics.median(times[1:])
  k = np.asarray(k, np.float64)
  return {
      "model": model_name, "n": n, "pytree": pytree,
      "implementation": implementation,
      "num_params": peft.count_params(w),
      "num_params_total": peft.count_params(variables["params"]),
      "kernel_shape": list(k.shape),
      "first_call_seconds": times[0],
      "compile_seconds": max(times[0] - run, 0.0),
      "run_seconds_median": run, "run_seconds_all": times[1:],
      "peak_rss_mib": peak, "baseline_rss_mib": base,
      "peak_above_baseline_mib": peak - base,
      "jacobian_mib": k.shape[0] * peft.count_params(w) * 4 / 2**20,  # (N·C, P)
      "kernel_trace": float(np.trace(k)),
      "symmetric_max_abs": float(np.abs(k - k.T).max()),
  }


def _child(args) -> dict:
  cmd = [sys.executable, __file__, "--child", args.model_, str(args.n_),
         args.pytree_, str(args.impl_), str(args.repeats), str(args.seed)]
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode != 0:
    return {"model": args.model_, "n": args.n_, "pytree": args.pytree_,
            "implementation": args.impl_, "error": out.stderr[-2000:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", nargs="+", default=["resnet20"],
                  choices=sorted(_MODELS))
  ap.add_argument("--n", type=int, nargs="+", default=[64])
  ap.add_argument("--implementations", type=int, nargs="+", default=[1],
                  choices=[1, 2])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--quick", action="store_true",
                  help="N = 16, one repeat (a smoke run)")
  ap.add_argument("--out", type=Path, default=None)
  ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    m, n, p, impl, rep, seed = args.child
    print(json.dumps(measure(m, int(n), p, int(impl), int(rep), int(seed))))
    return
  if args.quick:
    args.n, args.repeats = [16], 1
  import jax
  import fastntk_jax
  device = jax.devices()[0]
  rows = []
  for model_name in args.models:
    for n in args.n:
      for impl in args.implementations:
        for pytree in ("peft", "full"):
          args.model_, args.n_, args.pytree_, args.impl_ = model_name, n, pytree, impl
          r = _child(args)
          rows.append(r)
          print(json.dumps({k: v for k, v in r.items()
                            if k not in ("run_seconds_all",)}), flush=True)
        peft_r, full_r = rows[-2], rows[-1]
        if "error" not in peft_r and "error" not in full_r:
          ratio = {"model": model_name, "n": n, "implementation": impl,
                   "speedup": full_r["run_seconds_median"] / peft_r["run_seconds_median"],
                   "memory_ratio": full_r["peak_above_baseline_mib"] /
                   max(peft_r["peak_above_baseline_mib"], 1e-9),
                   "param_ratio_percent": 100 * peft_r["num_params"] / full_r["num_params"]}
          rows.append({"ratio": ratio})
          print(json.dumps(ratio), flush=True)
  result = {
      "benchmark": "ntk_cost",
      "device": f"{device.platform}: {device.device_kind}",
      "cpu_count": os.cpu_count(), "platform": platform.platform(),
      "versions": {"jax": jax.__version__, "python": sys.version.split()[0],
                   "fastntk_jax": fastntk_jax.__version__,
                   "neural_tangents": fastntk_jax._nt.nt_version()},
      "config": {"models": args.models, "n": args.n,
                 "implementations": args.implementations,
                 "repeats": args.repeats, "seed": args.seed,
                 "block_size": "N (one block)", "dtype": "float32",
                 "data": "embedded CIFAR-10 subset (train)"},
      "rows": rows,
  }
  out = args.out or Path("benchmarks/results") / f"ntk_cost_{device.platform}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(result, indent=1))
  os.replace(tmp, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
