"""Newton solvers of the linearised problem against an independent minimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.optimize import minimize

from fastntk_jax.core import kernels

from fastntk_jax.core import newton

from fastntk_jax.core import objective

from fastntk_jax.core import update


def _model(seed=0, n=24, d=5, h=6, c=4):
  rng = np.random.default_rng(seed)

  def apply_fn(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"] + p["b"]

  params = {"w": jnp.asarray(rng.normal(size=(d, h))),
            "v": jnp.asarray(rng.normal(size=(h, c))),
            "b": jnp.zeros(c)}
  x = jnp.asarray(rng.normal(size=(n, d)))
  y = rng.integers(0, c, n)
  return apply_fn, params, x, y


def _reference(jac, b, y, loss, lam):
  """Φ written out with the explicit Jacobian, minimised by BFGS (jax.scipy)
  and polished by Newton steps with JAX's own Hessian of Φ (jax.hessian):
  nothing here uses the library's curvature, line search or solvers."""
  n, c = b.shape

  def phi(x):
    z = b + (jac @ x).reshape(n, c)
    return jnp.sum(loss.value(z, jnp.asarray(y))) + 0.5 * lam * x @ x

  x = minimize(phi, jnp.zeros(jac.shape[1]), method="BFGS", tol=1e-14).x
  grad, hess = jax.jit(jax.grad(phi)), jax.jit(jax.hessian(phi))
  for _ in range(5):
    x = x - jnp.linalg.solve(hess(x), grad(x))
  assert float(jnp.linalg.norm(grad(x))) < 1e-8
  return x


@pytest.mark.parametrize("name", ["ce", "mse"])
def test_every_form_reaches_the_minimiser(name):
  with jax.enable_x64(True):
    apply_fn, params, x, y = _model()
    loss = objective.LOSSES[name]
    jac = kernels.jacobian(apply_fn, params, x)
    f = apply_fn(params, x)
    rng = np.random.default_rng(11)
    b = f + jnp.asarray(rng.normal(size=f.shape))  # offsets of the anchor
    lam = 0.7
    ref = _reference(jac, b, y, loss, lam)
    dense = newton.DenseJacobian(jac, 4)
    passes = newton.PassJacobian(apply_fn, params, x, block_size=7)
    got = {
        "primal-dense": newton.solve_primal(dense, b, y, loss, lam),
        "primal-pass": newton.solve_primal(passes, b, y, loss, lam),
        "cg-dense": newton.solve_newton_cg(dense, b, y, loss, lam),
        "cg-pass": newton.solve_newton_cg(passes, b, y, loss, lam),
    }
    beta, rep = newton.solve_dual(jac @ jac.T, b, y, loss, lam)
    got["dual"] = (jac.T @ beta, rep)
    scale = float(jnp.linalg.norm(ref))
    assert scale > 0.1
    for key, (sol, rep) in got.items():
      assert rep.converged and rep.status == "converged", (key, rep)
      assert rep.grad_norm <= 1e-9
      assert float(jnp.linalg.norm(sol - ref)) < 1e-7 * scale, key
    # Squared error is quadratic: one Newton step for the direct forms.
    if name == "mse":
      assert got["primal-dense"][1].iterations == 1
      assert got["dual"][1].iterations == 1
    else:
      assert got["primal-dense"][1].iterations > 2
    assert got["cg-dense"][1].cg_steps > 0
    assert got["primal-dense"][1].cg_steps == 0


def test_squared_error_newton_step_is_the_ridge_retrain_of_eq1():
  with jax.enable_x64(True):
    apply_fn, params, x, y = _model(1)
    jac = kernels.jacobian(apply_fn, params, x)
    f = apply_fn(params, x)
    r = (f - jax.nn.one_hot(y, 4)).reshape(-1)
    want = update.parameter_space(jac.T @ jac, jnp.zeros((jac.shape[1],) * 2),
                                  jac.T @ r, jnp.zeros(jac.shape[1]),
                                  0.4).x_retrain
    sol, _ = newton.solve_primal(newton.DenseJacobian(jac, 4), f, y,
                                 objective.squared_error, 0.4)
    np.testing.assert_allclose(sol, want, rtol=1e-10)


