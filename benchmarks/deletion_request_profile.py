"""Where an MSE deletion request's time goes, piece by piece.

ResNet-20 (CIFAR-10 weights from ../shared), BatchNorm scale/shift + a new
head (P = 2,026), ``deletion.prepare`` on ``--n-train`` CIFAR-10 training
images at w_0 (MSE, λ = 1); then, for a request of ``--size`` images, the
best and median of ``--repeats`` timed runs (after one untimed run) of

* the request's Gram pass (``kernels.gram``: Jacobian rows and JᵀJ) at the
  automatic block and at each ``--blocks`` size;
* the P×P algebra of a request (``deletion._request``), on one device and
  (with several host devices) replicated over the mesh;
* one forward pass over the request (the store's before/after metrics);
* ``deletion.forget`` as a whole.

Writes JSON atomically (device, versions, configuration, timings)::

    python benchmarks/deletion_request_profile.py --host-devices 1 \\
        --out benchmarks/results/deletion_request_profile_1dev_cpu.json
    python benchmarks/deletion_request_profile.py --host-devices 2 \\
        --out benchmarks/results/deletion_request_profile_2dev_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _timed(fn, repeats: int) -> dict:
  import jax
  jax.block_until_ready(fn())
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  ts.sort()
  return {"best": ts[0], "median": ts[len(ts) // 2], "all": ts}


def run(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fastntk_jax.core import blocking
  from fastntk_jax.core import deletion
  from fastntk_jax.core import kernels
  from fastntk_jax.core.unlearn import RESIDUAL_FNS
  from fastntk_jax.io.environment import environment
  from fastntk_jax.models import zoo

  import deletion_store as ds

  out = {"benchmark": "deletion_request_profile", **environment(),
         "cpu_count": os.cpu_count(),
         "config": {k: (str(v) if isinstance(v, Path) else v)
                    for k, v in vars(args).items()}}
  x, y = ds._data(args.n_train, args.seed)
  module, variables, _ = zoo.load_backbone("resnet20")
  model = zoo.peft_model("resnet20", module, variables, num_classes=10,
                         mode="peft", seed=args.seed)
  w = model.init_params
  mesh = blocking.resolve_mesh(None)
  t = time.perf_counter()
  st = deletion.prepare(model.apply_fn, w, (x, y), ids=np.arange(len(y)),
                        anchor=w, loss="mse", damping=1.0)
  out["prepare_seconds"] = time.perf_counter() - t
  xf, yf = x[:args.size], y[:args.size]
  res_fn = RESIDUAL_FNS["mse"]
  d = blocking.n_devices(mesh)
  auto = blocking.resolve_block(model.apply_fn, w, xf, None, "jac",
                                kernels.jac_block_fn(model.apply_fn),
                                lambda b: (w, b), mesh=mesh)[0]
  out["automatic_block"] = auto
  gram = {}
  for b in [None] + list(args.blocks):
    blk = auto if b is None else -(-b // d) * d
    rows = -(-args.size // blk) * blk
    key = "auto" if b is None else str(b)
    gram[key] = {"block": blk, "rows_computed": rows, **_timed(
        lambda b=b: kernels.gram(model.apply_fn, w, xf, res_fn, y=yf,
                                 solve_dtype="float64", block_size=b,
                                 return_outputs=True), args.repeats)}
    print(f"gram block {key} ({blk}, {rows} rows): "
          f"{gram[key]['best']:.3f} s", flush=True)
  out["gram"] = gram
  a_f, g_f, _ = kernels.gram(model.apply_fn, w, xf, res_fn, y=yf,
                             solve_dtype="float64", return_outputs=True)
  with kernels.dtype_scope("float64"):
    lam = jnp.asarray(1.0, jnp.float64)
    rr = jnp.asarray(1.0, jnp.float64)
    args1 = blocking.on_one_device(mesh, (st.gram, st.grad, st.chol, a_f, g_f,
                                          rr, lam))
    out["algebra_one_device"] = _timed(lambda: deletion._request(*args1),
                                       args.repeats)
    if mesh is not None:
      argsr = blocking.replicate(mesh, (st.gram, st.grad, st.chol, a_f, g_f,
                                        rr, lam))
      out["algebra_replicated"] = _timed(lambda: deletion._request(*argsr),
                                         args.repeats)
  out["forward"] = _timed(lambda: kernels.predict(model.apply_fn, w, xf),
                          args.repeats)
  ids = np.arange(args.size)
  out["forget"] = _timed(lambda: deletion.forget(
      st, model.apply_fn, w, (xf, yf), ids=ids).params, args.repeats)
  for k in ("algebra_one_device", "algebra_replicated", "forward", "forget"):
    if k in out:
      print(f"{k}: {out[k]['best']:.3f} s", flush=True)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n-train", type=int, default=600)
  ap.add_argument("--size", type=int, default=100)
  ap.add_argument("--blocks", type=int, nargs="*", default=[16, 20, 25, 50])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--host-devices", type=int, default=1)
  ap.add_argument("--out", type=Path, default=None)
  args = ap.parse_args(argv)
  from fastntk_jax.io.environment import request_host_devices
  request_host_devices(args.host_devices)
  out = run(args)
  if args.out is not None:
    from fastntk_jax.io import atomic
    text = json.dumps(out, indent=1)
    atomic.atomic_write(args.out, lambda f: f.write(text.encode()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
