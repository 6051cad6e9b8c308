"""How fast this machine hands out memory: seconds to fill each fresh GiB.

On a virtual machine whose guest memory the host backs lazily, the first
write to a page the guest has never used costs a trip to the host; pages
the guest has used before (freed and reused) do not. A benchmark that
allocates new memory mid-run then shows outliers that are the machine's,
not the library's. This fills ``--gib`` GiB one GiB at a time (numpy
``ones``, kept alive), frees it, and fills one GiB again. Writes JSON::

    python benchmarks/first_touch.py --gib 10 \\
        --out benchmarks/results/first_touch_cpu.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def run(gib: int) -> dict:
  import numpy as np

  from fastntk_jax.io.environment import environment

  fills, bufs = [], []
  for _ in range(gib):
    t = time.perf_counter()
    bufs.append(np.ones(2**30 // 8))
    fills.append(time.perf_counter() - t)
  del bufs
  t = time.perf_counter()
  again = np.ones(2**30 // 8)
  refill = time.perf_counter() - t
  del again
  return {"benchmark": "first_touch", **environment(),
          "cpu_count": os.cpu_count(), "config": {"gib": gib},
          "fill_seconds_per_gib": fills, "refill_seconds": refill}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--gib", type=int, default=10)
  ap.add_argument("--out", type=Path, default=None)
  args = ap.parse_args(argv)
  if args.gib < 1:
    ap.error("--gib must be >= 1")
  out = run(args.gib)
  print("GiB filled, seconds each:",
        " ".join(f"{s:.2f}" for s in out["fill_seconds_per_gib"]),
        f"; one GiB again after freeing: {out['refill_seconds']:.2f} s")
  if args.out is not None:
    from fastntk_jax.io.checkpoint import atomic_write_json
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
