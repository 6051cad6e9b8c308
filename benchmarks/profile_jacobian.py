"""Where a Fast-NTK pass spends its time: Jacobian rows vs Gram accumulation.

ResNet-20, BatchNorm + head (P = 2,026), 1,024 embedded CIFAR-10 images.
Prints (and, with --out, writes as JSON) the milliseconds per image of the
Jacobian blocks over the default mesh (all local devices), of the forward
pass, of the float32/float64 Gram accumulation (warm calls), and of
kernels.gram end to end.

    python benchmarks/profile_jacobian.py                       # one CPU device
    python benchmarks/profile_jacobian.py --host-devices 2      # one per core
"""
import argparse
import json
import os
import time
from pathlib import Path

N = 1024


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--host-devices", type=int, default=1,
                  help="CPU devices XLA exposes (set before JAX starts)")
  ap.add_argument("--block", type=int, default=256, help="images per block")
  ap.add_argument("--out", type=Path, default=None)
  args = ap.parse_args(argv)
  if args.host_devices < 1 or args.block < 1 or N % args.block:
    ap.error(f"--host-devices >= 1 and --block dividing {N}")
  from fastntk_jax._env import request_host_devices
  request_host_devices(args.host_devices)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from fastntk_jax import _io, data, kernels, zoo
  from fastntk_jax._env import environment

  m, v, _ = zoo.load_backbone("resnet20")
  model = zoo.prepare("resnet20", m, v, num_classes=10, mode="peft", seed=0)
  w = model.init_params
  x = data.load_embedded_cifar10()[0][:1000]
  xn = jax.jit(zoo.preprocess_fn("resnet20"))(jnp.asarray(x))
  xn = jnp.concatenate([xn, xn[:N - 1000]])
  mesh = kernels.default_mesh()
  p = int(sum(np.size(l) for l in jax.tree_util.tree_leaves(w)))

  def jac_pass(xs):
    last = None
    for _, _, jb in kernels._padded_jac_blocks(model.apply_fn, w, xs,
                                               args.block, mesh):
      last = jax.block_until_ready(jb)
    return last

  jb = jac_pass(xn[:args.block])  # compiles
  t = time.perf_counter()
  jb = jac_pass(xn)
  t_jac = time.perf_counter() - t

  fwd = jax.jit(model.apply_fn)
  jax.block_until_ready(fwd(w, xn[:args.block]))
  t = time.perf_counter()
  for i in range(0, N, args.block):
    jax.block_until_ready(fwd(w, xn[i:i + args.block]))
  t_fwd = time.perf_counter() - t

  rows = jb.shape[0]
  acc_ms = {}
  for prec in ("float32", "float64"):
    with kernels.precision_scope(prec):
      acc = kernels._accumulate_fn(mesh)
      a = jnp.zeros((p, p), prec)
      b = jnp.zeros((p,), prec)
      keep = kernels._shard_rows(mesh, jnp.ones((rows,), jnp.float32))
      rb = kernels._shard_rows(mesh, jnp.zeros((rows,), jnp.float32))
      a, b = acc(a, b, jb, rb, keep)
      jax.block_until_ready(a)
      t = time.perf_counter()
      for _ in range(N // args.block):
        a, b = acc(a, b, jb, rb, keep)
      jax.block_until_ready(a)
      acc_ms[prec] = 1000 * (time.perf_counter() - t) / N

  r = jnp.zeros((N, 10))
  t = time.perf_counter()
  a, _ = kernels.gram(model.apply_fn, w, xn, r, block_size=args.block,
                      precision="float64")
  jax.block_until_ready(a)
  t_gram = time.perf_counter() - t

  result = {"benchmark": "profile_jacobian", **environment(),
            "mesh_devices": [str(d) for d in jax.local_devices()],
            "cpu_count": os.cpu_count(),
            "config": {"model": "resnet20 BatchNorm + head", "num_params": p,
                       "n": N, "block": args.block,
                       "host_devices": args.host_devices},
            "ms_per_image": {"jacobian": 1000 * t_jac / N,
                             "forward": 1000 * t_fwd / N,
                             "accumulate_float32": acc_ms["float32"],
                             "accumulate_float64": acc_ms["float64"],
                             "gram_float64_end_to_end_incl_compile":
                                 1000 * t_gram / N}}
  print(json.dumps(result["ms_per_image"]), flush=True)
  if args.out:
    text = json.dumps(result, indent=1)
    _io.atomic_write(args.out, lambda f: f.write(text.encode()))
  return result


if __name__ == "__main__":
  main()
