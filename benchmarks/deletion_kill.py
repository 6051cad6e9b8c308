"""SIGKILL `fastntk deletion forget` at random moments; check the store each time.

On the shipped data (embedded CIFAR-10, ResNet-20 BatchNorm + head):

1. ``fastntk train`` a small checkpoint and ``fastntk deletion init`` a store;
2. the reference: a copy of the fresh store answers the request sequence
   in this process (the library, the CLI's model), giving the parameters'
   SHA-256 after 0, 1, 2, ... requests;
3. each trial starts ``fastntk deletion forget`` for the next request in a
   subprocess and SIGKILLs it after a random delay (uniform between 0 and
   ``--max-delay`` seconds, so some kills land before, some during and some
   after the request's work); then the store must open for reading and for
   writing, be exactly the state after some number of requests of the
   sequence (parameters' SHA-256, ids, log rows), hold no stray object file,
   and the run goes on with the next trial.

Writes JSON atomically with each trial's delay, outcome and state::

    python benchmarks/deletion_kill.py --trials 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fastntk_jax.cli.deletion import store_model
from fastntk_jax.cli.deletion import store_samples
from fastntk_jax.io import atomic
from fastntk_jax.io.environment import environment
from fastntk_jax.store import DeletionStore
from fastntk_jax.store import params_sha256
from fastntk_jax.store import take


def _fastntk(*args, check=True):
  r = subprocess.run([sys.executable, "-m", "fastntk_jax.cli", *args],
                     capture_output=True, text=True)
  if check and r.returncode != 0:
    raise SystemExit(f"fastntk {' '.join(args)}: {r.stderr[-2000:]}")
  return r


def _chain(store_path: Path, requests) -> list[str]:
  """The parameters' SHA-256 after 0, 1, ... requests, answered in process."""
  with DeletionStore.open(store_path) as s:
    apply_fn = store_model(s)  # the model and data `fastntk deletion` uses
    x, y, ids = store_samples(s.meta["description"])
    chain = [s.generation["params_sha256"]]
    for i, r in enumerate(requests):
      x_f, y_f = take((x, y, ids), np.array(r))
      s.forget(apply_fn, (x_f, y_f), ids=np.array(r), request_id=f"k{i}")
      chain.append(params_sha256(s.params))
  return chain


def _check(path: Path, chain, n_total: int, per: int) -> dict:
  with DeletionStore.open(path, readonly=True) as s:
    n_read = len(s.log())
    ok_read = s.generation["params_sha256"] == chain[n_read]
  with DeletionStore.open(path) as s:
    n = len(s.log())
    ok = (s.head == n and n == n_read and ok_read
          and s.generation["params_sha256"] == chain[n]
          and params_sha256(s.params) == chain[n]
          and s.state.num_samples == n_total - per * n
          and [r["request_id"] for r in s.log()] == [f"k{i}" for i in range(n)]
          and set(s.objects.keys()) == s._live_keys())
  return {"applied": n, "consistent": bool(ok)}


def run(args) -> dict:
  root = Path(tempfile.mkdtemp(prefix="fastntk-kill-", dir=args.tmp))
  try:
    ck, st = root / "m.ckpt", root / "m.store"
    _fastntk("train", "--model", "resnet20", "--data", "embedded", "--ipc",
             str(args.ipc), "--test-ipc", "2", "--epochs", "2", "--out",
             str(ck), "--quiet")
    _fastntk("deletion", "init", str(st), "--checkpoint", str(ck))
    n = 10 * args.ipc
    per = 2
    order = np.random.default_rng(args.seed).permutation(n)
    requests = [sorted(int(i) for i in order[per * k:per * k + per])
                for k in range(args.trials + 5)]
    shutil.copytree(st, root / "ref")
    chain = _chain(root / "ref", requests)
    rng = np.random.default_rng(args.seed + 1)
    trials = []
    for t in range(args.trials):
      with DeletionStore.open(st, readonly=True) as s:
        k = len(s.log())
      delay = float(rng.uniform(0.0, args.max_delay))
      cmd = [sys.executable, "-m", "fastntk_jax.cli", "deletion", "forget",
             str(st), "--ids", "-", "--request-id", f"k{k}"]
      child = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, text=True)
      child.stdin.write(" ".join(map(str, requests[k])))
      child.stdin.close()
      time.sleep(delay)
      finished = child.poll() is not None
      if not finished:
        child.send_signal(signal.SIGKILL)
      child.wait()
      res = _check(st, chain, n, per)
      res.update({"trial": t, "request": k, "delay_s": delay,
                  "killed": not finished, "returncode": child.returncode,
                  "request_applied": res["applied"] > k})
      trials.append(res)
      print(json.dumps(res), flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return {"benchmark": "deletion_kill", **environment(),
          "config": {k: (str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
          "trials": trials,
          "summary": {"trials": len(trials),
                      "consistent": sum(t["consistent"] for t in trials),
                      "killed": sum(t["killed"] for t in trials),
                      "killed_after_commit": sum(
                          t["killed"] and t["request_applied"]
                          for t in trials),
                      "killed_before_commit": sum(
                          t["killed"] and not t["request_applied"]
                          for t in trials)}}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--trials", type=int, default=20)
  ap.add_argument("--max-delay", type=float, default=12.0,
                  help="seconds; a `forget` process here takes about this "
                  "long, most of it importing JAX and compiling")
  ap.add_argument("--ipc", type=int, default=10)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--tmp", type=Path, default=None)
  ap.add_argument("--out", type=Path,
                  default=Path("benchmarks/results/deletion_kill_cpu.json"))
  args = ap.parse_args(argv)
  if args.trials < 1 or args.max_delay <= 0:
    ap.error("--trials must be >= 1 and --max-delay > 0")
  out = run(args)
  text = json.dumps(out, indent=1)
  atomic.atomic_write(args.out, lambda f: f.write(text.encode()))
  s = out["summary"]
  print(f"{s['consistent']} of {s['trials']} trials consistent "
        f"({s['killed']} killed: {s['killed_before_commit']} before the "
        f"commit, {s['killed_after_commit']} after it); wrote {args.out}")
  if s["consistent"] != s["trials"]:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
