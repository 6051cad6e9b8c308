"""Kernels sharded over several host devices, against one-device references.

JAX fixes its device count when it initialises, so the checks on four CPU
devices run in a child Python process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; it prints JSON that
the tests here assert on.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh


from fastntk_jax.core import kernels

_CHILD = textwrap.dedent("""
    import json

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from fastntk_jax.core import blocking
    from fastntk_jax.core import kernels

    def apply_fn(params, x):  # 2-layer MLP, 5 -> 7 -> 3
      h = jnp.tanh(x @ params["w1"] + params["b1"])
      return h @ params["w2"] + params["b2"]

    k = jax.random.split(jax.random.PRNGKey(0), 6)
    params = {"w1": jax.random.normal(k[0], (5, 7)),
              "b1": 0.1 * jax.random.normal(k[1], (7,)),
              "w2": jax.random.normal(k[2], (7, 3)),
              "b2": jnp.zeros((3,))}
    x1 = jax.random.normal(k[3], (10, 5))  # 10 samples: not a multiple of 4
    x2 = jax.random.normal(k[4], (7, 5))
    r = jax.random.normal(k[5], (10, 3))
    t = np.arange(10) % 3

    def res_fn(logits, tb):  # residuals from the logits of the same pass
      return logits - jax.nn.one_hot(tb, 3, dtype=logits.dtype)

    flat, unravel = ravel_pytree(params)
    v = jnp.linspace(-1.0, 1.0, flat.shape[0])

    # One-device references: whole-batch jacrev, no blocks, no sharding.
    def jac(x):
      return jax.jacrev(lambda f: apply_fn(unravel(f), x).reshape(-1))(flat)
    j1, j2 = np.asarray(jac(x1)), np.asarray(jac(x2))
    ref = {"ntk11": j1 @ j1.T, "ntk12": j1 @ j2.T, "jacobian": j1,
           "ntk11_nt": j1 @ j1.T, "ntk12_nt": j1 @ j2.T,
           "gram_a": j1.T @ j1, "gram_b": j1.T @ np.asarray(r).reshape(-1),
           "jvp": (j1 @ np.asarray(v)).reshape(10, 3),
           "vjp": j1.T @ np.asarray(r).reshape(-1),
           "predict": np.asarray(apply_fn(params, x1))}
    ref["gram_fn_a"] = ref["gram_a"]
    ref["gram_fn_b"] = j1.T @ (ref["predict"] - np.eye(3)[t]).reshape(-1)
    ref["gram_fn_logits"] = ref["predict"]

    def devices(a):
      return len(a.sharding.device_set)

    def spec(a):
      s = a.sharding
      return list(s.spec) if isinstance(s, NamedSharding) else None

    def run(mesh, block_size):
      kw = dict(block_size=block_size, mesh=mesh)
      a, b = kernels.gram(apply_fn, params, x1, r, **kw)
      a0, b0 = kernels.gram(apply_fn, params, x1, **kw)
      g = kernels.vjp(apply_fn, params, x1, r, **kw)
      fa, fb, fl = kernels.gram(apply_fn, params, x1, res_fn, y=t,
                                return_outputs=True, solve_dtype="float64", **kw)
      got = {
          "gram_fn_a": fa, "gram_fn_b": fb, "gram_fn_logits": fl,
          "ntk11": kernels.ntk(apply_fn, params, x1, **kw),
          "ntk12": kernels.ntk(apply_fn, params, x1, x2, **kw),
          "ntk11_nt": kernels.ntk(apply_fn, params, x1, reuse_jacobians=False,
                                  **kw),
          "ntk12_nt": kernels.ntk(apply_fn, params, x1, x2,
                                  reuse_jacobians=False, **kw),
          "jacobian": kernels.jacobian(apply_fn, params, x1, **kw),
          "gram_a": a, "gram_b": b,
          "jvp": kernels.jvp(apply_fn, params, x1, unravel(v), **kw),
          "vjp": ravel_pytree(g)[0],
          "predict": kernels.predict(apply_fn, params, x1,
                                     block_size=block_size or 256, mesh=mesh),
      }
      close = {name: bool(np.allclose(
          np.asarray(got[name]), ref[name], rtol=1e-5,
          atol=1e-6 * float(np.abs(ref[name]).max()))) for name in ref}
      blocks = list(kernels._jac_blocks(apply_fn, params, x1, block_size,
                                        mesh=mesh))
      first = blocks[0][2]
      padded = next(kernels._padded_jac_blocks(
          apply_fn, params, x1, block_size, blocking.resolve_mesh(mesh)))[2]
      return {
          "close": close,
          "gram_without_r": bool(b0 is None and np.allclose(
              np.asarray(a0), np.asarray(a), rtol=1e-6)),
          "block_rows": [int(blk.shape[0]) for _, _, blk in blocks],
          "block_devices": devices(first), "block_spec": spec(first),
          "padded_devices": devices(padded), "padded_spec": spec(padded),
          "gram_devices": devices(a), "gram_spec": spec(a),
          "vjp_devices": devices(jax.tree_util.tree_leaves(g)[0]),
      }

    mesh = kernels.default_mesh()
    out = {"n_devices": jax.local_device_count(),
           "default_axes": list(mesh.axis_names), "default_size": mesh.size,
           "default": {str(bs): run(None, bs) for bs in (4, None)},
           "two": run(Mesh(np.array(jax.local_devices()[:2]), ("data",)), 3)}

    # The neural-tangents block function itself, on a block split over rows.
    fn = kernels.ntk_block_fn(apply_fn, 1)
    rows, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    kb = fn(jax.device_put(x1[:8], rows), jax.device_put(x1[:8], whole),
            jax.device_put(params, whole))
    out["ntk_block_spec"] = spec(kb)
    out["ntk_block_devices"] = devices(kb)

    # The Gram pass: per-device terms, no collective inside a block.
    gfn = kernels._gram_block_fn(apply_fn, res_fn, mesh)
    args = (jax.device_put(params, whole), jax.device_put(x1[:8], rows),
            jax.device_put(t[:8], rows), jax.device_put(np.ones(8), rows))
    _, g_a, g_b = gfn(*args)
    hlo = gfn.lower(*args).compile().as_text()
    out["gram_block"] = {"shape": list(g_a.shape), "spec": spec(g_a),
                         "devices": devices(g_a),
                         "collectives": [op for op in ("all-reduce",
                                         "all-gather", "reduce-scatter",
                                         "all-to-all") if op in hlo]}

    # unlearn() (every solver), deletion requests and the CG operator on four
    # devices against the same calls on a one-device mesh.
    import fastntk_jax as F
    from fastntk_jax.core import cg
    from fastntk_jax.core import deletion
    one = Mesh(np.array(jax.local_devices()[:1]), ("data",))
    y = np.arange(10) % 3
    w_d = jax.tree_util.tree_map(lambda a: a * 1.05 + 0.01, params)
    def rel(a, b):
      a = np.asarray(ravel_pytree(jax.device_get(a))[0], np.float64)
      b = np.asarray(ravel_pytree(jax.device_get(b))[0], np.float64)
      return float(np.linalg.norm(a - b) / np.linalg.norm(b))
    out["unlearn_rel"], out["unlearn_moved"] = {}, {}
    # Each solver once, both losses among them, to keep this child short;
    # the solvers and losses are checked against references on one device in
    # test_unlearn.py, test_newton.py and test_cg.py.
    for loss, solver in (("mse", "dual"), ("ce", "primal"), ("ce", "cg")):
      kw = dict(anchor=params, damping=0.5, block_size=4, loss=loss,
                solver=(F.MatrixFree(cg_tol=1e-6) if solver == "cg"
                        else solver))
      got = F.unlearn(apply_fn, w_d, (x1[3:], y[3:]), (x1[:3], y[:3]), **kw)
      ref1 = F.unlearn(apply_fn, w_d, (x1[3:], y[3:]), (x1[:3], y[:3]),
                       mesh=one, **kw)
      out["unlearn_rel"][f"{loss}-{solver}"] = rel(got.params, ref1.params)
      out["unlearn_moved"][f"{loss}-{solver}"] = rel(w_d, ref1.params)
    st = deletion.prepare(apply_fn, w_d, (x1, y), anchor=params,
                          block_size=4)
    st1 = deletion.prepare(apply_fn, w_d, (x1, y), anchor=params,
                           block_size=4, mesh=one)
    d4 = deletion.forget(st, apply_fn, w_d, (x1[:3], y[:3]), block_size=4)
    d1 = deletion.forget(st1, apply_fn, w_d, (x1[:3], y[:3]), block_size=4,
                         mesh=one)
    out["deletion_rel"] = rel(d4.params, d1.params)
    sk4 = kernels.sketched_gram(apply_fn, params, x1, res_fn, y=t,
                                key=jax.random.PRNGKey(1), cotangents=2,
                                block_size=4)
    sk1 = kernels.sketched_gram(apply_fn, params, x1, res_fn, y=t,
                                key=jax.random.PRNGKey(1), cotangents=2,
                                block_size=4, mesh=one)
    out["sketch_close"] = bool(
        np.allclose(np.asarray(sk4.groups), np.asarray(sk1.groups),
                    rtol=1e-5, atol=1e-6 * float(np.abs(sk1.gram).max()))
        and np.allclose(np.asarray(sk4.grad), np.asarray(sk1.grad),
                        rtol=1e-5, atol=1e-6))
    out["sketch_devices"] = devices(sk4.gram)
    out["deletion_gram_devices"] = devices(st.gram)
    out["deletion_request_devices"] = [devices(a) for a in (
        d4.state.gram, d4.state.chol, d4.state.grad)]
    mv = cg.gauss_newton_matvec(apply_fn, params, x1, block_size=4)(v)
    out["cg_matvec_close"] = bool(np.allclose(
        np.asarray(mv), ref["gram_a"] @ np.asarray(v), rtol=1e-5,
        atol=1e-6 * float(np.abs(ref["gram_a"] @ np.asarray(v)).max())))

    try:
      kernels.gram(apply_fn, params, x1,
                   mesh=Mesh(np.array(jax.local_devices()).reshape(2, 2),
                             ("data", "model")))
      out["two_axes_error"] = None
    except ValueError as e:
      out["two_axes_error"] = str(e)
    print(json.dumps(out))
