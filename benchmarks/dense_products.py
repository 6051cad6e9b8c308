"""Products over kept Jacobian rows: float64 rows against float32 rows
converted block by block (``newton.DenseJacobian``).

A cross-entropy deletion state keeps the ``N·C × P`` Jacobian rows; each
step of a request's solve is one ``J v`` and one ``Jᵀ u`` over them in
float64. This times, side by side in one process, on random rows of the
given shape (default: 10,000 CIFAR-10 images, C = 10, ResNet-20's BN + head,
P = 2,026):

* ``float64``: the rows stored in float64, plain float64 products (what the
  state kept before);
* ``float32_blocks``: the rows kept in float32, each block converted to
  float64 inside the product (what it keeps now);
* ``float32_whole``: float32 rows converted whole inside one product (the
  naive way, which writes a float64 copy each time).

and checks that the two exact forms give the same products. Best and
median of ``--repeats`` runs after one untimed run. Writes JSON atomically::

    python benchmarks/dense_products.py \\
        --out benchmarks/results/dense_products_cpu.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from deletion_request_profile import _timed  # best and median of runs


def run(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fastntk_jax.core import newton
  from fastntk_jax.io.environment import environment

  out = {"benchmark": "dense_products", **environment(),
         "cpu_count": os.cpu_count(), "config": {
             "rows": args.rows, "p": args.p, "repeats": args.repeats,
             "seed": args.seed, "convert_elems": newton._CONVERT_ELEMS}}
  hi = jax.lax.Precision.HIGHEST
  with jax.enable_x64(True):
    rng = np.random.default_rng(args.seed)
    j32 = jnp.asarray(rng.standard_normal((args.rows, args.p),
                                          dtype=np.float32))
    v = jnp.asarray(rng.standard_normal(args.p))
    u = jnp.asarray(rng.standard_normal(args.rows))
    op32 = newton.DenseJacobian(j32, 1)
    whole_mv = jax.jit(lambda j, v: jnp.matmul(j.astype(v.dtype), v,
                                               precision=hi))
    whole_rmv = jax.jit(lambda j, u: jnp.matmul(u, j.astype(u.dtype),
                                                precision=hi))
    res = {"float32_blocks": {
        "matvec": _timed(lambda: op32.matvec(v), args.repeats),
        "rmatvec": _timed(lambda: op32.rmatvec(u), args.repeats)}}
    if not args.skip_whole:
      res["float32_whole"] = {
          "matvec": _timed(lambda: whole_mv(j32, v), args.repeats),
          "rmatvec": _timed(lambda: whole_rmv(j32, u), args.repeats)}
    mv32, rmv32 = op32.matvec(v), op32.rmatvec(u)
    del op32
    op64 = newton.DenseJacobian(j32, 1, dtype=jnp.float64)
    del j32
    res["float64"] = {
        "matvec": _timed(lambda: op64.matvec(v), args.repeats),
        "rmatvec": _timed(lambda: op64.rmatvec(u), args.repeats)}
    mv64, rmv64 = op64.matvec(v), op64.rmatvec(u)
    out["max_rel_difference"] = {
        "matvec": float(jnp.max(jnp.abs(mv32 - mv64))
                        / jnp.max(jnp.abs(mv64))),
        "rmatvec": float(jnp.max(jnp.abs(rmv32 - rmv64))
                         / jnp.max(jnp.abs(rmv64)))}
  out["timings"] = res
  for k, r in res.items():
    print(f"{k}: J v {r['matvec']['best']:.4f} s, Jᵀu "
          f"{r['rmatvec']['best']:.4f} s (best of {args.repeats})", flush=True)
  print("max relative difference, float32 blocks vs float64 rows:",
        out["max_rel_difference"])
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rows", type=int, default=100_000,
                  help="N·C rows (default 10,000 images × 10 classes)")
  ap.add_argument("--p", type=int, default=2026)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--skip-whole", action="store_true",
                  help="skip the slow whole-conversion form")
  ap.add_argument("--out", type=Path, default=None)
  args = ap.parse_args(argv)
  out = run(args)
  if args.out is not None:
    from fastntk_jax.io.checkpoint import atomic_write_json
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
