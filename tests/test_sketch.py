"""The random-cotangent sketch of the Gram and the approximate solver on it,
against explicit Jacobians of a small MLP (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

import fastntk_jax as F
from fastntk_jax.core import kernels

C = 4


def _mlp(params, x):  # 3 -> 6 -> C
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def problem():
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    w0 = {"w1": jax.random.normal(k[0], (3, 6), jnp.float64),
          "b1": 0.1 * jax.random.normal(k[1], (6,), jnp.float64),
          "w2": jax.random.normal(k[2], (6, C), jnp.float64) / 2,
          "b2": jnp.zeros((C,), jnp.float64)}
    x = jax.random.normal(k[3], (40, 3), jnp.float64)
    y = np.arange(40) % C
    w_d = jax.tree_util.tree_map(lambda a: 1.1 * a + 0.05, w0)
    yield w0, w_d, x, y


def _rows(w, x):
  """Per-sample Jacobians (N, C, P), explicitly."""
  flat, unravel = ravel_pytree(w)
  jac = jax.jacrev(lambda f: _mlp(unravel(f), x))(flat)
  return np.asarray(jac)


def _res(logits, y):
  return logits - jax.nn.one_hot(y, C, dtype=logits.dtype)


def test_sketch_equals_its_explicit_formula_in_blocks_and_groups(problem):
  """Each group is Σ_i J_iᵀ V_i V_iᵀ J_i over its cotangent columns, scaled by
  the columns per group; the gradient is the exact Jᵀr; blocks (with
  padding) and a one-device mesh change nothing."""
  with jax.enable_x64(True):
    _, w, x, y = problem
    key = jax.random.PRNGKey(7)
    jac = _rows(w, x)
    r = np.asarray(_res(_mlp(w, x), y))
    for s in (1, 4):
      z = np.asarray(kernels.sketch_cotangents(key, 40, C, s, jnp.float64))
      g = 2 if s % 2 == 0 else 1
      h = s // g
      want = [sum(jac[i].T @ z[i][:, k * h:(k + 1) * h]
                  @ z[i][:, k * h:(k + 1) * h].T @ jac[i] for i in range(40)) / h
              for k in range(g)]
      for kw in ({}, {"block_size": 6},
                 {"mesh": Mesh(np.array(jax.local_devices()[:1]), ("data",))}):
        sk = kernels.sketched_gram(_mlp, w, x, _res, y=y, key=key,
                                   cotangents=s, return_outputs=True, **kw)
        assert sk.groups.shape[0] == g
        for k in range(g):
          np.testing.assert_allclose(sk.groups[k], want[k], rtol=1e-10,
                                     atol=1e-10)
        np.testing.assert_allclose(sk.gram, sum(want) / g, rtol=1e-10,
                                   atol=1e-10)
        np.testing.assert_allclose(
            sk.grad, np.einsum("ncp,nc->p", jac, r), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(sk.logits, _mlp(w, x), rtol=1e-12)


def test_sketch_with_weights_estimates_the_gauss_newton_matrix(problem):
  with jax.enable_x64(True):
    _, w, x, y = problem
    p = jax.nn.softmax(_mlp(w, x))
    hess = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    ell = jnp.linalg.cholesky(hess + 1e-9 * jnp.eye(C))
    key = jax.random.PRNGKey(3)
    sk = kernels.sketched_gram(_mlp, w, x, _res, y=y, key=key, cotangents=2,
                               weights=ell)
    z = np.asarray(kernels.sketch_cotangents(key, 40, C, 2, jnp.float64))
    jac, ell = _rows(w, x), np.asarray(ell)
    want = sum(jac[i].T @ ell[i] @ np.outer(z[i][:, k], z[i][:, k]) @ ell[i].T
               @ jac[i] for i in range(40) for k in range(2)) / 2
    np.testing.assert_allclose(sk.gram, want, rtol=1e-10, atol=1e-12)


def test_cotangents_are_independent_signs_of_identity_covariance():
  """E[z zᵀ] = I for each column: the sketch is unbiased. The draw of a
  sample does not depend on how many samples are drawn."""
  z = np.asarray(kernels.sketch_cotangents(jax.random.PRNGKey(0), 20000, C, 2))
  assert set(np.unique(z)) == {-1.0, 1.0}
  cov = np.einsum("ncs,nds->cd", z, z) / (20000 * 2)
  np.testing.assert_allclose(cov, np.eye(C), atol=4 / np.sqrt(40000))
  few = np.asarray(kernels.sketch_cotangents(jax.random.PRNGKey(0), 5, C, 2))
  np.testing.assert_array_equal(few, z[:5])


def _exact(problem, **kw):
  w0, w_d, x, y = problem
  return F.unlearn(_mlp, w_d, (x[8:], y[8:]), (x[:8], y[:8]), anchor=w0,
                   damping=0.5, solver="primal", **kw)


def test_sketched_update_converges_to_exact_and_estimates_its_error(problem):
  """More cotangents, smaller error; the split-half estimate is of the size
  of the actual error; the exact retain residual is the explicit one."""
  with jax.enable_x64(True):
    w0, w_d, x, y = problem
    exact = ravel_pytree(_exact(problem).params)[0]
    moved = np.linalg.norm(exact - ravel_pytree(w_d)[0])
    errs, resid, ratios = {}, {}, []
    for s in (2, 16, 128):
      per, per_r = [], []
      for seed in range(4):
        res = F.unlearn(_mlp, w_d, (x[8:], y[8:]), (x[:8], y[:8]), anchor=w0,
                        damping=0.5, solver=F.Sketched(cotangents=s, seed=seed,
                                                       check_residual=True))
        assert res.solver == "sketch"
        err = np.linalg.norm(ravel_pytree(res.params)[0] - exact) / moved
        est = res.approximation["split_half_error"]
        per.append(err)
        ratios.append(est / err)
        assert res.approximation["cotangents"] == s
        per_r.append(res.approximation["exact_retain_residual"])
      errs[s], resid[s] = np.mean(per), np.mean(per_r)
    assert errs[2] > errs[16] > errs[128]
    assert resid[2] > resid[16] > resid[128] > 0
    # A Monte-Carlo error: 1/√s (√8 ≈ 2.8 from 16 to 128 cotangents). On 32
    # samples and P = 52 it stays large; on N ≫ P it is small
    # (benchmarks/approximate_gram.py).
    assert 1.5 < errs[16] / errs[128] < 5
    # The estimate tracks the error within a small factor, on average.
    assert 0.3 < np.exp(np.mean(np.log(ratios))) < 3, ratios


def test_exact_retain_residual_is_the_explicit_residual(problem):
  with jax.enable_x64(True):
    w0, w_d, x, y = problem
    res = F.unlearn(_mlp, w_d, (x[8:], y[8:]), (x[:8], y[:8]), anchor=w0,
                    damping=0.5, solver=F.Sketched(cotangents=1,
                                                   check_residual=True))
    assert res.approximation["split_half_error"] is None  # one group only
    # The same sketch again, to get x̂_r: A_r, b_r and the retain solve.
    jac = _rows(w_d, x[8:]).reshape(-1, 6 * 3 + 6 + 6 * C + C)
    d = ravel_pytree(w0)[0] - ravel_pytree(w_d)[0]
    r = np.asarray(_res(_mlp(w_d, x[8:]), y[8:])).reshape(-1) + jac @ d
    sk = kernels.sketched_gram(_mlp, w_d, x[8:], _res, y=y[8:],
                               key=jax.random.PRNGKey(0), cotangents=1)
    b_hat = np.asarray(sk.grad) + np.asarray(sk.gram) @ d
    x_hat = -np.linalg.solve(np.asarray(sk.gram) + 0.5 * np.eye(d.size), b_hat)
    b = jac.T @ r
    want = np.linalg.norm((jac.T @ jac + 0.5 * np.eye(d.size)) @ x_hat + b)
    want /= np.linalg.norm(b)
    np.testing.assert_allclose(res.approximation["exact_retain_residual"],
                               want, rtol=1e-6)


def test_sketch_is_refused_where_it_does_not_apply(problem):
  w0, w_d, x, y = problem
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match="cotangents must be an int >= 1"):
      F.Sketched(cotangents=bad).check()
  with pytest.raises(ValueError, match="check_residual"):
    F.Sketched(check_residual=1.0).check()
  with pytest.raises(ValueError, match="loss='ce' use solver='primal'"):
    F.unlearn(_mlp, w_d, (x[8:], y[8:]), (x[:8], y[:8]), anchor=w0,
              loss="ce", solver="sketch")
  with pytest.raises(ValueError, match="exact gradient"):
    kernels.sketched_gram(_mlp, w_d, x, None, key=jax.random.PRNGKey(0),
                          cotangents=2)
  assert F.solvers.choose_solver(40, C, 58) != "sketch"
  # An exact solver reports no approximation.
  assert _exact(problem).approximation is None


# ------------------------------------------------ the sketch in kernel space
def test_sketched_rows_are_the_explicit_rows_and_give_the_sketched_gram(
    problem):
  """Sample i's rows are z_ikᵀ J_i / √s; their Gram is sketched_gram's (one
  group) from the same key; the gradient is the exact Jᵀr; blocks with
  padding and a one-device mesh change nothing."""
  with jax.enable_x64(True):
    _, w, x, y = problem
    key = jax.random.PRNGKey(3)
    jac = _rows(w, x)
    r = np.asarray(_res(_mlp(w, x), y))
    for s in (1, 3):
      z = np.asarray(kernels.sketch_cotangents(key, 40, C, s, jnp.float64))
      want = np.concatenate([z[i].T @ jac[i] for i in range(40)]) / np.sqrt(s)
      mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
      for blk, m in ((None, None), (7, None), (16, mesh)):
        sk = kernels.sketched_jacobian(_mlp, w, x, _res, y=y, key=key,
                                       cotangents=s, block_size=blk, mesh=m,
                                       return_outputs=True)
        np.testing.assert_allclose(sk.rows, want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sk.grad, np.einsum("ncp,nc->p", jac, r),
                                   rtol=1e-10)
        np.testing.assert_allclose(sk.logits, _mlp(w, x), rtol=1e-12)
        np.testing.assert_allclose(
            sk.residuals, np.concatenate([z[i].T @ r[i] for i in range(40)])
            / np.sqrt(s), rtol=1e-10, atol=1e-12)
      g = kernels.sketched_gram(_mlp, w, x, _res, y=y, key=key, cotangents=s)
      np.testing.assert_allclose(want.T @ want, g.gram, rtol=1e-9, atol=1e-12)
      # Without the exact gradient: the same rows and residuals, no grad.
      lean = kernels.sketched_jacobian(_mlp, w, x, _res, y=y, key=key,
                                       cotangents=s, block_size=7,
                                       exact_gradient=False)
      assert lean.grad is None
      np.testing.assert_allclose(lean.rows, want, rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(lean.residuals, sk.residuals, rtol=1e-10,
                                 atol=1e-12)


@pytest.mark.parametrize("cotangents", [1, 2])
def test_sketch_in_kernel_space_equals_the_parameter_space_sketch(
    problem, cotangents):
  """exact_gradient=True: the Woodbury solves give Sketched's update (same
  seed and cotangents) to rounding, with and without an anchor apart from
  the linearisation point, and the same ‖V‖."""
  with jax.enable_x64(True):
    w0, w_d, x, y = problem
    for anchor in (w0, None):
      kw = dict(anchor=anchor, damping=0.5)
      primal = F.unlearn(_mlp, w_d, (x[8:], y[8:]), (x[:8], y[:8]),
                         solver=F.Sketched(cotangents=cotangents, seed=4),
                         **kw)
      dual = F.unlearn(_mlp, w_d, (x[8:], y[8:]), (x[:8], y[:8]),
                       solver=F.SketchedKernel(cotangents=cotangents, seed=4,
                                               exact_gradient=True), **kw)
      assert dual.solver == "sketch_dual"
      a, b = ravel_pytree(dual.params)[0], ravel_pytree(primal.params)[0]
      move = np.linalg.norm(b - ravel_pytree(w_d)[0])
      assert move > 1e-3
      assert np.linalg.norm(a - b) / move < 1e-9
      np.testing.assert_allclose(dual.forget_residual_norm,
                                 primal.forget_residual_norm, rtol=1e-8)
      assert dual.approximation["rows"] == 32 * cotangents + 8 * C
      # Another seed is another sketch: a different update.
      other = F.unlearn(_mlp, w_d, (x[8:], y[8:]), (x[:8], y[:8]),
                        solver=F.SketchedKernel(cotangents=cotangents,
                                                seed=5, exact_gradient=True),
                        **kw)
      assert np.linalg.norm(ravel_pytree(other.params)[0] - a) / move > 1e-3


def test_sketch_in_kernel_space_default_is_the_retrain_on_sketched_outputs(
    problem):
  """The default: Eq. (1) in parameter space with D_r seen through the
  sketch directions only (A_r = S_rᵀS_r, b_r = S_rᵀ(ρ_r + S_r d)) and D_f
  exact, written out with explicit Jacobians; with many cotangents it
  approaches the exact update."""
  with jax.enable_x64(True):
    w0, w_d, x, y = problem
    lam, s, seed = 0.5, 3, 2
    jac_r, jac_f = _rows(w_d, x[8:]), _rows(w_d, x[:8])
    p = jac_r.shape[-1]
    z = np.asarray(kernels.sketch_cotangents(jax.random.PRNGKey(seed), 32, C,
                                             s, jnp.float64)) / np.sqrt(s)
    s_r = np.concatenate([z[i].T @ jac_r[i] for i in range(32)])
    r_r = np.asarray(_res(_mlp(w_d, x[8:]), y[8:]))
    rho = np.concatenate([z[i].T @ r_r[i] for i in range(32)])
    j_f = jac_f.reshape(-1, p)
    r_f = np.asarray(_res(_mlp(w_d, x[:8]), y[:8])).reshape(-1)
    d = np.asarray(ravel_pytree(w0)[0] - ravel_pytree(w_d)[0])
    a_r, a_f, eye = s_r.T @ s_r, j_f.T @ j_f, np.eye(p)
    x_r = -np.linalg.solve(a_r + lam * eye, s_r.T @ (rho + s_r @ d))
    want = np.linalg.solve(a_r + a_f + lam * eye,
                           j_f.T @ (j_f @ (x_r + d) + r_f))
    res = F.unlearn(_mlp, w_d, (x[8:], y[8:]), (x[:8], y[:8]), anchor=w0,
                    damping=lam, solver=F.SketchedKernel(cotangents=s,
                                                         seed=seed))
    got = ravel_pytree(res.params)[0] - ravel_pytree(w_d)[0]
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    assert res.approximation["exact_gradient"] is False
    exact = ravel_pytree(_exact(problem).params)[0] - ravel_pytree(w_d)[0]
    errs = []
    for cot in (1, 64):
      r = F.unlearn(_mlp, w_d, (x[8:], y[8:]), (x[:8], y[:8]), anchor=w0,
                    damping=lam, solver=F.SketchedKernel(cotangents=cot))
      errs.append(np.linalg.norm(ravel_pytree(r.params)[0]
                                 - ravel_pytree(w_d)[0] - exact)
                  / np.linalg.norm(exact))
    assert errs[1] < errs[0] and errs[1] < 0.3, errs


def test_sketch_in_kernel_space_is_refused_where_it_does_not_apply(problem):
  w0, w_d, x, y = problem
  data = ((x[8:], y[8:]), (x[:8], y[:8]))
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match="cotangents must be an int >= 1"):
      F.SketchedKernel(cotangents=bad).check()
  with pytest.raises(ValueError, match="exact_gradient must be True or"):
    F.SketchedKernel(exact_gradient=1).check()
  with pytest.raises(ValueError, match="needs damping > 0"):
    F.unlearn(_mlp, w_d, *data, anchor=w0, damping=0.0,
              solver="sketch_dual")
  with pytest.raises(ValueError, match="loss='ce' use solver='primal'"):
    F.unlearn(_mlp, w_d, *data, anchor=w0, loss="ce",
              solver=F.SketchedKernel())
  # R = 32·1 + 8·4 = 64 rows of P = 52 float64s and three 64² kernels: over
  # a budget of 10 kB, refused before any pass, with the numbers and the ways
  # out in the message.
  with pytest.raises(ValueError, match=r"R = N_r·s \+ N_f·C = 64 rows.*"
                     r"memory_budget=10000.*fewer cotangents"):
    F.unlearn(_mlp, w_d, *data, anchor=w0, memory_budget=10_000,
              solver=F.SketchedKernel())
  assert F.solvers.choose_solver(40, C, 58) != "sketch_dual"
