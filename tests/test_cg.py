"""Matrix-free conjugate gradients against dense solves, and the "cg" solver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastntk_jax as F
from fastntk_jax.core import cg


def _spd(seed, n, rank):
  rng = np.random.default_rng(seed)
  j = rng.normal(size=(rank, n))
  return j.T @ j, rng


@pytest.mark.parametrize("lam", [1e-2, 1.0])
def test_cg_matches_dense_solve(lam):
  with jax.enable_x64(True):
    a, rng = _spd(0, 30, 50)
    b = rng.normal(size=30)
    x, info = cg.cg_solve(lambda v: jnp.asarray(a) @ v, jnp.asarray(b),
                          damping=lam, tol=1e-12)
    ref = np.linalg.solve(a + lam * np.eye(30), b)
    np.testing.assert_allclose(x, ref, rtol=1e-8, atol=1e-10)
    assert info.ok and info.status == "converged"
    assert info.relative_residual < 1e-10
    assert 0 < info.steps <= 60


def test_cg_zero_damping_gives_min_norm_solution_on_the_range():
  with jax.enable_x64(True):
    a, rng = _spd(1, 20, 6)  # rank 6
    u = rng.normal(size=20)
    b = a @ u  # consistent, in the range of A
    x, info = cg.cg_solve(lambda v: jnp.asarray(a) @ v, jnp.asarray(b),
                          damping=0.0, tol=1e-12)
    np.testing.assert_allclose(x, np.linalg.pinv(a) @ b, atol=1e-8)
    assert info.ok


def test_cg_reports_max_steps_and_breakdown():
  a, rng = _spd(2, 40, 80)
  a = a * np.logspace(0, 6, 40)[:, None] * np.logspace(0, 6, 40)[None, :]
  b = jnp.asarray(rng.normal(size=40))
  x, info = cg.cg_solve(lambda v: jnp.asarray(a) @ v, b, tol=1e-12,
                        max_steps=3)
  assert not info.ok and info.status == "max_steps_reached" and info.steps == 3
  neg = -np.eye(5)
  _, info = cg.cg_solve(lambda v: jnp.asarray(neg) @ v, jnp.ones(5), tol=1e-6)
  assert not info.ok and info.status == "breakdown"
  with pytest.raises(ValueError, match="tol"):
    cg.cg_solve(lambda v: v, jnp.ones(3), tol=0.0)


def _mlp(seed, d=4, h=6, c=3):
  rng = np.random.default_rng(seed)
  w1 = jnp.asarray(rng.normal(size=(d, h)) / 2)

  def apply_fn(params, x):
    return jnp.tanh(x @ (w1 * params["s"])) @ params["w"] + params["b"]

  params = {"s": jnp.ones((h,)), "w": jnp.asarray(rng.normal(size=(h, c))),
            "b": jnp.zeros((c,))}
  return apply_fn, params, rng


def test_gauss_newton_matvec_is_jtj_v_with_padding():
  with jax.enable_x64(True):
    apply_fn, params, rng = _mlp(0)
    x = jnp.asarray(rng.normal(size=(11, 4)))
    jac = F.kernels.jacobian(apply_fn, params, x)
    v = jnp.asarray(rng.normal(size=jac.shape[1]))
    for block in (None, 4):  # 11 = 4 + 4 + 3: the last block is padded
      mv = cg.gauss_newton_matvec(apply_fn, params, x, block_size=block)
      np.testing.assert_allclose(mv(v), jac.T @ (jac @ v), rtol=1e-10)


@pytest.mark.parametrize("lam", [0.1, 3.0])
def test_cg_solver_agrees_with_dense_solvers(lam):
  with jax.enable_x64(True):
    apply_fn, w0, rng = _mlp(1)
    x = jnp.asarray(rng.normal(size=(16, 4)))
    y = rng.integers(0, 3, 16)
    w_d = jax.tree_util.tree_map(lambda a: a + 0.1, w0)
    out = {s: F.unlearn(apply_fn, w_d, (x[4:], y[4:]), (x[:4], y[:4]),
                        anchor=w0, linearize_at="w_0", damping=lam, solver=F.MatrixFree(cg_tol=1e-12) if s == "cg" else s,
                        block_size=5)
           for s in ("dual", "primal", "cg")}
    ref = jax.flatten_util.ravel_pytree(out["dual"].params)[0]
    moved = float(jnp.linalg.norm(ref - jax.flatten_util.ravel_pytree(w_d)[0]))
    assert moved > 1e-2
    for s in ("primal", "cg"):
      got = jax.flatten_util.ravel_pytree(out[s].params)[0]
      np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-9 * moved)
      np.testing.assert_allclose(out[s].forget_residual_norm,
                                 out["dual"].forget_residual_norm, rtol=1e-8)
    assert out["cg"].solver == "cg" and out["cg"].cg_steps > 0
    assert out["primal"].cg_steps == 0


def test_cg_solver_raises_when_it_does_not_converge():
  apply_fn, w0, rng = _mlp(2)
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = rng.integers(0, 3, 16)
  with pytest.raises(F.UnlearningError, match="cg_max_steps"):
    F.unlearn(apply_fn, w0, (x[4:], y[4:]), (x[:4], y[:4]), damping=1e-4,
              solver=F.MatrixFree(cg_tol=1e-9, cg_max_steps=2))
  with pytest.raises(ValueError, match="cg_tol"):
    F.unlearn(apply_fn, w0, (x[4:], y[4:]), (x[:4], y[:4]), solver=F.MatrixFree(cg_tol=2.0))


def test_auto_runs_cg_when_no_dense_form_fits():
  apply_fn, w0, rng = _mlp(3)
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = rng.integers(0, 3, 16)
  res = F.unlearn(apply_fn, w0, (x[4:], y[4:]), (x[:4], y[:4]), damping=1.0,
                  memory_budget=1000)
  assert res.solver == "cg"
  dense = F.unlearn(apply_fn, w0, (x[4:], y[4:]), (x[:4], y[:4]), damping=1.0)
  assert dense.solver in ("dual", "primal")
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(res.params)[0],
                             jax.flatten_util.ravel_pytree(dense.params)[0],
                             rtol=1e-4, atol=1e-5)
