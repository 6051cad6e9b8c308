"""benchmarks/flop_rate.py: the profile finds every convolution and dot of a
program (nested in jit and vmap, batched by vmap), times each alone, and the
summary and job list say what was measured."""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))
import flop_rate  # noqa: E402  pylint: disable=wrong-import-position


def _net(w, x):
  """Two convolutions (one strided) under a jit, then a dot, per sample."""
  @jax.jit
  def body(w, xi):
    h = lax.conv_general_dilated(xi[None], w["c1"], (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = lax.conv_general_dilated(jnp.tanh(h), w["c2"], (2, 2), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (h.reshape(1, -1) @ w["d"])[0]
  return jax.vmap(body, in_axes=(None, 0))(w, x)


def _params():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {"c1": jax.random.normal(k[0], (3, 3, 2, 4)),
          "c2": jax.random.normal(k[1], (3, 3, 4, 4)),
          "d": jax.random.normal(k[2], (4 * 4 * 4, 3))}


def test_kernel_eqns_finds_nested_batched_convs_and_dots():
  w, x = _params(), jnp.ones((5, 8, 8, 2))
  eqns = flop_rate.kernel_eqns(jax.make_jaxpr(_net)(w, x).jaxpr)
  found = sorted((k[0], k[1][0][0]) for k in eqns)
  # vmap batched the convolutions over the 5 samples.
  assert found == [("conv_general_dilated", (5, 8, 8, 2)),
                   ("conv_general_dilated", (5, 8, 8, 4)),
                   ("dot_general", (5, 1, 64))]
  assert all(n == 1 for n, _ in eqns.values())
  # The Jacobian's reverse passes add the transposed convolutions (one per
  # forward convolution reached, with the 3 outputs' cotangents batched).
  jac = jax.jacrev(lambda v: _net(w, v).sum(0))
  eqns = flop_rate.kernel_eqns(jax.make_jaxpr(jac)(x).jaxpr)
  convs = [k for k in eqns if k[0] == "conv_general_dilated"]
  assert len(convs) == 4
  assert sum(n for n, _ in eqns.values()) >= 6


def test_profile_times_every_kernel_and_sums_counts():
  w, x = _params(), jnp.ones((4, 8, 8, 2))
  prof = flop_rate.profile_kernels(_net, (w, x), repeats=1)
  assert len(prof["kernels"]) == 3
  assert {r["primitive"] for r in prof["kernels"]} == {"conv_general_dilated",
                                                      "dot_general"}
  assert prof["kernel_ms"] == sum(r["count"] * r["ms"]
                                  for r in prof["kernels"])
  # XLA's cost analysis counts the taps inside the image only: per spatial
  # axis, 3·8 − 2 = 22 for the 3×3 "SAME" convolution over 8 pixels, and
  # 3 + 3 + 3 + 2 = 11 for the strided one (padding only after the end).
  expect = 2 * (4 * 22 ** 2 * 2 * 4 + 4 * 11 ** 2 * 4 * 4 + 4 * 64 * 3)
  assert prof["kernel_flops"] == expect
  assert prof["kernel_rate"] > 0


def _args(**kw):
  base = dict(models=["resnet20", "vit_tiny_4"], n=128, block=32,
              block_sweep=[16, 32, 64], repeats=1, num_prompts=5, quick=False)
  return argparse.Namespace(**{**base, **kw})


def test_jobs_profile_the_main_rows_and_keep_variants_to_the_cpu():
  jobs = flop_rate.jobs(_args())
  main = [j for j in jobs if j["profile"]]
  assert [(j["model"], j["host_devices"]) for j in main] == [
      ("resnet20", 1), ("resnet20", 2), ("vit_tiny_4", 1), ("vit_tiny_4", 2)]
  res = {(j["flags"], j["block"]) for j in jobs if j["model"] == "resnet20"}
  assert res >= {(f, 32) for f in flop_rate.FLAG_VARIANTS} | {
      ("default", 16), ("default", 64)}
  vit = {j["flags"] for j in jobs if j["model"] == "vit_tiny_4"}
  assert vit == {"default", "xnnpack"}
  assert len(flop_rate.jobs(_args(quick=True))) == 2
  assert len(flop_rate.jobs(_args(), on_cpu=False)) == 2


def test_summary_fractions_against_the_row_and_the_best_matmul():
  def row(mm, jac, **extra):
    r = {"model": "m", "flags": "default", "host_devices": 1, "block": 8,
         "matmul_f32_gflops_per_s": mm}
    for name in ("forward", "jacobian", "gram"):
      r[name] = {"ms_per_image": 1.0, "gflops_per_s": jac,
                 "fraction_of_matmul": jac / mm}
    r.update(extra)
    return r

  rows = [row(100.0, 40.0),
          row(200.0, 50.0, gram={"skipped": "too big"}),
          {"model": "m", "flags": "x", "host_devices": 2, "block": 8,
           "error": "boom"}]
  s = flop_rate.summary(rows)
  assert s[0]["jacobian_fraction"] == 0.4
  assert s[0]["jacobian_fraction_of_best"] == 0.2
  assert s[1]["jacobian_fraction_of_best"] == 0.25
  assert s[1]["gram_skipped"] == "too big" and "gram_fraction" not in s[1]
  assert s[2]["error"] == "boom"