def test_zero_weights_drop_samples_and_warm_starts_agree():
  with jax.enable_x64(True):
    apply_fn, params, x, y = _model(2)
    loss = objective.cross_entropy
    jac = kernels.jacobian(apply_fn, params, x)
    b = apply_fn(params, x)
    keep = np.arange(len(y)) % 3 != 0
    sub = newton.DenseJacobian(jac.reshape(len(y), 4, -1)[keep].reshape(
        -1, jac.shape[1]), 4)
    want, _ = newton.solve_primal(sub, b[keep], y[keep], loss, 0.5)
    op = newton.DenseJacobian(jac, 4)
    x_d, _ = newton.solve_primal(op, b, y, loss, 0.5)
    got, rep = newton.solve_primal(op, b, y, loss, 0.5, weights=keep, x0=x_d)
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert float(jnp.linalg.norm(x_d - want)) > 1e-2  # the start was elsewhere
    beta, _ = newton.solve_dual(jac @ jac.T, b, y, loss, 0.5)
    k = np.repeat(keep, 4)
    beta_r, _ = newton.solve_dual((jac @ jac.T)[k][:, k], b[keep], y[keep],
                                  loss, 0.5, beta0=beta[k])
    np.testing.assert_allclose(jac[k].T @ beta_r, want, atol=1e-8)


def test_preconditioned_newton_cg_needs_fewer_steps():
  with jax.enable_x64(True):
    apply_fn, params, x, y = _model(3, n=40)
    loss = objective.cross_entropy
    jac = kernels.jacobian(apply_fn, params, x)
    b = apply_fn(params, x)
    op = newton.DenseJacobian(jac, 4)
    plain, rep0 = newton.solve_newton_cg(op, b, y, loss, 0.05)
    ggn = op.ggn(loss.hess_factor(b), jnp.float64) + 0.05 * jnp.eye(op.p)
    chol = jnp.linalg.cholesky(ggn)
    prec = lambda r: jax.scipy.linalg.cho_solve((chol, True), r)
    pre, rep1 = newton.solve_newton_cg(op, b, y, loss, 0.05,
                                       preconditioner=prec)
    np.testing.assert_allclose(pre, plain, atol=1e-8)
    assert rep1.converged and rep0.converged
    assert rep1.cg_steps < rep0.cg_steps


def test_non_convergence_is_a_status_not_an_answer():
  with jax.enable_x64(True):
    apply_fn, params, x, y = _model(4)
    op = newton.DenseJacobian(kernels.jacobian(apply_fn, params, x), 4)
    b = 5 * apply_fn(params, x)
    _, rep = newton.solve_primal(op, b, y, objective.cross_entropy, 0.1,
                                 max_iter=1)
    assert not rep.converged and rep.status == "max_iterations"
    assert rep.iterations == 1 and rep.grad_norm > 1e-9
    _, rep = newton.solve_dual(op.jac @ op.jac.T, b, y,
                               objective.cross_entropy, 0.1, max_iter=1)
    assert not rep.converged and rep.status == "max_iterations"


def test_float32_passes_and_float32_solves_stop_at_their_own_tolerance():
  apply_fn, params, x, y = _model(5)
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
  x = x.astype(jnp.float32)
  ce = objective.cross_entropy
  b = apply_fn(params, x)
  op = newton.PassJacobian(apply_fn, params, x)
  assert not op.exact and newton.default_tol(op.exact) == 1e-5
  sol, rep = newton.solve_newton_cg(op, b, y, ce, 1.0)  # float64 solve
  assert rep.converged and rep.grad_norm <= 1e-5
  assert sol.dtype == jnp.float64
  # Kept float32 rows in a float32 solve: the 1e-5 default, reached.
  jac = kernels.jacobian(apply_fn, params, x)
  dense = newton.DenseJacobian(jac, 4)
  s32, r32 = newton.solve_primal(dense, b, y, ce, 1.0, solve_dtype="float32")
  assert r32.converged and 1e-9 < 1e-5 and r32.grad_norm <= 1e-5
  assert s32.dtype == jnp.float32
  beta, rd = newton.solve_dual(jac @ jac.T, b, y, ce, 1.0, solve_dtype="float32")
  assert rd.converged
  with jax.enable_x64(True):
    s64, r64 = newton.solve_primal(newton.DenseJacobian(jac, 4, jnp.float64),
                                   b, y, ce, 1.0)
    assert r64.converged and r64.grad_norm <= 1e-9
    err = float(jnp.linalg.norm(s32.astype(jnp.float64) - s64)
                / jnp.linalg.norm(s64))
  assert err < 1e-4


