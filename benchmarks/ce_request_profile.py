"""Where a cross-entropy deletion request's time goes, phase by phase.

ResNet-20 (CIFAR-10 weights from ../shared), BatchNorm scale/shift + a new
head, fine-tuned for one epoch with cross-entropy on ``--n-train`` CIFAR-10
training images (as ``benchmarks/deletion_store.py``), ``deletion.prepare``
in memory, then ``--requests`` requests of ``--size`` random images through
``deletion.forget``, each phase wrapped in a timer that waits for its
result (``jax.block_until_ready``): the solve's row passes
(``step_pass``, ``matvec``, ``rmatvec``), the preconditioner, the line
search, the request's terms and factorisation, the input check. The
waiting adds a little time; the shares are what this is for. Writes JSON
atomically::

    python benchmarks/ce_request_profile.py \\
        --out benchmarks/results/ce_request_profile_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deletion_store as bench  # noqa: E402  (the same data and recipe)

from fastntk_jax.core import deletion  # noqa: E402
from fastntk_jax.core import newton  # noqa: E402
from fastntk_jax.io.checkpoint import atomic_write_json  # noqa: E402
from fastntk_jax.io.environment import environment  # noqa: E402
from fastntk_jax.io.environment import keep_freed_memory  # noqa: E402
from fastntk_jax.models import zoo  # noqa: E402
from fastntk_jax.training import train  # noqa: E402

_SECONDS = collections.defaultdict(float)
_CALLS = collections.Counter()


def _timed(name, fn):
  def wrapped(*a, **k):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*a, **k))
    _SECONDS[name] += time.perf_counter() - t
    _CALLS[name] += 1
    return out
  return wrapped


def _instrument() -> None:
  for name in ("step_pass", "matvec", "rmatvec"):
    setattr(newton.DenseJacobian, name,
            _timed(name, getattr(newton.DenseJacobian, name)))
  for mod, name in ((newton, "_line_search"), (deletion, "_cho_apply"),
                    (deletion, "_request_terms"), (deletion, "_cholesky"),
                    (deletion, "_check_request_inputs")):
    setattr(mod, name, _timed(name.lstrip("_"), getattr(mod, name)))


def run(args) -> dict:
  x, y = bench._data(args.n_train, args.seed)
  module, variables, _ = zoo.load_backbone("resnet20")
  model = zoo.peft_model("resnet20", module, variables, num_classes=10,
                         mode="peft", seed=args.seed)
  recipe = train.FinetuneConfig(loss="ce", epochs=1, batch_size=250,
                                learning_rate=1e-2, seed=args.seed)
  w_d = train.finetune(model.apply_fn, model.init_params, x, y,
                       config=recipe).params
  ids = np.arange(len(y))
  t = time.perf_counter()
  state = deletion.prepare(model.apply_fn, w_d, (x, y),
                           anchor=model.init_params, ids=ids, loss="ce",
                           damping=1.0)
  prepare = time.perf_counter() - t
  _instrument()
  order = np.random.default_rng(args.seed + 1).permutation(len(y))
  params, rows = w_d, []
  for i in range(args.requests):
    req = np.sort(order[i * args.size:(i + 1) * args.size])
    _SECONDS.clear()
    _CALLS.clear()
    t = time.perf_counter()
    res = deletion.forget(state, model.apply_fn, params, (x[req], y[req]),
                          ids=ids[req])
    rows.append({"seconds": time.perf_counter() - t,
                 "steps": res.solve.iterations,
                 "cg_steps": res.solve.cg_steps,
                 "phases": {k: {"seconds": v, "calls": _CALLS[k]}
                            for k, v in _SECONDS.items()}})
    state, params = res.state, res.params
    print(f"request {i}: {rows[-1]['seconds']:.2f} s, {res.solve.iterations}"
          " steps; " + ", ".join(
              f"{k} {v:.3f} s/{_CALLS[k]}" for k, v in sorted(
                  _SECONDS.items(), key=lambda kv: -kv[1])), flush=True)
  return {"benchmark": "ce_request_profile", **environment(),
          "config": {k: (str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
          "prepare_seconds": prepare, "requests": rows}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n-train", type=int, default=10000)
  ap.add_argument("--requests", type=int, default=8)
  ap.add_argument("--size", type=int, default=100)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", type=Path,
                  default=Path("benchmarks/results/ce_request_profile_cpu.json"))
  args = ap.parse_args(argv)
  args.kept_freed_memory = keep_freed_memory()
  out = run(args)
  atomic_write_json(args.out, out)


if __name__ == "__main__":
  main()
