"""A month of deletion requests against one deployed model, with the CLI.

Runs on a fresh clone with the shipped data only: the embedded CIFAR-10
subset and the shipped ResNet-20 weights. Every step is a separate
``fastntk`` process, as it would be in a deployment:

1. day 0: fine-tune ResNet-20 (BatchNorm + head) and ``fastntk deletion
   init`` a store from the checkpoint;
2. days 1-30: a request every few days, of 1-20 images each; one is sent
   twice (a retry after a timeout: reported as already applied), one names an
   image forgotten before (refused, nothing changes);
3. day 30: ``status``, ``log``, ``verify`` (the auditor's from-scratch
   check) and ``export`` (the model to deploy), then ``evaluate`` on it.

    python examples/deletion_month.py --out results/deletion_month
    python examples/deletion_month.py --loss mse --host-devices 2
    python examples/deletion_month.py --loss mse --keep-rows
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


def fastntk(*args: str, check: bool = True, stdin: str | None = None) -> int:
  cmd = [sys.executable, "-m", "fastntk_jax.cli", *args]
  print("$ fastntk " + " ".join(args), flush=True)
  r = subprocess.run(cmd, input=stdin, text=True)
  if check and r.returncode != 0:
    raise SystemExit(f"fastntk {args[0]} failed with status {r.returncode}")
  return r.returncode


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", type=Path, default=Path("results/deletion_month"))
  ap.add_argument("--ipc", type=int, default=100,
                  help="training images per class (default 100: all of the "
                  "embedded set's 1,000)")
  ap.add_argument("--epochs", type=int, default=10)
  ap.add_argument("--loss", choices=["ce", "mse"], default="ce",
                  help="the fine-tuning loss, and so the store's")
  ap.add_argument("--host-devices", type=int, default=1,
                  help="CPU devices for init, forget and verify (e.g. one "
                  "per core)")
  ap.add_argument("--keep-rows", action="store_true",
                  help="MSE: the store keeps the Jacobian rows (requests "
                  "read them instead of computing them)")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  if args.keep_rows and args.loss != "mse":
    ap.error("--keep-rows is for --loss mse (cross-entropy stores keep rows "
             "anyway)")
  if args.out.exists():
    shutil.rmtree(args.out)
  args.out.mkdir(parents=True)
  ckpt, store = args.out / "model.ckpt", args.out / "model.store"
  fastntk("train", "--model", "resnet20", "--data", "embedded", "--ipc",
          str(args.ipc), "--test-ipc", "20", "--epochs", str(args.epochs),
          "--loss", args.loss, "--out", str(ckpt), "--quiet")
  dev = ("--host-devices", str(args.host_devices))
  fastntk("deletion", "init", str(store), "--checkpoint", str(ckpt), *dev,
          *(("--keep-rows",) if args.keep_rows else ()))
  n = 10 * args.ipc
  rng = np.random.default_rng(args.seed)
  order = rng.permutation(n)
  days = sorted(rng.choice(np.arange(1, 31), size=8, replace=False))
  used = 0
  for k, day in enumerate(days):
    size = int(rng.integers(1, 21))
    ids = " ".join(str(i) for i in order[used:used + size])
    used += size
    print(f"\n# day {day}: request ticket-{k} ({size} images)")
    fastntk("deletion", "forget", str(store), "--ids", "-", "--request-id",
            f"ticket-{k}", *dev, stdin=ids)
    if k == 2:
      print("\n# the same request again, after a client timeout")
      fastntk("deletion", "forget", str(store), "--ids", "-", "--request-id",
              f"ticket-{k}", stdin=ids)
    if k == 4:
      print("\n# a request naming an image forgotten on an earlier day")
      status = fastntk("deletion", "forget", str(store), "--ids", "-",
                       stdin=f"{order[0]} {order[used]}", check=False)
      print(f"(refused with status {status}; nothing changed)")
  print("\n# day 30: the audit and the model to deploy")
  fastntk("deletion", "status", str(store))
  fastntk("deletion", "log", str(store))
  fastntk("deletion", "verify", str(store), *dev)
  fastntk("deletion", "export", str(store), "--out",
          str(args.out / "current.ckpt"))
  fastntk("evaluate", "--checkpoint", str(args.out / "current.ckpt"),
          "--data", "embedded", "--split", "test", "--ipc", "20")


if __name__ == "__main__":
  main()