def test_bad_problems_are_refused():
  with jax.enable_x64(True):
    apply_fn, params, x, y = _model(6)
    op = newton.DenseJacobian(kernels.jacobian(apply_fn, params, x), 4)
    b = apply_fn(params, x)
    ce = objective.cross_entropy
    with pytest.raises(ValueError, match="b must have shape"):
      newton.solve_primal(op, b[:3], y, ce, 1.0)
    with pytest.raises(ValueError, match="damping must be a finite float > 0"):
      newton.solve_primal(op, b, y, ce, 0.0)
    with pytest.raises(ValueError, match="weights must have shape"):
      newton.solve_primal(op, b, y, ce, 1.0, weights=np.ones(3))
    with pytest.raises(ValueError, match="x0 must have shape"):
      newton.solve_newton_cg(op, b, y, ce, 1.0, x0=np.ones(2))
    with pytest.raises(ValueError, match="theta must have shape"):
      newton.solve_dual(jnp.eye(5), b, y, ce, 1.0)
    with pytest.raises(ValueError, match="solve_dtype"):
      newton.solve_primal(op, b, y, ce, 1.0, solve_dtype="float16")
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
      newton.solve_primal(op, b, y, ce, 1.0, weights=-np.ones(len(y)))
    with pytest.raises(ValueError, match="beta0 must have shape"):
      newton.solve_dual(op.jac @ op.jac.T, b, y, ce, 1.0, beta0=np.ones(3))
    # NumPy scalars are accepted as λ.
    newton.solve_primal(op, b, y, ce, np.float32(1.0), max_iter=1)


def test_frozen_hessian_iteration_converges_or_says_it_did_not():
  with jax.enable_x64(True):
    apply_fn, params, x, y = _model(7, n=40)
    loss = objective.cross_entropy
    jac = kernels.jacobian(apply_fn, params, x)
    b = apply_fn(params, x)
    op = newton.DenseJacobian(jac, 4)
    keep = np.arange(40) != 3  # a request of one sample
    x_d, _ = newton.solve_primal(op, b, y, loss, 0.5)
    want, _ = newton.solve_primal(op, b, y, loss, 0.5, weights=keep, x0=x_d)
    z = b + op.matvec(x_d)
    m = (op.ggn(loss.hess_factor(z) * jnp.asarray(keep, float)[:, None, None],
                jnp.float64) + 0.5 * jnp.eye(op.p))
    chol = jnp.linalg.cholesky(m)
    prec = lambda r: jax.scipy.linalg.cho_solve((chol, True), r)
    got, rep = newton.solve_preconditioned(op, b, y, loss, 0.5, weights=keep,
                                           x0=x_d, preconditioner=prec)
    assert rep.converged and rep.iterations <= 20 and rep.cg_steps == 0
    np.testing.assert_allclose(got, want, atol=1e-9)
    # A poor M: no false success within a few steps.
    _, bad = newton.solve_preconditioned(op, b, y, loss, 0.5, weights=keep,
                                         x0=jnp.zeros(op.p), max_iter=3,
                                         preconditioner=lambda r: r / 1e3)
    assert not bad.converged and bad.status == "max_iterations"