""")


def _child_json(script: str, devices: int) -> dict:
  """Runs ``script`` in a Python with ``devices`` host CPU devices; returns
  the JSON on its last line of output."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(os.environ.get("XLA_FLAGS", "").split() + [
                 f"--xla_force_host_platform_device_count={devices}"]))
  proc = subprocess.run([sys.executable, "-c", script], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def four_devices():
  return _child_json(_CHILD, 4)


def test_default_mesh_is_all_local_devices(four_devices):
  assert four_devices["n_devices"] == 4
  assert four_devices["default_axes"] == ["data"]
  assert four_devices["default_size"] == 4


@pytest.mark.parametrize("block_size", ["4", "None"])
def test_sharded_kernels_match_one_device_reference(four_devices, block_size):
  got = four_devices["default"][block_size]
  assert got["close"] == {name: True for name in got["close"]}, got["close"]
  assert got["gram_without_r"]


def test_work_is_sharded_over_four_devices(four_devices):
  got = four_devices["default"]["4"]
  # 10 samples, blocks of 4 (4 + 4 + 2): full blocks stay split over rows.
  assert got["block_rows"] == [12, 12, 6]
  assert got["block_devices"] == 4 and got["block_spec"] == ["data"]
  # JᵀJ over a row-split J: reduced by XLA, replicated on every device.
  assert got["gram_devices"] == 4 and got["gram_spec"] == []
  assert got["vjp_devices"] == 4
  # Automatic blocks: all 10 samples fit, padded to 12 = 3 per device.
  auto = four_devices["default"]["None"]
  assert auto["block_rows"] == [30]
  assert auto["padded_devices"] == 4 and auto["padded_spec"] == ["data"]
  assert four_devices["ntk_block_devices"] == 4
  assert four_devices["ntk_block_spec"][0] == "data"


def test_gram_pass_keeps_one_partial_sum_per_device(four_devices):
  """Each device contracts its own rows of a block: the block's JᵀJ terms come
  out as (devices, P, P) split along the devices, and the compiled block pass
  holds no collective (the sums are reduced once, after the last block)."""
  got = four_devices["gram_block"]
  assert got["shape"] == [4, 5 * 7 + 7 + 7 * 3 + 3, 5 * 7 + 7 + 7 * 3 + 3]
  assert got["spec"][0] == "data" and got["devices"] == 4
  assert got["collectives"] == []


def test_explicit_two_device_mesh(four_devices):
  got = four_devices["two"]
  assert got["close"] == {name: True for name in got["close"]}, got["close"]
  # block_size 3 is rounded up to 4, two samples per device.
  assert got["block_rows"] == [12, 12, 6]
  assert got["block_devices"] == 2 and got["block_spec"] == ["data"]
  assert got["gram_devices"] == 2


def test_unlearn_deletion_and_sketch_on_four_devices(four_devices):
  for solver, gap in four_devices["unlearn_rel"].items():
    assert four_devices["unlearn_moved"][solver] > 1e-2
    assert gap < (1e-4 if solver == "cg" else 1e-5), (solver, gap)
  assert four_devices["deletion_rel"] < 1e-5
  assert four_devices["sketch_close"] and four_devices["sketch_devices"] == 4
  # The P×P state and its algebra live on one device: replicated, every
  # device of a host mesh would repeat the factorisation on the same cores.
  assert four_devices["deletion_gram_devices"] == 1
  assert four_devices["deletion_request_devices"] == [1, 1, 1]
  assert four_devices["cg_matvec_close"]


def test_two_axis_mesh_is_rejected(four_devices):
  assert "mesh" in four_devices["two_axes_error"]


def _tiny():
  params = {"w": np.ones((3, 2), np.float32)}
  return (lambda p, x: x @ p["w"]), params, np.ones((4, 3), np.float32)


@pytest.mark.parametrize("fn_name", ["ntk", "jacobian", "gram", "predict"])
def test_mesh_that_is_not_a_mesh_raises(fn_name):
  apply_fn, params, x = _tiny()
  with pytest.raises(TypeError, match="mesh"):
    getattr(kernels, fn_name)(apply_fn, params, x, mesh="data")


def test_mesh_with_another_axis_name_raises():
  apply_fn, params, x = _tiny()
  bad = Mesh(np.array(jax.local_devices()[:1]), ("batch",))
  with pytest.raises(ValueError, match="mesh"):
    kernels.jvp(apply_fn, params, x, params, mesh=bad)
  with pytest.raises(ValueError, match="mesh"):
    kernels.vjp(apply_fn, params, x, np.ones((4, 2), np.float32), mesh=bad)


def test_one_device_mesh_matches_no_mesh():
  apply_fn, params, x = _tiny()
  if jax.local_device_count() == 1:
    assert kernels.default_mesh() is None  # nothing changes on one device
  one = Mesh(np.array(jax.local_devices()[:1]), ("data",))
  np.testing.assert_array_equal(
      kernels.jacobian(apply_fn, params, x, mesh=one),
      kernels.jacobian(apply_fn, params, x))


def test_request_host_devices_refuses_once_jax_has_started():
  """In this process JAX already runs with one CPU device: the request for
  another number must fail with the fix, and the current number succeeds."""
  from fastntk_jax.io.environment import request_host_devices
  before = os.environ.get("XLA_FLAGS")
  try:
    n = len(jax.devices("cpu"))
    assert request_host_devices(n) == n
    with pytest.raises(RuntimeError, match="before any JAX computation"):
      request_host_devices(n + 1)
    with pytest.raises(ValueError, match=">= 1"):
      request_host_devices(0)
  finally:
    if before is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = before


_STORE_CHILD = textwrap.dedent("""
    import json, sys, tempfile
    import jax
    import jax.numpy as jnp
    import numpy as np
    from fastntk_jax.store import DeletionStore

    def apply_fn(p, x):
      return jnp.tanh(x @ p["w1"]) @ p["w2"]

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    p = {"w1": 0.5 * jax.random.normal(k[0], (6, 8)),
         "w2": 0.5 * jax.random.normal(k[1], (8, 3))}
    x = np.asarray(jax.random.normal(k[2], (40, 6)), np.float32)
    y, ids = np.arange(40) % 3, np.arange(40)
    seen = []

    def listen(event, seconds, **kw):
      if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
        seen.append(event)

    out = {"devices": jax.local_device_count()}
    for name, kw in (("mse-rows", {"keep_rows": True}), ("ce", {"loss": "ce"})):
      with tempfile.TemporaryDirectory() as d:
        with DeletionStore.init(d + "/s", apply_fn, p, (x, y), ids=ids,
                                damping=0.5, **kw) as s:
          jax.monitoring.register_event_duration_secs_listener(listen)
          seen.clear()
          s.forget(apply_fn, (x[[3, 7]], y[[3, 7]]), ids=np.array([3, 7]),
                   refresh="off")
          jax.monitoring.unregister_event_duration_listener(listen)
          out[name] = len(seen)
    print(json.dumps(out))
""")


def test_the_first_request_after_init_compiles_nothing_on_two_devices():
  """init warms up on the state as it reads it back (on one device), not on
  prepare's sharded arrays, whose programs a later request never runs."""
  got = _child_json(_STORE_CHILD, 2)
  assert got == {"devices": 2, "mse-rows": 0, "ce": 0}
