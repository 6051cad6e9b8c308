"""The paper's headline scale on a 2-core CPU: ViT-Base prompts + head, 5,000 images.

Fast-NTK's largest run is ViT-Base (≈86M parameters) with prefix prompts in
every block plus a head (P ≈ 10⁵ PEFT parameters) on 5,000 images, on GPUs.
Here, on the CPU, in one process:

1. **Which solvers fit.** The ``P×P`` float64 matrices of the parameter-space
   solvers (``"primal"``, ``"sketch"``) and the ``N·C × N·C`` kernels of
   ``"dual"`` are estimated against ``--memory-budget-gib`` (their own cost
   models, :meth:`Solver.memory_bytes`); the matrix-free ``"cg"`` fits but
   costs a linearised pass over all N images per step.
2. **The run that fits:** :class:`fastntk_jax.SketchedKernel` (solver
   ``"sketch_dual"``): a random-cotangent sketch of the retained samples'
   Jacobian (``--cotangents`` reverse passes a sample instead of C = 10),
   the forget set's Jacobian exact, both solves in kernel space through the
   Woodbury identity (``R = N_r·s + N_f·C`` rows, no ``P×P`` matrix). Wall
   time (compilation included) and peak resident memory.
3. **Agreement with the exact solver on a subset** of ``--subset`` images
   (the same class forgotten), where the exact kernel-space solver fits:
   the relative difference of the sketched updates (each of
   ``--subset-cotangents``, in both of ``SketchedKernel``'s forms: the
   default retrain on the sketched outputs, and ``exact_gradient=True``) to
   the exact one.

No ImageNet weights exist here, so the backbone is a random initialisation
(cost does not depend on the values) and ``w_D`` is the initial PEFT
parameters (nothing is fine-tuned): this measures time, memory and the
solver's agreement, not accuracy. The images are CIFAR-10's (32 px), cut
into 8×8 patches: 16 tokens, the class token and ``--num-prompts`` prompts
per block (ViT-B/16 at 224 px has 197 tokens, ~12× the flops a pass).

    python benchmarks/vit_base_scale.py --out benchmarks/results/vit_base_scale_cpu.json
    python benchmarks/vit_base_scale.py --n 200 --subset 100 --out /tmp/vb.json   # smoke

On a GPU the same command measures the GPU (``--image-size 224 --patch 16``
is the paper's input).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from cifar_setup import peak_rss_gib, rss_gib, use_host_devices, write_json
from fastntk_jax import KernelSpace, SketchedKernel, unlearn
from fastntk_jax import data
from fastntk_jax.core import solvers
from fastntk_jax.evaluation import timing
from fastntk_jax.io.environment import environment
from fastntk_jax.models import vit, zoo


def _args(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n", type=int, default=5000, help="images in D")
  ap.add_argument("--subset", type=int, default=300,
                  help="images of the exact-vs-sketch comparison")
  ap.add_argument("--image-size", type=int, default=32)
  ap.add_argument("--patch", type=int, default=8)
  ap.add_argument("--num-prompts", type=int, default=5)
  ap.add_argument("--cotangents", type=int, default=1)
  ap.add_argument("--subset-cotangents", type=int, nargs="*", default=[1])
  ap.add_argument("--damping", type=float, default=1.0)
  ap.add_argument("--forget-class", type=int, default=0)
  ap.add_argument("--memory-budget-gib", type=float, default=16.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--host-devices", type=int, default=os.cpu_count() or 1)
  ap.add_argument("--out", type=Path, required=True)
  args = ap.parse_args(argv)
  if args.n < 20 or not 0 <= args.subset <= args.n:
    ap.error("--n must be >= 20 and 0 <= --subset <= --n")
  if args.image_size % args.patch:
    ap.error(f"--image-size ({args.image_size}) must be a multiple of "
             f"--patch ({args.patch})")
  if args.cotangents < 1 or any(s < 1 for s in args.subset_cotangents):
    ap.error("cotangents must be >= 1")
  if args.damping <= 0:
    ap.error("--damping must be > 0 (the kernel-space sketch needs it)")
  use_host_devices(ap, args.host_devices)
  return args


def _model(args):
  module = vit.vit("base", patch_size=args.patch, num_classes=10,
                   num_prompts=args.num_prompts, image_size=args.image_size)
  variables = zoo.init_variables(module, args.image_size, args.seed)
  # "vit_base_4" names the family (prompts + head) for the PEFT split; the
  # module itself has this run's patch and image size.
  return zoo.peft_model("vit_base_4", module, variables, num_classes=10,
                        mode="peft", seed=args.seed)


def _images(args):
  """``--n`` CIFAR-10 train images (a seeded subset), resized if asked,
  preprocessed for the ViT; and their labels."""
  tr = data.load_dataset("cifar10-jpeg", "train")
  idx = np.sort(np.random.default_rng(args.seed).choice(len(tr.y), args.n,
                                                        replace=False))
  prep = jax.jit(zoo.preprocess_fn("vit_base_4"))
  xs = []
  for s in range(0, args.n, 500):
    xb = jnp.asarray(tr.x[idx[s:s + 500]])
    if args.image_size != xb.shape[1]:
      xb = jax.image.resize(xb.astype(jnp.float32),
                            (xb.shape[0], args.image_size, args.image_size, 3),
                            "bilinear")
      xb = jnp.clip(jnp.round(xb), 0, 255).astype(jnp.uint8)
    xs.append(np.asarray(prep(xb)))
  return np.concatenate(xs), tr.y[idx]


def _split(x, y, cls):
  f = y == cls
  return (x[~f], y[~f]), (x[f], y[f])


def _timed(fn):
  with timing.measure() as m:
    res = fn()
    jax.block_until_ready(res.params)
  return res, {"seconds": m.seconds, "compile_seconds": m.compile_seconds,
               "peak_rss_gib": peak_rss_gib(), "rss_gib": rss_gib()}


def main(argv=None):
  args = _args(argv)
  t0 = time.perf_counter()
  out = {"benchmark": "vit_base_scale", **environment(),
         "cpu_count": os.cpu_count(),
         "mesh_devices": [str(d) for d in jax.local_devices()],
         "config": vars(args) | {
             "out": str(args.out),
             "backbone": "ViT-Base (width 768, depth 12, 12 heads, MLP "
                         "3072), random initialisation; w_D = w_0",
             "peft": "prefix prompts in every block + a new head"}}

  def save():
    out["total_seconds"] = time.perf_counter() - t0
    out["peak_rss_gib"] = peak_rss_gib()
    write_json(args.out, out)

  model = _model(args)
  w = model.init_params
  p = int(ravel_pytree(w)[0].shape[0])
  x, y = _images(args)
  fwd = jax.jit(model.apply_fn).lower(w, x[:1]).compile().cost_analysis()
  fwd = fwd[0] if isinstance(fwd, (list, tuple)) else fwd
  out.update({"num_params_total": model.num_total, "num_params_peft": p,
              "tokens": (args.image_size // args.patch) ** 2 + 1,
              "forward_gflop_per_image": float(fwd["flops"]) / 1e9,
              "n": int(len(y)), "n_forget": int((y == args.forget_class).sum())})
  print({k: out[k] for k in ("num_params_total", "num_params_peft", "tokens",
                             "forward_gflop_per_image", "n", "n_forget")},
        flush=True)

  budget = int(args.memory_budget_gib * 2**30)
  shape = solvers.ProblemShape(len(y), 10, p, 4, "mse", args.damping)
  sk = SketchedKernel(cotangents=args.cotangents, seed=args.seed)
  rows = (len(y) - out["n_forget"]) * args.cotangents + out["n_forget"] * 10
  out["solvers_that_fit"] = {
      s.name: {"bytes": s.memory_bytes(shape),
               "fits": s.memory_bytes(shape) <= budget}
      for s in (solvers.ParameterSpace(), solvers.Sketched(),
                solvers.KernelSpace())}
  out["solvers_that_fit"]["sketch_dual"] = {
      "bytes": sk._bytes(rows, p, 4), "rows": rows,
      "fits": sk._bytes(rows, p, 4) <= budget}
  out["solvers_that_fit"]["cg"] = {
      "bytes": "a few P-vectors and one block of activations", "fits": True,
      "why_not": "one JVP and one VJP over all N images per CG step"}
  print("fit:", out["solvers_that_fit"], flush=True)
  save()

  retain, forget = _split(x, y, args.forget_class)
  res, stats = _timed(lambda: unlearn(
      model.apply_fn, w, retain, forget, damping=args.damping, solver=sk,
      memory_budget=budget))
  out["full_run"] = {"solver": res.solver, **stats,
                     "relative_update_size": float(
                         np.linalg.norm(ravel_pytree(res.params)[0]
                                        - ravel_pytree(w)[0])
                         / np.linalg.norm(ravel_pytree(w)[0])),
                     "approximation": res.approximation}
  print("full run:", out["full_run"], flush=True)
  del res
  save()

  if args.subset:
    rng = np.random.default_rng(args.seed + 1)
    keep = np.sort(rng.choice(len(y), args.subset, replace=False))
    retain_s, forget_s = _split(x[keep], y[keep], args.forget_class)
    ex, stats = _timed(lambda: unlearn(
        model.apply_fn, w, retain_s, forget_s, damping=args.damping,
        solver=KernelSpace(), memory_budget=budget))
    d_ex = np.asarray(ravel_pytree(ex.params)[0] - ravel_pytree(w)[0],
                      np.float64)
    sub = {"n": int(args.subset), "n_forget": int(len(forget_s[1])),
           "exact": {"solver": ex.solver, **stats}, "sketch": {}}
    for s in args.subset_cotangents:
      for exact_grad in (False, True):
        name = f"s{s}" + ("_exact_gradient" if exact_grad else "")
        r, st = _timed(lambda: unlearn(
            model.apply_fn, w, retain_s, forget_s, damping=args.damping,
            solver=SketchedKernel(cotangents=s, seed=args.seed,
                                  exact_gradient=exact_grad),
            memory_budget=budget))
        d = np.asarray(ravel_pytree(r.params)[0] - ravel_pytree(w)[0],
                       np.float64)
        sub["sketch"][name] = {
            **st, "relative_error_of_update": float(
                np.linalg.norm(d - d_ex) / np.linalg.norm(d_ex)),
            "cosine_to_exact": float(d @ d_ex / np.linalg.norm(d)
                                     / np.linalg.norm(d_ex))}
        print(f"subset, {name}:", sub["sketch"][name], flush=True)
    out["subset"] = sub
    save()
  print(f"wrote {args.out}")


if __name__ == "__main__":
  sys.exit(main())
