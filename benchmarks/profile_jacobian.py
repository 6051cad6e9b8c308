"""Where a Fast-NTK pass spends its time, over the size of a block of samples.

ResNet-20, BatchNorm + head (P = 2,026), 1,024 embedded CIFAR-10 images. For
each block size (samples per block over all devices of the default mesh) it
times, warm (compiled on a first block of the same shape):

* ``jacobian``: the Jacobian rows alone (``kernels.jac_block_fn``);
* ``forward``: the forward pass alone;
* ``gram_pass``: :func:`fastntk_jax.core.kernels.gram` as ``unlearn`` and
  ``prepare`` call it: logits, MSE residuals, Jacobian rows, per-device
  ``JᵀJ`` and ``Jᵀr`` terms and their float64 sums, reduced once at the end.

Prints (and, with --out, writes as JSON) milliseconds per image.

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
  ap.add_argument("--blocks", type=int, nargs="+", default=None,
                  help="samples per block over all devices (default: 8, 16, "
                       "32, 64, 128 and 256 per device)")
  ap.add_argument("--out", type=Path, default=None)
  args = ap.parse_args(argv)
  blocks = args.blocks or [k * args.host_devices
                           for k in (8, 16, 32, 64, 128, 256)]
  if args.host_devices < 1 or any(
      b < 1 or N % b or b % args.host_devices for b in blocks):
    ap.error(f"--host-devices >= 1 and --blocks dividing {N}, each a multiple "
             "of --host-devices")
  from fastntk_jax.io.environment import request_host_devices
  request_host_devices(args.host_devices)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from fastntk_jax import data
  from fastntk_jax.io import atomic
  from fastntk_jax.core import blocking
  from fastntk_jax.core import kernels
  from fastntk_jax.models import zoo
  from fastntk_jax.io.environment import environment
  from fastntk_jax.core.unlearn import RESIDUAL_FNS

  m, v, _ = zoo.load_backbone("resnet20")
  model = zoo.peft_model("resnet20", m, v, num_classes=10, mode="peft", seed=0)
  w = model.init_params
  x, y = data.load_embedded_cifar10()[:2]
  xn = jax.jit(zoo.preprocess_fn("resnet20"))(jnp.asarray(x[:1000]))
  xn = jnp.concatenate([xn, xn[:N - 1000]])
  yn = jnp.asarray(np.concatenate([y[:1000], y[:N - 1000]]))
  mesh = kernels.default_mesh()
  p = int(sum(np.size(l) for l in jax.tree_util.tree_leaves(w)))
  jac_fn = kernels.jac_block_fn(model.apply_fn)
  fwd = jax.jit(model.apply_fn)
  w_r = blocking.replicate(mesh, w)

  def per_image(step, block):
    xs = [blocking.shard_rows(mesh, xn[i:i + block])
          for i in range(0, N, block)]
    jax.block_until_ready(step(xs[0]))  # compiles
    t = time.perf_counter()
    for xb in xs:
      out = step(xb)
    jax.block_until_ready(out)
    return 1000 * (time.perf_counter() - t) / N

  def gram_pass(block):
    return kernels.gram(model.apply_fn, w, xn, RESIDUAL_FNS["mse"], y=yn,
                        block_size=block, solve_dtype="float64",
                        return_outputs=True)

  rows = []
  for block in blocks:
    jax.block_until_ready(kernels.gram(
        model.apply_fn, w, xn[:block], RESIDUAL_FNS["mse"], y=yn[:block],
        block_size=block, solve_dtype="float64"))  # compiles
    t = time.perf_counter()
    jax.block_until_ready(gram_pass(block))
    t_gram = 1000 * (time.perf_counter() - t) / N
    row = {"block": block, "per_device": block // args.host_devices,
           "jacobian": per_image(lambda xb: jac_fn(w_r, xb), block),
           "forward": per_image(lambda xb: fwd(w_r, xb), block),
           "gram_pass": t_gram}
    rows.append(row)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                      for k, v in row.items()}), flush=True)

  result = {"benchmark": "profile_jacobian", **environment(),
            "mesh_devices": [str(d) for d in jax.local_devices()],
            "cpu_count": os.cpu_count(),
            "config": {"model": "resnet20 BatchNorm + head", "num_params": p,
                       "n": N, "host_devices": args.host_devices,
                       "gram_precision": "float64", "residual": "mse"},
            "ms_per_image": rows}
  if args.out:
    text = json.dumps(result, indent=1)
    atomic.atomic_write(args.out, lambda f: f.write(text.encode()))
  return result


if __name__ == "__main__":
  main()
