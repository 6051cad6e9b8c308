"""Inference cost of the tangent model (one JVP) against a plain forward pass.

ResNet-20 with BatchNorm + a new head as PEFT parameters (the shipped CIFAR-10
weights): ``apply_fn(w, x)`` against
``tangent_model(apply_fn, w_0)(w, x) = f(w_0, x) + J(w_0, x)(w − w_0)`` on the
same batch, both jitted; compile first, then the median of ``--repeats``
timed calls with ``block_until_ready``. Checks that the two agree at
``w = w_0`` (the tangent model's value there is the network's).

    python benchmarks/tangent_cost.py --out benchmarks/results/tangent_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax import data

from fastntk_jax.io import atomic

from fastntk_jax.models import zoo
from fastntk_jax.io.environment import environment
from fastntk_jax.models import normalize_cifar
from fastntk_jax.core.tangent import tangent_model


def _median_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 1000])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--out", type=Path,
                  default=Path("benchmarks/results/tangent_cost_cpu.json"))
  args = ap.parse_args(argv)
  m = zoo.resnet_bn_head(20, seed=0)
  xtr, _, _, _ = data.load_embedded_cifar10()
  x_all = np.asarray(normalize_cifar(xtr))
  rng = np.random.default_rng(0)
  w = jax.tree_util.tree_map(
      lambda a: a + 0.05 * jnp.asarray(rng.normal(size=a.shape), a.dtype),
      m.init_params)
  plain = jax.jit(m.apply_fn)
  lin = jax.jit(tangent_model(m.apply_fn, m.init_params))
  rows = []
  for b in args.batches:
    x = jnp.asarray(x_all[:b])
    same = float(jnp.max(jnp.abs(lin(m.init_params, x)
                                 - plain(m.init_params, x))))
    t_plain = _median_seconds(plain, w, x, repeats=args.repeats)
    t_lin = _median_seconds(lin, w, x, repeats=args.repeats)
    rows.append({"batch": b, "forward_seconds": t_plain,
                 "tangent_seconds": t_lin, "ratio": t_lin / t_plain,
                 "max_abs_difference_at_w0": same})
    print(f"batch {b:5d}: forward {1e3 * t_plain:8.2f} ms, tangent (JVP) "
          f"{1e3 * t_lin:8.2f} ms, ratio {t_lin / t_plain:.2f}; |Δ| at w_0 "
          f"{same:.1e}", flush=True)
  out = {"benchmark": "tangent_cost", **environment(),
         "config": {"model": "resnet20 BatchNorm + head", "batches":
                    args.batches, "repeats": args.repeats},
         "rows": rows}
  text = json.dumps(out, indent=1)
  atomic.atomic_write(args.out, lambda f: f.write(text.encode()))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