def test_lbfgs_pairs_correct_a_stale_preconditioner():
  """memory > 0: L-BFGS with M⁻¹ as its initial inverse Hessian reaches the
  same minimiser as the frozen-M iteration, in fewer steps when M is stale
  (formed at the start point with every sample, before 8 were dropped)."""
  with jax.enable_x64(True):
    apply_fn, params, x, y = _model(7, n=40)
    loss = objective.cross_entropy
    jac = kernels.jacobian(apply_fn, params, x)
    b = apply_fn(params, x) * 3.0
    op = newton.DenseJacobian(jac, 4)
    keep = np.arange(40) >= 8
    x_d, _ = newton.solve_primal(op, b, y, loss, 0.5)
    want, _ = newton.solve_primal(op, b, y, loss, 0.5, weights=keep, x0=x_d)
    m = op.ggn(loss.hess_factor(b + op.matvec(x_d)), jnp.float64) + (
        0.5 * jnp.eye(op.p))
    chol = jnp.linalg.cholesky(m)
    prec = lambda r: jax.scipy.linalg.cho_solve((chol, True), r)
    close = lambda a, w: float(jnp.linalg.norm(a - w)) <= 1e-7 * float(
        jnp.linalg.norm(w))
    kw = dict(weights=keep, x0=x_d, preconditioner=prec, max_iter=200)
    chord, rep0 = newton.solve_preconditioned(op, b, y, loss, 0.5, **kw)
    lbfgs, rep1 = newton.solve_preconditioned(op, b, y, loss, 0.5, memory=8,
                                              **kw)
    assert rep0.converged and rep1.converged
    assert close(lbfgs, want)
    assert close(chord, want)
    assert rep1.iterations < rep0.iterations, (rep1, rep0)
    # memory=1 keeps one pair: still a valid descent method, same answer.
    one, rep2 = newton.solve_preconditioned(op, b, y, loss, 0.5, memory=1, **kw)
    assert rep2.converged
    assert close(one, want)
    for bad in (-1, 1.5, True):
      with pytest.raises(ValueError, match="memory must be an int >= 0"):
        newton.solve_preconditioned(op, b, y, loss, 0.5, memory=bad, **kw)


@pytest.mark.parametrize("elems,rows", [(7 * 13, 31), (2**20, 30)])
def test_float32_rows_give_exact_float64_products(monkeypatch, elems, rows):
  """Rows kept in float32 and converted block by block inside the products
  give the float64 products of the same rows (the float64 copy of J,
  multiplied by numpy, is the reference): 4 blocks of 7 rows and a tail of
  3, or one block. (Each case has its own shape, so that it is traced anew
  under its ``_CONVERT_ELEMS``.)"""
  monkeypatch.setattr(newton, "_CONVERT_ELEMS", elems)
  assert newton._row_blocks(np.empty((rows, 13))) == ((7, 4) if rows == 31
                                                       else (30, 1))
  rng = np.random.default_rng(3)
  j32 = rng.normal(size=(rows, 13)).astype(np.float32)  # C = 1
  with jax.enable_x64(True):
    v, u = rng.normal(size=13), rng.normal(size=rows)
    h = rng.normal(size=(rows, 1, 1))
    op = newton.DenseJacobian(jnp.asarray(j32), 1)
    assert op.jac.dtype == jnp.float32  # kept as computed, not converted
    j64 = j32.astype(np.float64)
    jv = np.asarray(op.matvec(jnp.asarray(v)))
    ju = np.asarray(op.rmatvec(jnp.asarray(u)))
    hv = np.asarray(op.ggn_matvec(jnp.asarray(h))(jnp.asarray(v)))
  assert jv.dtype == np.float64 and ju.dtype == np.float64
  np.testing.assert_allclose(jv.reshape(-1), j64 @ v, rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(ju, u @ j64, rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(hv, (h[:, 0, 0] * (j64 @ v)) @ j64, rtol=1e-12,
                             atol=1e-12)
  # A float32 product would be ~1e-7 off: the test can tell.
  assert np.max(np.abs(j32 @ v.astype(np.float32) - j64 @ v)) > 1e-9


def test_a_given_start_replaces_the_first_passes():
  """``start`` (logits, gradient and ‖∇Φ(0)‖ at x0) gives the solve the
  caller computed; ``return_start`` returns them at the solution, equal to
  direct evaluation; a wrong start is refused."""
  with jax.enable_x64(True):
    apply_fn, params, x, y = _model(4)
    ce = objective.cross_entropy
    op = newton.DenseJacobian(kernels.jacobian(apply_fn, params, x), 4)
    b = apply_fn(params, x)
    x0 = jnp.asarray(np.random.default_rng(2).normal(size=op.p)) * 0.1
    z0 = b + op.matvec(x0)
    g0 = op.rmatvec(ce.grad(z0, jnp.asarray(y))) + 0.7 * x0
    ga = op.rmatvec(ce.grad(b, jnp.asarray(y)))
    start = newton.Start(z0, g0, float(jnp.linalg.norm(ga)))
    plain, rp = newton.solve_primal(op, b, y, ce, 0.7, x0=x0)
    given, rg, at = newton.solve_primal(op, b, y, ce, 0.7, x0=x0, start=start,
                                        return_start=True)
    np.testing.assert_allclose(np.asarray(given), np.asarray(plain),
                               rtol=1e-12, atol=1e-14)
    assert rg.iterations == rp.iterations and rg.converged
    np.testing.assert_allclose(np.asarray(at.logits),
                               np.asarray(b + op.matvec(given)), atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(at.grad), np.asarray(op.rmatvec(ce.grad(
            at.logits, jnp.asarray(y))) + 0.7 * given), atol=1e-12)
    assert at.grad0_norm == pytest.approx(float(jnp.linalg.norm(ga)))
    # A start that is not at x0 changes the path: the caller vouches for it.
    wrong = newton.Start(z0, g0 * 0, start.grad0_norm)
    _, rw = newton.solve_primal(op, b, y, ce, 0.7, x0=x0, start=wrong)
    assert rw.converged and rw.iterations == 0
    with pytest.raises(ValueError, match="start: give x0"):
      newton.solve_primal(op, b, y, ce, 0.7, start=start)
    with pytest.raises(ValueError, match="start: logits"):
      newton.solve_primal(op, b, y, ce, 0.7, x0=x0,
                          start=newton.Start(z0[:3], g0, 1.0))


@pytest.mark.parametrize("elems", [5 * 13 * 3, 2**20])
def test_one_read_step_pass_equals_two_passes(monkeypatch, elems):
  """``step_pass`` gives ``J d`` and the data term of the gradient at
  ``z + J d`` (weights applied) from one read of float32 rows, equal to the
  two float64 passes: blocks of 5 whole samples and a tail, or one block."""
  monkeypatch.setattr(newton, "_CONVERT_ELEMS", elems)
  rng = np.random.default_rng(5)
  n, c, p = 17, 3, 13
  j32 = rng.normal(size=(n * c, p)).astype(np.float32)
  ce = objective.cross_entropy
  with jax.enable_x64(True):
    op = newton.DenseJacobian(jnp.asarray(j32), c)
    d = jnp.asarray(rng.normal(size=p))
    z = jnp.asarray(rng.normal(size=(n, c)))
    y = jnp.asarray(rng.integers(0, c, n))
    w = jnp.asarray((rng.random(n) > 0.3).astype(np.float64))
    jd, g = op.step_pass(d, z, y, w, ce)
    jd2 = op.matvec(d)
    g2 = op.rmatvec(w[:, None] * ce.grad(z + jd2, y))
  assert jd.dtype == g.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(jd), np.asarray(jd2), rtol=1e-13,
                             atol=1e-13)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g2), rtol=1e-12,
                             atol=1e-12)


