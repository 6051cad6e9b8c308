"""A deletion store answering a sequence of requests, against from scratch.

ResNet-20 (CIFAR-10 weights from ../shared), BatchNorm scale/shift + a new
head as PEFT parameters (P = 2,026), fine-tuned for ``--finetune-epochs`` on
``--n-train`` CIFAR-10 training images with the ``--loss`` recipe; then

1. ``DeletionStore.init`` over D (prepare + write the store);
2. ``--requests`` requests of ``--size`` random images in sequence, each
   through the store (compute, the new state's files, fsync and the SQLite
   commit), timed one by one in this process after ``init`` — the latency
   is the time until the request is committed; a cross-entropy store's
   refresh of its preconditioner, when due, runs after that commit and is
   timed apart — and one more request after reopening the store, as a new
   process would;
3. ``verify``: ``unlearn`` from scratch on what is left, against the
   store's parameters (relative difference, accuracy on the forgotten).

Writes JSON atomically (device, versions, configuration, every request's
time)::

    python benchmarks/deletion_store.py --loss mse --host-devices 2
    python benchmarks/deletion_store.py --loss mse --keep-rows \
        --out benchmarks/results/deletion_store_mse_rows_cpu.json
    python benchmarks/deletion_store.py --loss ce \
        --out benchmarks/results/deletion_store_ce_cpu.json
    python benchmarks/deletion_store.py --n-train 2000 --requests 3   # smoke

The process keeps the memory it frees (``keep_freed_memory``, as the CLI's
``forget`` does); ``--release-memory`` leaves glibc's default.

``--probe`` times, before each request and outside its timing, two fixed
NumPy workloads that share nothing with the store's code: a float32
matrix-vector product over as many bytes as the state's Jacobian rows
(memory-bound) and a 512² float64 matmul (compute-bound). A request that is
slow while the probes are too points at the machine, not at the solve.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax import data
from fastntk_jax.io import atomic
from fastntk_jax.io.environment import environment
from fastntk_jax.io.environment import keep_freed_memory
from fastntk_jax.io.environment import request_host_devices
from fastntk_jax.models import zoo
from fastntk_jax.store import DeletionStore
from fastntk_jax.training import train


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _steal() -> float | None:
  """Seconds of steal time of all CPUs so far (``/proc/stat``: time the
  hypervisor ran other guests while this VM wanted the CPU); None where the
  file is missing."""
  try:
    with open("/proc/stat") as f:
      fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")
  except (OSError, IndexError, ValueError):
    return None


def _write(path: Path, obj) -> None:
  text = json.dumps(obj, indent=1)
  atomic.atomic_write(path, lambda f: f.write(text.encode()))


def _data(n: int, seed: int):
  tr = data.load_dataset("cifar10-jpeg", "train")
  rng = np.random.default_rng(seed)
  take = np.sort(rng.choice(len(tr.y), n, replace=False))
  prep = jax.jit(zoo.preprocess_fn("resnet20"))
  x = np.concatenate([np.asarray(prep(jnp.asarray(tr.x[take[i:i + 1000]])))
                      for i in range(0, n, 1000)])
  return x, tr.y[take].astype(np.int64)


def _requests(rng, n: int, count: int, size: int):
  order = rng.permutation(n)
  if count * size >= n:
    raise SystemExit(f"--requests x --size must be < --n-train ({n}).")
  return [np.sort(order[i * size:(i + 1) * size]) for i in range(count)]


def _stats(v) -> dict:
  v = np.asarray(v, float)
  return {"median": float(np.median(v)), "max": float(np.max(v)),
          "min": float(np.min(v)), "mean": float(np.mean(v))}


class _Probe:
  """Two fixed NumPy workloads, timed (median of 3) on demand."""

  def __init__(self, n_rows: int, width: int):
    rng = np.random.default_rng(0)
    self.rows = rng.standard_normal((n_rows, width), dtype=np.float32)
    self.vec = rng.standard_normal(width, dtype=np.float32)
    self.sq = rng.standard_normal((512, 512))

  @staticmethod
  def _median(fn) -> float:
    ts = []
    for _ in range(3):
      t = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t)
    return float(np.median(ts))

  def __call__(self) -> dict:
    return {"rows_matvec_seconds": self._median(lambda: self.rows @ self.vec),
            "matmul512_seconds": self._median(lambda: self.sq @ self.sq)}


def run(args) -> dict:
  out = {"benchmark": "deletion_store", **environment(),
         "cpu_count": os.cpu_count(),
         "mesh_devices": [str(d) for d in jax.local_devices()],
         "config": {k: (str(v) if isinstance(v, Path) else v)
                    for k, v in vars(args).items()}}
  x, y = _data(args.n_train, args.seed)
  module, variables, _ = zoo.load_backbone("resnet20")
  model = zoo.peft_model("resnet20", module, variables, num_classes=10,
                         mode="peft", seed=args.seed)
  recipe = train.FinetuneConfig(loss=args.loss, epochs=args.finetune_epochs,
                                batch_size=250, learning_rate=1e-2,
                                seed=args.seed)
  t = time.perf_counter()
  w_d = train.finetune(model.apply_fn, model.init_params, x, y,
                       config=recipe).params
  out["finetune_seconds"] = time.perf_counter() - t
  ids = np.arange(len(y), dtype=np.int64)
  root = Path(tempfile.mkdtemp(prefix="fastntk-store-", dir=args.tmp))
  path = root / "store"
  try:
    t = time.perf_counter()
    store = DeletionStore.init(path, model.apply_fn, w_d, (x, y), ids=ids,
                               anchor=model.init_params, loss=args.loss,
                               damping=args.damping,
                               keep_rows=args.keep_rows)
    out["init_seconds"] = time.perf_counter() - t
    out["prepare_seconds"] = store.meta["prepare_seconds"]
    reqs = _requests(np.random.default_rng(args.seed + 1), len(y),
                     args.requests + 1, args.size)
    rows = []
    # As many float32 bytes as the state's rows (N·C rows of P); a second
    # array that size in this process (documented in --probe's help).
    width = sum(int(np.size(v))
                for v in jax.tree_util.tree_leaves(model.init_params))
    c = int(np.asarray(model.apply_fn(model.init_params, x[:1])).shape[-1])
    probe = _Probe(len(y) * c, width) if args.probe else None
    for i, r in enumerate(reqs[:-1]):
      machine = probe() if probe is not None else None
      ru0, st0 = resource.getrusage(resource.RUSAGE_SELF), _steal()
      t = time.perf_counter()
      res = store.forget(model.apply_fn, (x[r], y[r]), ids=r,
                         request_id=f"r{i}",
                         refresh_slack=args.refresh_slack,
                         newton_tol=args.newton_tol)
      wall = time.perf_counter() - t
      ru1, st1 = resource.getrusage(resource.RUSAGE_SELF), _steal()
      ex = res.row["extra"]
      after = res.refresh or {}
      packed = res.compact or {}
      # latency: until the request is committed (its answer durable); a
      # due compaction and refresh of M run after that, each its own
      # generation.
      latency = (wall - after.get("seconds", 0.0)
                 - after.get("write_seconds", 0.0) - packed.get("seconds", 0.0)
                 - (packed.get("warm_up_seconds") or 0.0))
      rows.append({"wall_seconds": wall, "latency_seconds": latency,
                   "core_seconds": res.row["seconds"],
                   "write_seconds": ex["write_seconds"],
                   "relative_residual": res.row["relative_residual"],
                   "acc_before": res.row["before"]["accuracy"],
                   "acc_after": res.row["after"]["accuracy"],
                   "solve": ex["solve"], "refresh_rule": ex.get("refresh"),
                   "refresh_after": res.refresh,
                   "compact_after": res.compact,
                   # the process's page faults and CPU seconds over the call
                   "rusage": {k: getattr(ru1, k) - getattr(ru0, k) for k in (
                       "ru_minflt", "ru_majflt", "ru_utime", "ru_stime")},
                   # CPU time the hypervisor gave other guests meanwhile
                   "steal_seconds": (None if st0 is None or st1 is None
                                     else st1 - st0),
                   "probe": machine})
      print(f"request {i}: {latency:.2f} s (solve {res.row['seconds']:.2f} s"
            f", {(ex['solve'] or {}).get('iterations')} steps, write "
            f"{ex['write_seconds']:.2f} s; {ru1.ru_minflt - ru0.ru_minflt} "
            "page faults)" + (
                f"; then compacted in {packed['seconds']:.2f} s"
                if packed.get("status") == "compacted" else "") + (
                f"; then M refreshed in {after['seconds']:.2f} s"
                if after.get("status") == "refreshed" else ""), flush=True)
    store.close()
    t = time.perf_counter()
    store = DeletionStore.open(path)
    reopen = time.perf_counter() - t
    r = reqs[-1]
    t = time.perf_counter()
    store.forget(model.apply_fn, (x[r], y[r]), ids=r, request_id="after-open",
                 newton_tol=args.newton_tol)
    out["after_reopen"] = {"open_seconds": reopen,
                           "request_seconds": time.perf_counter() - t}
    out["requests"] = {"per_request": rows, "latency": _stats(
        [q["latency_seconds"] for q in rows]), "wall": _stats(
            [q["wall_seconds"] for q in rows]), "write": _stats(
                [q["write_seconds"] for q in rows]),
        "latency_first_excluded": _stats(
            [q["latency_seconds"] for q in rows[1:]]),
        "refreshes_after": [i for i, q in enumerate(rows)
                            if (q["refresh_after"] or {}).get("status")
                            == "refreshed"],
        "compactions_after": [i for i, q in enumerate(rows)
                              if (q["compact_after"] or {}).get("status")
                              == "compacted"]}
    t = time.perf_counter()
    out["verify"] = store.verify(model.apply_fn, (x, y, ids))
    out["verify_seconds"] = time.perf_counter() - t
    out["store_bytes"] = store.status()["bytes_on_disk"]
    store.close()
  finally:
    shutil.rmtree(root, ignore_errors=True)
  out["peak_rss_gib"] = _peak_rss_gib()
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n-train", type=int, default=10000)
  ap.add_argument("--requests", type=int, default=50)
  ap.add_argument("--size", type=int, default=100)
  ap.add_argument("--loss", choices=["mse", "ce"], default="mse")
  ap.add_argument("--damping", type=float, default=1.0)
  ap.add_argument("--finetune-epochs", type=int, default=1)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--tmp", type=Path, default=None,
                  help="folder for the store (default: the system's temp)")
  ap.add_argument("--host-devices", type=int, default=1,
                  help="CPU devices XLA exposes, one XLA program each; the "
                  "Jacobian work is sharded over them (default 1; 2 on this "
                  "2-core machine is the faster MSE setting, docs/scale.md)")
  ap.add_argument("--refresh-slack", type=float, default=None,
                  metavar="SECONDS", help="cross-entropy: the store's latency "
                  "rule for refreshing M (default: the cost rule only)")
  ap.add_argument("--newton-tol", type=float, default=None,
                  help="cross-entropy: the requests' relative gradient "
                  "tolerance (default: deletion.forget's, 1e-9 for float64 "
                  "solves on kept rows); verify still solves from scratch at "
                  "its own default")
  ap.add_argument("--probe", action="store_true",
                  help="time two fixed NumPy workloads before each request "
                  "(outside its timing), to tell a slow machine from a slow "
                  "solve; allocates an array the size of the state's "
                  "Jacobian rows in this process")
  ap.add_argument("--keep-rows", action="store_true",
                  help="MSE: the store keeps D's Jacobian rows, so a request "
                  "reads its rows instead of computing them")
  ap.add_argument("--release-memory", action="store_true",
                  help="leave glibc's default of handing freed memory back "
                  "(by default this process keeps it, as `fastntk deletion "
                  "forget` does; docs/deletion_store.md)")
  ap.add_argument("--out", type=Path, default=None)
  args = ap.parse_args(argv)
  # Before JAX starts its threads.
  args.kept_freed_memory = (False if args.release_memory
                            else keep_freed_memory())
  if args.host_devices < 1:
    ap.error("--host-devices must be >= 1")
  try:
    request_host_devices(args.host_devices)
  except RuntimeError as e:
    raise SystemExit(f"--host-devices: {e}")
  if min(args.n_train, args.requests, args.size) < 1:
    ap.error("--n-train, --requests and --size must be >= 1")
  if args.newton_tol is not None and not 0 < args.newton_tol < 1:
    ap.error(f"--newton-tol must be in (0, 1), got {args.newton_tol}")
  if args.out is None:
    args.out = Path(f"benchmarks/results/deletion_store_{args.loss}_cpu.json")
  out = run(args)
  _write(args.out, out)
  v = out["verify"]
  lat = out["requests"]["latency"]
  print(f"{args.requests} requests of {args.size}: latency median "
        f"{lat['median']:.2f} s, max {lat['max']:.2f} s; with refreshes, "
        f"wall mean {out['requests']['wall']['mean']:.2f} s; from scratch "
        "vs store: "
        f"{v['relative_difference']:.3g}; wrote {args.out}")


if __name__ == "__main__":
  main()
