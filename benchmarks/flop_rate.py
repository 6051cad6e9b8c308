"""How close the Fast-NTK passes run to the machine's limit, and where the time goes.

For each model (ResNet-20 BatchNorm + head with the shipped weights, ViT-Tiny/4
prompts + head with a random backbone: cost does not depend on the values) and
each variant (XLA flags, host devices, block size), one child process measures,
warm and best of ``--repeats``:

* ``forward``, ``jacobian`` (``kernels.jac_block_fn``, the Jacobian rows) and
  ``gram`` (the block pass ``kernels.gram`` runs: logits, residuals, Jacobian
  rows, ``JᵀJ`` and ``Jᵀr`` in float32, then their float64 sums): milliseconds
  per image and flop rate, the flops being XLA's own cost analysis of the
  compiled block program;
* ``accumulate``: the float64 ``(A, b) += (G, g)`` of one block alone;
* a dense float32 (and float64) ``2048² @ 2048²`` matmul in the same process:
  ``jacobian.rate / matmul_f32`` is the fraction of what the machine does;
* the **profile**: every convolution and dot of the Jacobian program's jaxpr,
  with its own shapes and parameters, compiled and timed alone. Their summed
  time is what the program would take if everything but those kernels were
  free; the rest (``other_ms``: BatchNorm and ReLU cotangents, the per-layer
  reductions that give the BatchNorm rows, layout copies) is the program's
  own overhead. The kernels' own rate (``kernel_rate``) bounds the pass.

Each variant runs in its own process, because XLA reads its flags and the
number of host devices once, at start-up.

    python benchmarks/flop_rate.py --out benchmarks/results/flop_rate_cpu.json
    python benchmarks/flop_rate.py --quick          # the main rows only
    python benchmarks/flop_rate.py --resume --out ...   # redo failed rows
    python benchmarks/flop_rate.py --plot benchmarks/results/flop_rate_cpu.json

On a GPU (e.g. ``pip install -U "jax[cuda12]"``) the same command measures
the GPU; the host-device and XLA-CPU flag variants are then skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROW_TAG = "FLOP_RATE_ROW "
MODELS = ("resnet20", "vit_tiny_4")
#: XLA:CPU variants tried for the convolution / dot kernels. Every name maps
#: to the flags added to ``XLA_FLAGS`` in the child.
FLAG_VARIANTS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn_conv": "--xla_cpu_experimental_onednn_fusion_type=individual_convolution",
    "ynnpack_conv": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
}
KERNEL_PRIMITIVES = ("conv_general_dilated", "dot_general")


def _inner_jaxprs(params):
  from jax.extend import core as jex
  for v in params.values():
    vs = v if isinstance(v, (tuple, list)) else (v,)
    for u in vs:
      if isinstance(u, jex.ClosedJaxpr):
        yield u.jaxpr
      elif isinstance(u, jex.Jaxpr):
        yield u


def kernel_eqns(jaxpr, out=None) -> dict:
  """``{key: (count, eqn)}`` for every convolution and dot in ``jaxpr``,
  nested ones included; ``key`` holds the operand shapes and parameters."""
  out = {} if out is None else out
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in KERNEL_PRIMITIVES:
      shapes = tuple((tuple(v.aval.shape), str(v.aval.dtype))
                     for v in eqn.invars)
      key = (eqn.primitive.name, shapes, repr(sorted(
          (k, repr(p)) for k, p in eqn.params.items())))
      n, _ = out.get(key, (0, eqn))
      out[key] = (n + 1, eqn)
    for sub in _inner_jaxprs(eqn.params):
      kernel_eqns(sub, out)
  return out


def _best_seconds(fn, repeats: int, inner: int = 1) -> float:
  import jax
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(inner):
      out = fn()
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / inner)
  return best


def _flops(jitted, *args) -> float:
  ca = jitted.lower(*args).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", 0.0))


def profile_kernels(fn, args, repeats: int) -> dict:
  """Times every convolution and dot of ``jax.make_jaxpr(fn)(*args)`` alone."""
  import jax
  eqns = kernel_eqns(jax.make_jaxpr(fn)(*args).jaxpr)
  rows, total_s, total_flops = [], 0.0, 0.0
  for i, (key, (count, eqn)) in enumerate(sorted(
      eqns.items(), key=lambda kv: kv[0][:2])):
    ops = [jax.random.normal(jax.random.PRNGKey(i + j), v.aval.shape,
                             v.aval.dtype)
           for j, v in enumerate(eqn.invars)]
    prim, params = eqn.primitive, dict(eqn.params)
    jitted = jax.jit(lambda *a: prim.bind(*a, **params))
    flops = _flops(jitted, *ops)
    secs = _best_seconds(lambda: jitted(*ops), repeats, inner=3)
    total_s += count * secs
    total_flops += count * flops
    rows.append({"primitive": key[0],
                 "shapes": [list(s) for s, _ in key[1]],
                 "params": {k: str(v) for k, v in params.items()
                            if k in ("window_strides", "padding",
                                     "dimension_numbers",
                                     "feature_group_count", "lhs_dilation",
                                     "rhs_dilation")},
                 "count": count, "ms": 1000 * secs,
                 "gflops_per_s": flops / secs / 1e9 if secs else None})
  return {"kernels": rows, "kernel_ms": 1000 * total_s,
          "kernel_flops": total_flops,
          "kernel_rate": total_flops / total_s / 1e9 if total_s else None}


def _model(name: str, num_prompts: int, seed: int = 0):
  from fastntk_jax.models import zoo
  if name == "resnet20":
    m, v, _ = zoo.load_backbone("resnet20")
  else:
    m = zoo.build(name, num_classes=10, num_prompts=num_prompts)
    v = zoo.init_variables(m, zoo.spec(name).image_size, seed)
  return zoo.peft_model(name, m, v, num_classes=10, mode="peft", seed=seed)


def _images(name: str, n: int):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fastntk_jax import data
  from fastntk_jax.models import zoo
  x, y = data.load_embedded_cifar10()[:2]
  idx = np.arange(n) % len(x)
  xb = jnp.asarray(x[idx])
  size = zoo.spec(name).image_size
  if size != xb.shape[1]:
    xb = jax.image.resize(xb.astype(jnp.float32), (n, size, size, 3),
                          "bilinear")
    xb = jnp.clip(jnp.round(xb), 0, 255).astype(jnp.uint8)
  return (jax.block_until_ready(zoo.preprocess_fn(name)(xb)),
          jnp.asarray(y[idx]))


def child_main(cfg: dict) -> dict:
  """One (model, variant, block) measurement; runs in its own process."""
  from fastntk_jax.io.environment import request_host_devices
  extra = FLAG_VARIANTS[cfg["flags"]]
  if extra:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + extra).strip()
  if cfg["host_devices"] > 1:
    request_host_devices(cfg["host_devices"])
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fastntk_jax.core import blocking, kernels
  from fastntk_jax.core.unlearn import RESIDUAL_FNS

  model = _model(cfg["model"], cfg["num_prompts"])
  w = model.init_params
  p = int(sum(np.size(l) for l in jax.tree_util.tree_leaves(w)))
  n, block = cfg["n"], cfg["block"]
  x, y = _images(cfg["model"], n)
  mesh = kernels.default_mesh()
  w_r = blocking.replicate(mesh, w)
  xs = [blocking.shard_rows(mesh, x[i:i + block]) for i in range(0, n, block)]
  ys = [blocking.shard_rows(mesh, y[i:i + block]) for i in range(0, n, block)]
  keep = blocking.shard_rows(mesh, jnp.ones((block,), bool))
  reps = cfg["repeats"]

  def per_image_ms(step):
    def run_all():
      out = None
      for i in range(len(xs)):
        out = step(i)
      return out
    return 1000 * _best_seconds(run_all, reps) / n

  # The dense matmul, before the passes and again after them (best of both:
  # the machine's rate drifts).
  a32 = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048)),
                    jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  t32_before = _best_seconds(lambda: mm(a32), max(reps, 3), 5)
  fwd = jax.jit(model.apply_fn)
  jac = kernels.jac_block_fn(model.apply_fn)
  gblock = kernels._gram_block_fn(model.apply_fn, RESIDUAL_FNS["mse"], mesh)
  add = kernels._add_terms_fn(mesh)
  d = blocking.n_devices(mesh)
  # The Gram pass keeps a P² float64 sum and a P² float32 term per device:
  # skipped where that would take more than half the host's memory (ViTs
  # on several host devices), and recorded so.
  gram_bytes = d * p * p * (8 + 8)
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  do_gram = gram_bytes <= host / 2
  if not do_gram:
    gblock = None
  _, g0, gb0 = (gblock(w_r, xs[0], ys[0], keep) if do_gram
                else (None, jnp.zeros((d, 1)), jnp.zeros((d, 1))))
  with jax.enable_x64(True):
    state = {"acc": jax.device_put(  # donated: each step takes the last
        (jnp.zeros(g0.shape, jnp.float64), jnp.zeros(gb0.shape, jnp.float64)),
        (g0.sharding, gb0.sharding))}

  def gram_step(i):
    _, g, gb = gblock(w_r, xs[i], ys[i], keep)
    with jax.enable_x64(True):
      state["acc"] = add(*state["acc"], g, gb)
    return state["acc"]

  def acc_step():
    with jax.enable_x64(True):
      state["acc"] = add(*state["acc"], g0, gb0)
    return state["acc"]

  acc_ms = (1000 * _best_seconds(acc_step, reps, 3) / block if do_gram
            else None)

  row = {"model": cfg["model"], "flags": cfg["flags"],
         "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "host_devices": d, "block": block, "n": n, "num_params": p,
         "num_outputs": 10}
  # Flops of a whole block, from the unsharded (one-device) programs: the
  # sharded ones report one device's share.
  gblock1 = kernels._gram_block_fn(model.apply_fn, RESIDUAL_FNS["mse"], None)
  x0, y0, k0 = x[:block], y[:block], jnp.ones((block,), bool)
  passes = {
      "forward": (fwd, (w, x0), lambda i: fwd(w_r, xs[i])),
      "jacobian": (jac, (w, x0), lambda i: jac(w_r, xs[i])),
      "gram": (gblock1, (w, x0, y0, k0), gram_step),
  }
  if not do_gram:
    del passes["gram"]
    row["gram"] = {"skipped": f"its sums need {gram_bytes / 2**30:.1f} GiB "
                              f"(d·P²·16 bytes), over half the host's "
                              f"{host / 2**30:.1f} GiB"}
  for name, (jitted, args, step) in passes.items():
    mflop = _flops(jitted, *args) / block / 1e6
    ms = per_image_ms(step)
    row[name] = {"mflop_per_image": mflop, "ms_per_image": ms,
                 "gflops_per_s": mflop / ms}
  row["accumulate_f64"] = {"ms_per_image": acc_ms}

  t32 = min(t32_before, _best_seconds(lambda: mm(a32), max(reps, 3), 5))
  with jax.enable_x64(True):
    a64 = a32.astype(jnp.float64)
    t64 = _best_seconds(lambda: mm(a64), reps, 3)
  row["matmul_f32_gflops_per_s"] = 2 * 2048 ** 3 / t32 / 1e9
  row["matmul_f64_gflops_per_s"] = 2 * 2048 ** 3 / t64 / 1e9
  for name in passes:
    row[name]["fraction_of_matmul"] = (row[name]["gflops_per_s"]
                                       / row["matmul_f32_gflops_per_s"])
  if cfg["profile"]:
    # The jaxpr of one device's share of the block (on one device: all of
    # it): its kernels, each alone, against the whole program's time.
    per_dev = block // d
    xb1 = x[:per_dev]
    prof = profile_kernels(lambda w_, x_: jac(w_, x_), (w, xb1), reps)
    jac1 = per_image_ms(lambda i: jac(w_r, xs[i])) if d == 1 else None
    prog_ms = (jac1 if jac1 is not None
               else 1000 * _best_seconds(lambda: jac(w, xb1), reps) / per_dev)
    kernel_ms = prof["kernel_ms"] / per_dev
    prof.update({"images": per_dev, "program_ms_per_image": prog_ms,
                 "kernel_ms_per_image": kernel_ms,
                 "other_ms_per_image": prog_ms - kernel_ms,
                 "kernel_share_of_time": kernel_ms / prog_ms,
                 "kernel_rate_fraction_of_matmul": (
                     prof["kernel_rate"] / row["matmul_f32_gflops_per_s"])})
    row["profile"] = prof
  return row


def run_child(cfg: dict, timeout_s: float) -> dict:
  cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
  t = time.perf_counter()
  try:
    res = subprocess.run(cmd, capture_output=True, text=True,
                         timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {**cfg, "error": f"timeout after {timeout_s} s"}
  for line in res.stdout.splitlines():
    if line.startswith(ROW_TAG):
      row = json.loads(line[len(ROW_TAG):])
      row["child_seconds"] = time.perf_counter() - t
      return row
  return {**cfg, "error": (res.stderr or res.stdout)[-2000:]}


def jobs(args, on_cpu: bool = True) -> list[dict]:
  """The main row of each model (profiled), then its variants: two host
  devices (profiled), the XLA:CPU library flags (every one for ResNet-20,
  whose time is in convolutions; XNNPACK for the ViT, whose time is in dots)
  and, for ResNet-20, the block sizes of ``--block-sweep``."""
  base = {"n": args.n, "repeats": args.repeats,
          "num_prompts": args.num_prompts, "profile": False,
          "flags": "default", "host_devices": 1, "block": args.block}
  out = []
  for model in args.models:
    out.append({**base, "model": model, "profile": True})
    if args.quick or not on_cpu:  # the variants are XLA:CPU's
      continue
    out.append({**base, "model": model, "host_devices": 2, "profile": True})
    for flags in FLAG_VARIANTS:
      if flags != "default" and (model == "resnet20" or flags == "xnnpack"):
        out.append({**base, "model": model, "flags": flags})
    if model == "resnet20":
      out.extend({**base, "model": model, "block": b}
                 for b in args.block_sweep if b != args.block)
  return out


def summary(rows: list[dict]) -> list[dict]:
  """One flat row per measurement; ``*_fraction`` against the row's own
  matmul, ``*_fraction_of_best`` against the best matmul of the run (the
  conservative figure: the machine's rate drifts between processes)."""
  best = max((r["matmul_f32_gflops_per_s"] for r in rows if "error" not in r),
             default=None)
  out = []
  for r in rows:
    if "error" in r:
      out.append({k: r.get(k) for k in ("model", "flags", "host_devices",
                                        "block", "error")})
      continue
    s = {k: r[k] for k in ("model", "flags", "host_devices", "block")}
    s["matmul_f32_gflops_per_s"] = round(r["matmul_f32_gflops_per_s"], 1)
    for name in ("forward", "jacobian", "gram"):
      if "skipped" in r[name]:
        s[f"{name}_skipped"] = r[name]["skipped"]
        continue
      s[f"{name}_ms_per_image"] = round(r[name]["ms_per_image"], 3)
      s[f"{name}_gflops_per_s"] = round(r[name]["gflops_per_s"], 1)
      s[f"{name}_fraction"] = round(r[name]["fraction_of_matmul"], 3)
      s[f"{name}_fraction_of_best"] = round(r[name]["gflops_per_s"] / best, 3)
    if "profile" in r:
      pr = r["profile"]
      s["kernel_share_of_time"] = round(pr["kernel_share_of_time"], 3)
      s["kernel_rate_fraction"] = round(pr["kernel_rate_fraction_of_matmul"],
                                        3)
    out.append(s)
  return out


def plot(result: dict, path: Path) -> None:
  """Grouped bars per (model, host devices): the matmul, the Jacobian and
  Gram passes, and the pass's own convolutions/dots timed alone; the dashed
  line is half the best matmul of the run (the issue's target)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in result["rows"] if "error" not in r
          and r["flags"] == "default" and r["block"] == result["config"]["block"]]
  series = [("dense matmul f32", lambda r: r["matmul_f32_gflops_per_s"]),
            ("Jacobian pass", lambda r: r["jacobian"]["gflops_per_s"]),
            ("Gram pass", lambda r: r["gram"].get("gflops_per_s", 0.0)),
            ("its convs/dots alone",
             lambda r: (r.get("profile") or {}).get("kernel_rate") or 0.0)]
  fig, ax = plt.subplots(figsize=(7, 3.6))
  width = 0.8 / len(series)
  for j, (name, get) in enumerate(series):
    ax.bar([i + j * width for i in range(len(rows))], [get(r) for r in rows],
           width, label=name, color=f"C{j}" if j else "0.55")
  best = max(r["matmul_f32_gflops_per_s"] for r in rows)
  ax.axhline(best / 2, ls="--", c="k", lw=0.8, label="50 % of best matmul")
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))],
                [f"{r['model']}, {r['host_devices']} host dev."
                 for r in rows], fontsize=8)
  ax.set_ylabel("GFLOP/s (XLA cost analysis / time)")
  ax.set_title(f"Flop rate, block {result['config']['block']}, on "
               f"{result['device']} ({result['cpu_model']})", fontsize=9)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=130)


def main(argv=None) -> dict | None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  ap.add_argument("--n", type=int, default=128,
                  help="images per measurement (a multiple of every block)")
  ap.add_argument("--block", type=int, default=32,
                  help="samples per block for the main rows")
  ap.add_argument("--block-sweep", type=int, nargs="+",
                  default=[16, 32, 64, 128])  # resnet20 only
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--num-prompts", type=int, default=5)
  ap.add_argument("--timeout-s", type=float, default=900)
  ap.add_argument("--quick", action="store_true",
                  help="the main row of each model only (no variants)")
  ap.add_argument("--out", type=Path, default=None)
  ap.add_argument("--resume", action="store_true",
                  help="keep the rows of --out that have no error; measure "
                       "only the others")
  ap.add_argument("--plot", type=Path, default=None,
                  help="only plot an existing result JSON (writes .png)")
  ap.add_argument("--child", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    print(ROW_TAG + json.dumps(child_main(json.loads(args.child))),
          flush=True)
    return None
  if args.plot:
    result = json.loads(args.plot.read_text())
    plot(result, args.plot.with_suffix(".png"))
    return result
  blocks = [args.block] + ([] if args.quick else args.block_sweep)
  if args.n < 1 or any(b < 2 or args.n % b or b % 2 for b in blocks):
    ap.error(f"--n ({args.n}) must be a multiple of every block size "
             f"({blocks}), each even (two host devices share a block)")

  from fastntk_jax.io import atomic
  sys.path.insert(0, str(Path(__file__).parent))
  from ntk_cost import _cpu_model, _host_memory_gib, _version

  key = lambda r: tuple(r[k] for k in ("model", "flags", "host_devices",  # noqa: E731
                                       "block"))
  done = {}
  if args.resume and args.out and args.out.exists():
    done = {key(r): r for r in json.loads(args.out.read_text())["rows"]
            if "error" not in r}
  # The parent only asks which platform this is; it must not take the
  # accelerator's memory from its children.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  on_cpu = jax.default_backend() == "cpu"
  rows = []
  for job in jobs(args, on_cpu):
    row = done.get(key(job)) or run_child(job, args.timeout_s)
    rows.append(row)
    print(json.dumps(summary([row])[0]), flush=True)
  from fastntk_jax.io.environment import environment
  env = environment()
  result = {"benchmark": "flop_rate", **env, "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(), "host_memory_gib": _host_memory_gib(),
            "versions_extra": {"jaxlib": _version("jaxlib")},
            "command": " ".join([Path(sys.argv[0]).name] + (argv or
                                                            sys.argv[1:])),
            "config": {"models": args.models, "n": args.n, "block": args.block,
                       "block_sweep": args.block_sweep,
                       "repeats": args.repeats,
                       "num_prompts": args.num_prompts,
                       "flag_variants": FLAG_VARIANTS,
                       "matmul": "float32 2048 x 2048 @ 2048 x 2048, jit"},
            "summary": summary(rows), "rows": rows}
  if args.out:
    text = json.dumps(result, indent=1)
    atomic.atomic_write(args.out, lambda f: f.write(text.encode()))
    plot(result, args.out.with_suffix(".png"))
  return result


if __name__ == "__main__":
  main()