def test_kept_rows_solves_read_the_rows_once_a_full_step(monkeypatch):
  """A solve over kept rows gets the gradient at an accepted full step from
  the step's own pass: fewer ``Jᵀu`` passes than steps, the same answer as
  rows without the fused pass."""
  with jax.enable_x64(True):
    apply_fn, params, x, y = _model(6, n=40)
    ce = objective.cross_entropy
    jac = kernels.jacobian(apply_fn, params, x)
    b = apply_fn(params, x)
    op = newton.DenseJacobian(jac, 4)
    calls = []
    real = newton.DenseJacobian.rmatvec
    monkeypatch.setattr(newton.DenseJacobian, "rmatvec",
                        lambda self, u: (calls.append(1), real(self, u))[1])
    sol, rep = newton.solve_newton_cg(op, b, y, ce, 0.5)
    fused_calls = len(calls)

    class TwoPasses(newton.DenseJacobian):
      step_pass = None

    calls.clear()
    ref, rep2 = newton.solve_newton_cg(TwoPasses(jac, 4), b, y, ce, 0.5)
  assert rep.converged and rep2.converged and rep.iterations >= 3
  # Two passes: ∇Φ(0), then one Jᵀu a step. One read: ∇Φ(0), then one only
  # for a step that backtracked (here 2 and 10 for 9 steps).
  assert len(calls) == rep2.iterations + 1
  assert fused_calls <= 1 + rep.iterations // 3
  np.testing.assert_allclose(np.asarray(sol), np.asarray(ref), rtol=1e-10,
                             atol=1e-12)
