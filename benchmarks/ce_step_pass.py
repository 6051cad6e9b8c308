"""A cross-entropy request's solve with and without the one-read step pass.

``DenseJacobian.step_pass`` gives a step's ``J d`` and the gradient at the
full step from one read of the kept rows; without it a step reads them twice
(``J d``, then ``Jᵀ u``). This times ``newton.solve_preconditioned`` (L-BFGS
from ``M``, as a deletion request runs it) on synthetic float32 rows of a
deletion-store size, both ways alternately in one process, so that the
ratio is measured side by side::

    python benchmarks/ce_step_pass.py --out benchmarks/results/ce_step_pass_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from fastntk_jax.core import kernels
from fastntk_jax.core import newton
from fastntk_jax.core import objective
from fastntk_jax.io.checkpoint import atomic_write_json
from fastntk_jax.io.environment import environment


class _TwoPasses(newton.DenseJacobian):
  step_pass = None


def _problem(n, c, p, seed):
  rng = np.random.default_rng(seed)
  jac = jnp.asarray((rng.normal(size=(n * c, p)) / np.sqrt(p)).astype(
      np.float32))
  b = jnp.asarray(rng.normal(size=(n, c)))
  y = jnp.asarray(rng.integers(0, c, n))
  return jac, b, y


def run(args) -> dict:
  loss, lam = objective.cross_entropy, args.damping
  with kernels.dtype_scope("float64"):
    jac, b, y = _problem(args.n, args.c, args.p, args.seed)
    op = newton.DenseJacobian(jac, args.c)
    t = time.perf_counter()
    x_s, rep0 = newton.solve_primal(op, b, y, loss, lam, max_iter=30)
    prepare = time.perf_counter() - t
    z = b + op.matvec(x_s)
    m = op.ggn(loss.hess_factor(z), jnp.float64)
    chol = jnp.linalg.cholesky(m + lam * jnp.eye(args.p))
    pre = functools.partial(lambda l, r: jsl.cho_solve((l, True), r), chol)
    rng = np.random.default_rng(args.seed + 1)
    w = np.ones(args.n)
    w[rng.choice(args.n, args.forget, replace=False)] = 0
    w = jnp.asarray(w)
    out = {"one_read": [], "two_passes": []}
    for _ in range(args.repeats):
      for name, cls in (("one_read", newton.DenseJacobian),
                        ("two_passes", _TwoPasses)):
        o = cls(jac, args.c)
        t = time.perf_counter()
        x, rep = newton.solve_preconditioned(
            o, b, y, loss, lam, preconditioner=pre, weights=w, x0=x_s,
            memory=10, max_iter=50)
        jax.block_until_ready(x)
        out[name].append({"seconds": time.perf_counter() - t,
                          "steps": rep.iterations,
                          "converged": bool(rep.converged)})
  med = {k: float(np.median([r["seconds"] for r in v[1:]]))
         for k, v in out.items()}
  return {"benchmark": "ce_step_pass", **environment(),
          "config": {k: (str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
          "prepare_seconds": prepare, "prepare_steps": rep0.iterations,
          "runs": out, "median_seconds_after_first": med,
          "ratio_two_over_one": med["two_passes"] / med["one_read"]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n", type=int, default=10000)
  ap.add_argument("--c", type=int, default=10)
  ap.add_argument("--p", type=int, default=2026)
  ap.add_argument("--forget", type=int, default=100)
  ap.add_argument("--damping", type=float, default=1.0)
  ap.add_argument("--repeats", type=int, default=4)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", type=Path,
                  default=Path("benchmarks/results/ce_step_pass_cpu.json"))
  args = ap.parse_args(argv)
  out = run(args)
  atomic_write_json(args.out, out)
  for k, v in out["runs"].items():
    print(k, [f"{r['seconds']:.2f} s/{r['steps']}" for r in v])
  print(f"median after the first: {out['median_seconds_after_first']}; "
        f"two passes / one read = {out['ratio_two_over_one']:.2f}")


if __name__ == "__main__":
  main()
