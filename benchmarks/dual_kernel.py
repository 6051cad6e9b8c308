"""The dual solver's kernel: neural-tangents per pair of blocks vs Jacobians kept.

``unlearn(solver="dual")`` needs the symmetric kernel Θ over D (N·C × N·C).
With the automatic block size (a block's working memory within
``kernels.DEFAULT_BLOCK_BYTES``), neural-tangents' ``empirical_ntk_fn``
computes the Jacobians of both blocks in every call, so a kernel of B blocks
costs about B(B+1) block Jacobians; ``kernels.ntk(reuse_jacobians=True)``
computes each block's Jacobian once, keeps the (N·C, P) Jacobian and
contracts it. This script times both on the same model, data and blocks, in
this process, one call each (compilation reported separately from JAX's
compile events), checks that they agree, and writes JSON atomically.

    python benchmarks/dual_kernel.py                      # ViT-Tiny/4, N = 200
    python benchmarks/dual_kernel.py --model resnet20 --n 1000

Weights are a random initialisation (cost does not depend on their values);
inputs are embedded CIFAR-10 images.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ntk_cost  # noqa: E402  (same model and input preparation)

from fastntk_jax.io import atomic  # noqa: E402

from fastntk_jax.core import nt

from fastntk_jax.core import blocking

from fastntk_jax.core import kernels

from fastntk_jax.evaluation import timing
from fastntk_jax.io.environment import environment  # noqa: E402


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="vit_tiny_4", choices=ntk_cost.MODELS)
  ap.add_argument("--n", type=int, default=200)
  ap.add_argument("--block-size", type=int, default=None,
                  help="samples per block (default: automatic, as unlearn)")
  ap.add_argument("--num-prompts", type=int, default=5)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", type=Path, default=None,
                  help="default benchmarks/results/dual_kernel_<model>_"
                       "n<N>_<platform>.json")
  args = ap.parse_args(argv)
  if args.n < 1 or (args.block_size is not None and args.block_size < 1):
    ap.error("--n and --block-size must be >= 1")
  out = args.out or Path("benchmarks/results") / (
      f"dual_kernel_{args.model}_n{args.n}_{jax.default_backend()}.json")

  m = ntk_cost._prepare(args.model, "peft", args.num_prompts, args.seed)
  x = ntk_cost._inputs(args.model, args.n, args.seed)
  c = kernels.num_outputs(m.apply_fn, m.init_params, x)
  fn = kernels.ntk_block_fn(m.apply_fn, 1)
  block, _, p = blocking.resolve_block(
      m.apply_fn, m.init_params, x, args.block_size, "ntk", fn,
      lambda xb: (xb, xb, m.init_params))
  n_blocks = math.ceil(args.n / block)
  rows = {}
  kernels_out = {}
  for name, reuse in (("jacobians_kept", True), ("nt_per_block_pair", False)):
    with timing.measure() as t:
      k = jax.block_until_ready(kernels.ntk(
          m.apply_fn, m.init_params, x, block_size=block,
          reuse_jacobians=reuse))
    kernels_out[name] = np.asarray(k)
    rows[name] = {"seconds": t.seconds, "compile_seconds": t.compile_seconds,
                  "run_seconds": t.seconds - t.compile_seconds,
                  "peak_rss_mib_so_far": _peak_rss_mib()}
    print(name, json.dumps(rows[name]), flush=True)
  a, b = kernels_out["jacobians_kept"], kernels_out["nt_per_block_pair"]
  rel = float(np.abs(a - b).max() / np.abs(b).max())
  result = {
      "benchmark": "dual_kernel", **environment(),
      "neural_tangents": nt.nt_version(),
      "config": {"model": args.model, "n": args.n, "num_outputs": c,
                 "num_params_peft": p, "block_size": block,
                 "block_size_source": ("given" if args.block_size else
                                       "automatic (kernels.DEFAULT_BLOCK_BYTES"
                                       " = %d)" % kernels.DEFAULT_BLOCK_BYTES),
                 "num_blocks": n_blocks,
                 "block_jacobians_nt": n_blocks * (n_blocks + 1),
                 "block_jacobians_kept": n_blocks,
                 "seed": args.seed, "num_prompts": args.num_prompts,
                 "weights": "random initialisation", "dtype": "float32",
                 "data": "embedded CIFAR-10 images"},
      "rows": rows,
      "speedup_run": (rows["nt_per_block_pair"]["run_seconds"]
                      / rows["jacobians_kept"]["run_seconds"]),
      "max_abs_diff_over_max": rel,
      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  text = json.dumps(result, indent=1)
  atomic.atomic_write(out, lambda f: f.write(text.encode()))
  print(f"speed-up {result['speedup_run']:.1f}x, agreement {rel:.2e}; "
        f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
