"""Deletion requests (prepare once, forget with work ∝ |D_f|) against unlearn()."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.optimize import minimize

import fastntk_jax as F
from fastntk_jax.core import deletion
from fastntk_jax.core import newton
from fastntk_jax.core import objective


def _problem(seed=0, n=40, d=5, h=8, c=3):
  rng = np.random.default_rng(seed)
  w1 = jnp.asarray(rng.normal(size=(d, h)) / 2, jnp.float32)

  def apply_fn(params, x):
    return jnp.tanh(x @ (w1 * params["s"])) @ params["w"] + params["b"]

  w0 = {"s": jnp.ones((h,)), "w": jnp.asarray(rng.normal(size=(h, c)) * 0.3,
                                              jnp.float32),
        "b": jnp.zeros((c,))}
  w_d = jax.tree_util.tree_map(
      lambda a: a + jnp.asarray(0.05 * rng.normal(size=a.shape), a.dtype), w0)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, c, n)
  return apply_fn, w0, w_d, x, y


def _flat(tree):
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


def _rel(a, b):
  return np.linalg.norm(_flat(a) - _flat(b)) / np.linalg.norm(_flat(b))


def test_requests_in_sequence_equal_unlearning_from_scratch():
  apply_fn, w0, w_d, x, y = _problem()
  ids = np.arange(len(y))
  state = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, linearize_at="w_0", ids=ids,
                           damping=0.5)
  f1, f2 = np.array([3, 17, 21]), np.array([0, 5, 30, 31])
  r1 = deletion.forget(state, apply_fn, w_d, (x[f1], y[f1]), ids=f1)
  r2 = deletion.forget(r1.state, apply_fn, r1.params, (x[f2], y[f2]), ids=f2)
  gone = np.zeros(len(y), bool)
  gone[np.r_[f1, f2]] = True
  scratch = F.unlearn(apply_fn, w_d, (x[~gone], y[~gone]), (x[gone], y[gone]),
                      anchor=w0, linearize_at="w_0", damping=0.5,
                      solver="primal")
  dual = F.unlearn(apply_fn, w_d, (x[~gone], y[~gone]), (x[gone], y[gone]),
                   anchor=w0, linearize_at="w_0", damping=0.5, solver="dual")
  assert _rel(w_d, scratch.params) > 1e-2  # there is something to forget
  assert _rel(r2.params, scratch.params) < 1e-5
  assert _rel(r2.params, dual.params) < 1e-4  # float32 kernel solve
  # The first request alone is unlearn() with D_f = f1.
  keep1 = np.ones(len(y), bool)
  keep1[f1] = False
  one = F.unlearn(apply_fn, w_d, (x[keep1], y[keep1]), (x[f1], y[f1]),
                  anchor=w0, linearize_at="w_0", damping=0.5, solver="primal")
  assert _rel(r1.params, one.params) < 1e-5
  np.testing.assert_allclose(r1.forget_residual_norm,
                             one.forget_residual_norm, rtol=1e-4)
  # The state now describes D without f1 ∪ f2.
  assert r2.state.num_samples == len(y) - 7
  np.testing.assert_array_equal(r2.state.ids, np.flatnonzero(~gone))
  fresh = deletion.prepare(apply_fn, w_d, (x[~gone], y[~gone]), anchor=w0, linearize_at="w_0",
                           damping=0.5)
  # Jacobian rows agree to float32 rounding between block compositions.
  np.testing.assert_allclose(r2.state.gram, fresh.gram, rtol=0,
                             atol=1e-6 * float(np.abs(fresh.gram).max()))
  np.testing.assert_allclose(r2.state.grad, fresh.grad, rtol=0,
                             atol=1e-6 * float(np.abs(fresh.grad).max()))
  assert r2.state.gram.dtype == jnp.float64
  assert r2.params["w"].dtype == jnp.float32
  assert r1.relative_residual < 1e-10


def test_linear_model_requests_reach_the_ridge_retrain():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    t = jnp.asarray(rng.normal(size=(5, 3 * 12)))

    def apply_fn(params, x):  # linear in params
      return jnp.einsum("ncp,p->nc", jnp.tanh(x @ t).reshape(-1, 3, 12),
                        params["w"])

    w0 = {"w": jnp.asarray(rng.normal(size=12))}
    x = jnp.asarray(rng.normal(size=(20, 5)))
    y = rng.integers(0, 3, 20)
    lam = 0.3

    def ridge(xs, ys):
      j = F.kernels.jacobian(apply_fn, w0, xs)
      e = (jax.nn.one_hot(ys, 3) - apply_fn(w0, xs)).reshape(-1)
      return {"w": w0["w"] + j.T @ jnp.linalg.solve(j @ j.T + lam * jnp.eye(
          j.shape[0]), e)}

    state = deletion.prepare(apply_fn, ridge(x, y), (x, y), anchor=w0, linearize_at="w_0",
                             damping=lam)
    res = deletion.forget(state, apply_fn, ridge(x, y), (x[:6], y[:6]))
    np.testing.assert_allclose(res.params["w"], ridge(x[6:], y[6:])["w"],
                               rtol=1e-8)


def test_float32_precision_is_close_on_a_small_problem():
  apply_fn, w0, w_d, x, y = _problem(1)
  out = {}
  for prec in ("float64", "float32"):
    st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, linearize_at="w_0", damping=1.0,
                          solve_dtype=prec)
    assert st.gram.dtype == np.dtype(prec)
    out[prec] = deletion.forget(st, apply_fn, w_d, (x[:5], y[:5])).params
  assert _rel(out["float32"], out["float64"]) < 1e-3


def test_bad_requests_are_refused_before_work():
  apply_fn, w0, w_d, x, y = _problem(2, n=12)
  ids = np.arange(100, 112)
  st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, linearize_at="w_0", ids=ids)
  r = deletion.forget(st, apply_fn, w_d, (x[:2], y[:2]), ids=ids[:2])
  with pytest.raises(ValueError, match="already forgotten"):
    deletion.forget(r.state, apply_fn, r.params, (x[:1], y[:1]), ids=ids[:1])
  with pytest.raises(ValueError, match="ids: the state tracks"):
    deletion.forget(st, apply_fn, w_d, (x[:1], y[:1]))
  with pytest.raises(ValueError, match="unique"):
    deletion.forget(st, apply_fn, w_d, (x[:2], y[:2]), ids=[100, 100])
  with pytest.raises(ValueError, match="at least one must remain"):
    deletion.forget(st, apply_fn, w_d, (x, y), ids=ids)
  with pytest.raises(ValueError, match="forget_set: inputs"):
    deletion.forget(st, apply_fn, w_d, (x[:1, :3], y[:1]), ids=ids[:1])
  with pytest.raises(ValueError, match="damping must be finite and > 0"):
    deletion.prepare(apply_fn, w_d, (x, y), damping=0.0)
  with pytest.raises(ValueError, match="solve_dtype"):
    deletion.prepare(apply_fn, w_d, (x, y), solve_dtype="float16")
  with pytest.raises(ValueError, match="ids: expected 12"):
    deletion.prepare(apply_fn, w_d, (x, y), ids=np.arange(3))
  with pytest.raises(TypeError, match="PreparedState"):
    deletion.forget({"gram": 1}, apply_fn, w_d, (x[:1], y[:1]))
  plain = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, linearize_at="w_0")
  with pytest.raises(ValueError, match="prepared without ids"):
    deletion.forget(plain, apply_fn, w_d, (x[:1], y[:1]), ids=[100])


def test_samples_outside_the_prepared_set_are_detected():
  apply_fn, w0, w_d, x, y = _problem(3, n=12)
  st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, linearize_at="w_0", damping=1e-3)
  alien = (50 * np.ones((6, 5), np.float32), y[:6])
  with pytest.raises(F.UnlearningError, match="part of the prepared set"):
    deletion.forget(st, apply_fn, w_d, alien)


# ------------------------------------------------------------ cross-entropy


# J at w_0 (~13 s) is slow-marked; the default point w_D runs by default.
@pytest.mark.parametrize("linearize_at", [
    "w_D", pytest.param("w_0", marks=pytest.mark.slow)])
def test_ce_requests_in_sequence_equal_unlearning_from_scratch(linearize_at):
  apply_fn, w0, w_d, x, y = _problem(5, n=60)
  ids = np.arange(1000, 1060)
  st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, ids=ids,
                        linearize_at=linearize_at, damping=0.5, loss="ce")
  assert st.loss == "ce" and st.jacobian.shape == (60 * 3, 8 * 3 + 8 + 3)
  reqs = [np.array([3, 17, 21]), np.array([0, 5, 30, 31, 44]), np.array([59])]
  res, params = None, w_d
  for r in reqs:
    res = deletion.forget(st if res is None else res.state, apply_fn, params,
                          (x[r], y[r]), ids=ids[r], refresh_steps=None)
    params = res.params
    assert res.solve.converged and res.solve.iterations >= 1
    assert res.relative_residual <= 1e-9
  gone = np.zeros(60, bool)
  gone[np.concatenate(reqs)] = True
  scratch = F.unlearn(apply_fn, w_d, (x[~gone], y[~gone]), (x[gone], y[gone]),
                      anchor=w0, linearize_at=linearize_at, damping=0.5,
                      loss="ce", solver="primal")
  assert _rel(w_d, scratch.params) > 1e-2  # there is something to forget
  assert _rel(params, scratch.params) < 1e-5
  np.testing.assert_array_equal(res.state.ids, ids[~gone])
  assert res.state.num_samples == 60 - gone.sum()
  np.testing.assert_array_equal(res.state.active, ~gone)
  # The downdated preconditioner is the remaining set's matrix.
  fresh_rows = st.jacobian.reshape(60, 3, -1)[~gone].reshape(
      -1, st.jacobian.shape[1])
  op = newton.DenseJacobian(fresh_rows, 3)
  with jax.enable_x64(True):
    want = op.ggn(objective.cross_entropy.hess_factor(st.ref_logits[~gone]),
                  jnp.float64)
  np.testing.assert_allclose(res.state.gram, want, rtol=0,
                             atol=1e-6 * float(np.abs(want).max()))


def test_ce_requests_start_from_the_downdated_gradient():
  """The state carries the solution's logits, its gradient and ∇Φ(0) over
  the current set, downdated by each request: they equal the sums written
  out in numpy over the kept rows, and a state without them (as saved
  before they existed) computes them and gives the same answer."""
  apply_fn, w0, w_d, x, y = _problem(7, n=50)
  ids = np.arange(50)
  st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, ids=ids,
                        damping=0.5, loss="ce")
  assert st.jacobian.dtype == jnp.float32  # kept as the model computed them
  # 3 samples (bucket 16) and 18 (bucket 32): padded rows must add nothing.
  reqs = [np.array([1, 8, 9]), np.arange(20, 38)]
  runs = {}
  for carried in (True, False):
    state, params = st, w_d
    for r in reqs:
      if not carried:
        state = state._replace(solution_logits=None, solution_grad=None,
                               anchor_grad=None)
      res = deletion.forget(state, apply_fn, params, (x[r], y[r]), ids=r)
      state, params = res.state, res.params
    runs[carried] = (state, params)
  (s1, p1), (s0, p0) = runs[True], runs[False]
  np.testing.assert_allclose(_flat(p1), _flat(p0), rtol=1e-9, atol=1e-12)
  keep = s1.active
  assert keep.sum() == 29
  j = np.asarray(st.jacobian, np.float64)
  b = np.asarray(st.offsets, np.float64)
  # M downdated by the removed samples' Gauss-Newton terms at the prepared
  # logits, Σ J_iᵀ (diag p_i − p_i p_iᵀ) J_i.
  ref = np.asarray(st.ref_logits, np.float64)
  pr = np.exp(ref - ref.max(1, keepdims=True))
  pr /= pr.sum(1, keepdims=True)
  m = np.zeros_like(np.asarray(st.gram, np.float64))
  for i in np.flatnonzero(~keep):
    ji = j[3 * i:3 * i + 3]
    m += ji.T @ (np.diag(pr[i]) - np.outer(pr[i], pr[i])) @ ji
  np.testing.assert_allclose(np.asarray(st.gram) - np.asarray(s1.gram), m,
                             atol=1e-5 * np.abs(m).max())

  def grad_terms(z):  # Σ_kept J_iᵀ (softmax(z_i) − e_{y_i})
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return (p * keep[:, None]).reshape(-1) @ j

  xs = np.asarray(s1.solution)
  z = b + (j @ xs).reshape(-1, 3)
  np.testing.assert_allclose(np.asarray(s1.solution_logits), z, atol=1e-10)
  np.testing.assert_allclose(np.asarray(s1.anchor_grad), grad_terms(b),
                             atol=1e-10)
  g = grad_terms(z) + 0.5 * xs
  np.testing.assert_allclose(np.asarray(s1.solution_grad), g, atol=1e-10)
  # The carried gradient is the converged one: ≤ tol · ‖∇Φ(0)‖.
  assert np.linalg.norm(g) <= 1e-9 * max(np.linalg.norm(grad_terms(b)),
                                          0.5 * np.linalg.norm(xs))


def test_ce_preconditioner_refresh_changes_the_matrix_not_the_answer():
  apply_fn, w0, w_d, x, y = _problem(5, n=60)
  ids = np.arange(60)
  st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, ids=ids,
                        damping=0.5, loss="ce")
  reqs = [np.arange(0, 12), np.arange(12, 24)]
  out = {}
  for refresh in (None, 1):  # never, and after every request
    state, params, steps = st, w_d, []
    for r in reqs:
      res = deletion.forget(state, apply_fn, params, (x[r], y[r]), ids=r,
                            refresh_steps=refresh)
      state, params = res.state, res.params
      steps.append(res.solve.iterations)
    out[refresh] = (state, params, steps)
  (s0, p0, _), (s1, p1, _) = out[None], out[1]
  np.testing.assert_allclose(_flat(p1), _flat(p0), rtol=1e-7, atol=1e-9)
  # The refreshed matrix is the kept rows' Gauss-Newton matrix at the logits
  # of the current solution, formed independently here.
  keep = s1.active
  with jax.enable_x64(True):
    j = np.asarray(st.jacobian, np.float64)
    z = np.asarray(st.offsets) + (j @ np.asarray(s1.solution)).reshape(60, 3)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.zeros((j.shape[1], j.shape[1]))
    for i in np.flatnonzero(keep):
      ji = j[3 * i:3 * i + 3]
      want += ji.T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ ji
  np.testing.assert_allclose(np.asarray(s1.gram), want, rtol=0,
                             atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(np.asarray(s1.ref_logits), z, atol=1e-8)
  assert np.abs(np.asarray(s0.gram) - want).max() > 1e-3 * np.abs(want).max()
  with pytest.raises(ValueError, match="refresh_steps"):
    deletion.forget(st, apply_fn, w_d, (x[:1], y[:1]), ids=ids[:1],
                    refresh_steps=0)


def test_ce_linear_model_requests_reach_the_ce_retrain():
  """Exact for a model linear in w trained to the minimiser on D (float64)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    t = jnp.asarray(rng.normal(size=(5, 3 * 12)))

    def apply_fn(params, x):
      return jnp.einsum("ncp,p->nc", jnp.tanh(x @ t).reshape(-1, 3, 12),
                        params["w"])

    w0 = {"w": jnp.asarray(rng.normal(size=12))}
    x = jnp.asarray(rng.normal(size=(30, 5)))
    y = rng.integers(0, 3, 30)
    lam = 0.3

    def train(xs, ys):
      def phi(w):
        z = apply_fn({"w": w}, xs)
        return (jnp.sum(jax.nn.logsumexp(z, -1) - z[jnp.arange(len(ys)), ys])
                + 0.5 * lam * jnp.sum((w - w0["w"]) ** 2))
      # BFGS, polished by Newton steps with JAX's Hessian (no library code).
      w = minimize(phi, w0["w"], method="BFGS", tol=1e-14).x
      grad, hess = jax.jit(jax.grad(phi)), jax.jit(jax.hessian(phi))
      for _ in range(6):
        w = w - jnp.linalg.solve(hess(w), grad(w))
      assert float(jnp.linalg.norm(grad(w))) < 1e-10
      return {"w": w}

    ids = np.arange(30)
    st = deletion.prepare(apply_fn, train(x, y), (x, y), anchor=w0, ids=ids,
                          damping=lam, loss="ce")
    r1 = deletion.forget(st, apply_fn, train(x, y), (x[:4], y[:4]),
                         ids=ids[:4])
    r2 = deletion.forget(r1.state, apply_fn, r1.params, (x[4:9], y[4:9]),
                         ids=ids[4:9])
    np.testing.assert_allclose(r2.params["w"], train(x[9:], y[9:])["w"],
                               rtol=1e-8)


def test_bad_ce_requests_are_refused_and_change_nothing():
  apply_fn, w0, w_d, x, y = _problem(7, n=20)
  ids = np.arange(20)
  with pytest.raises(ValueError, match="ids: cross-entropy deletion"):
    deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, loss="ce")
  with pytest.raises(ValueError, match="newton_tol must be a float in"):
    deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, loss="ce", ids=ids,
                     newton_tol=1.0)
  with pytest.raises(ValueError, match="memory_budget: the prepared state"):
    deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, loss="ce", ids=ids,
                     memory_budget=10_000)
  st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, loss="ce", ids=ids)
  before = (np.asarray(st.gram).copy(), np.asarray(st.solution).copy(),
            st.active.copy())
  with pytest.raises(ValueError, match="labels differ"):
    deletion.forget(st, apply_fn, w_d, (x[:2], (y[:2] + 1) % 3), ids=ids[:2])
  with pytest.raises(ValueError, match="other logits"):  # right label, wrong x
    deletion.forget(st, apply_fn, w_d, (x[5:6] + 3.0, y[5:6]), ids=ids[5:6])
  with pytest.raises(ValueError, match="newton_tol must be a float in"):
    deletion.forget(st, apply_fn, w_d, (x[:2], y[:2]), ids=ids[:2],
                    newton_tol=2.0)
  with pytest.raises(ValueError, match="cg_max_steps must be a positive"):
    deletion.forget(st, apply_fn, w_d, (x[:2], y[:2]), ids=ids[:2],
                    cg_max_steps=0)
  with pytest.raises(F.UnlearningError, match="state is unchanged"):
    deletion.forget(st, apply_fn, w_d, (x[:3], y[:3]), ids=ids[:3],
                    newton_max_steps=1, newton_tol=1e-15)
  np.testing.assert_array_equal(np.asarray(st.gram), before[0])
  np.testing.assert_array_equal(np.asarray(st.solution), before[1])
  np.testing.assert_array_equal(st.active, before[2])
  ok = deletion.forget(st, apply_fn, w_d, (x[:3], y[:3]), ids=ids[:3])
  assert ok.solve.converged


def test_ce_requests_go_on_with_newton_cg_when_lbfgs_runs_out(monkeypatch):
  """A request that the preconditioned L-BFGS steps do not finish goes on
  with Newton-CG, to the same answer; the caps leave Newton-CG at least one
  step (with equal caps it used to get none, and the request failed)."""
  apply_fn, w0, w_d, x, y = _problem(7, n=20)
  ids = np.arange(20)
  st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, loss="ce", ids=ids)
  ref = deletion.forget(st, apply_fn, w_d, (x[:5], y[:5]), ids=ids[:5])
  assert ref.solve.converged and ref.solve.cg_steps == 0
  assert ref.solve.iterations > 2  # so that two L-BFGS steps do not finish
  monkeypatch.setattr(deletion, "_FROZEN_STEPS", 2)
  got = deletion.forget(st, apply_fn, w_d, (x[:5], y[:5]), ids=ids[:5])
  assert got.solve.converged and got.solve.cg_steps > 0
  assert got.solve.iterations > 2
  assert _rel(_flat(got.params), _flat(ref.params)) < 1e-8
  # Equal caps: L-BFGS stops one step short, leaving Newton-CG a step.
  seen, real = [], newton.solve_preconditioned
  monkeypatch.setattr(deletion, "_FROZEN_STEPS", 50)
  monkeypatch.setattr(newton, "solve_preconditioned",
                      lambda *a, **k: (seen.append(k["max_iter"]),
                                       real(*a, **k))[1])
  deletion.forget(st, apply_fn, w_d, (x[:5], y[:5]), ids=ids[:5],
                  newton_max_steps=50)
  deletion.forget(st, apply_fn, w_d, (x[:5], y[:5]), ids=ids[:5])
  assert seen == [49, 50]  # the default cap is 100


def test_mse_requests_with_the_anchor_apart_from_the_linearisation_point():
  """anchor=w_0 with J at w_D: the residual at the anchor enters the Grams'
  gradient; requests still equal unlearn() from scratch."""
  apply_fn, w0, w_d, x, y = _problem(8, n=30)
  ids = np.arange(30)
  st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, ids=ids,
                        damping=0.5)
  assert st.shift is not None and st.anchored_at == "w_0"
  r1 = deletion.forget(st, apply_fn, w_d, (x[:4], y[:4]), ids=ids[:4])
  r2 = deletion.forget(r1.state, apply_fn, r1.params, (x[4:7], y[4:7]),
                       ids=ids[4:7])
  scratch = F.unlearn(apply_fn, w_d, (x[7:], y[7:]), (x[:7], y[:7]),
                      anchor=w0, damping=0.5, solver="primal")
  no_anchor = F.unlearn(apply_fn, w_d, (x[7:], y[7:]), (x[:7], y[:7]),
                        damping=0.5, solver="primal")
  assert _rel(scratch.params, no_anchor.params) > 1e-3  # the anchor matters
  assert _rel(r2.params, scratch.params) < 1e-5
  one = F.unlearn(apply_fn, w_d, (x[4:], y[4:]), (x[:4], y[:4]), anchor=w0,
                  damping=0.5, solver="primal")
  np.testing.assert_allclose(r1.forget_residual_norm,
                             one.forget_residual_norm, rtol=1e-4)


def test_padded_request_rows_come_in_few_bucket_sizes():
  for n, size in ((1, 16), (10, 16), (16, 16), (17, 32), (37, 48), (100, 112),
                  (128, 128), (129, 144), (5000, 5120)):
    rows = np.arange(3, 3 + n) * 7
    padded, mask = deletion._padded_rows(rows)
    assert len(padded) == len(mask) == size
    np.testing.assert_array_equal(padded[:n], rows)
    assert (padded[n:] == rows[0]).all()
    assert mask.sum() == n and (mask[:n] == 1).all()
  sizes = {len(deletion._padded_rows(np.arange(n))[0]) for n in range(1, 1025)}
  assert len(sizes) <= 8 * 7 + 1  # eight a doubling from 16 to 1,024


@pytest.mark.parametrize("loss", ["mse", "mse-rows", "ce"])
def test_requests_of_new_sizes_compile_nothing_new(loss, lowered_programs):
  """After one request, a request of another size (in the same bucket)
  runs programs already compiled: its blocks and padded rows have the
  shapes of the first (a deletion store answers requests of every size)."""
  apply_fn, w0, w_d, x, y = _problem(9, n=60)
  ids = np.arange(60)
  st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, ids=ids,
                        loss=loss[:3], keep_rows=loss == "mse-rows")
  first = deletion.forget(st, apply_fn, w_d, (x[:3], y[:3]), ids=ids[:3])
  # 4 samples: another size, the same buckets (the last block's, a quarter
  # of 16; a CE request's rows, 16).
  sel = np.arange(10, 14)
  with lowered_programs() as new:
    out = deletion.forget(first.state, apply_fn, first.params,
                          (x[sel], y[sel]), ids=ids[sel])
  assert new == []
  # And the answer is the one a request of 3 + 7 from the start gives.
  both = np.concatenate([np.arange(3), sel])
  ref = deletion.forget(st, apply_fn, w_d, (x[both], y[both]), ids=ids[both])
  assert _rel(out.params, ref.params) < 1e-6


def test_a_request_that_falls_back_to_newton_cg_compiles_nothing_after_warm_up(
    lowered_programs, monkeypatch):
  apply_fn, w0, w_d, x, y = _problem(6, n=40)
  ids = np.arange(40)
  st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, ids=ids, loss="ce")
  r = deletion.forget(st, apply_fn, w_d, (x[:2], y[:2]), ids=ids[:2])
  assert deletion.warm_up_newton_cg(r.state) > 0
  assert deletion.warm_up_newton_cg(
      deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, ids=ids)) is None
  sel = np.arange(5, 9)
  monkeypatch.setattr(deletion, "_FROZEN_STEPS", 1)  # then Newton-CG
  with lowered_programs() as new:
    out = deletion.forget(r.state, apply_fn, r.params, (x[sel], y[sel]),
                          ids=ids[sel])
  assert out.solve.iterations > 1 and out.solve.cg_steps > 0
  assert new == []


def test_warm_up_compiles_a_compacted_state_and_changes_nothing(
    lowered_programs):
  apply_fn, w0, w_d, x, y = _problem(3, n=40)
  ids = np.arange(40)
  st = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, ids=ids, loss="ce")
  r = deletion.forget(st, apply_fn, w_d, (x[:12], y[:12]), ids=ids[:12])
  small = deletion.compact(r.state)
  before = np.asarray(small.solution).copy()
  assert deletion.warm_up(small, r.params) > 0
  np.testing.assert_array_equal(np.asarray(small.solution), before)
  with lowered_programs() as new:  # the next request compiles nothing
    deletion.forget(small, apply_fn, r.params, (x[20:23], y[20:23]),
                    ids=ids[20:23])
  assert new == []
  mse = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, ids=ids)
  assert deletion.warm_up(mse, w_d) is None  # nothing depends on N
  # An MSE state with rows: its request programs take the rows' shape.
  mse = deletion.prepare(apply_fn, w_d, (x, y), anchor=w0, ids=ids,
                         keep_rows=True)
  r = deletion.forget(mse, apply_fn, w_d, (x[:12], y[:12]), ids=ids[:12])
  small = deletion.compact(r.state)
  assert small.jacobian.shape[0] == 28 * 3
  assert deletion.warm_up(small, r.params) > 0
  with lowered_programs() as new:
    deletion.forget(small, apply_fn, r.params, (x[20:23], y[20:23]),
                    ids=ids[20:23])
  assert new == []


@pytest.mark.parametrize("linearize_at", ["w_D", "w_0"])
def test_mse_kept_rows_answer_requests_without_jacobian_work(
    linearize_at, monkeypatch):
  """keep_rows: the same answers as computing the request's rows, with no
  Jacobian pass in a request, after a compaction too; inputs and labels that
  are not the prepared samples' are refused."""
  apply_fn, w0, w_d, x, y = _problem(4, n=50)
  ids = np.arange(50) * 3 + 11
  kw = dict(anchor=w0, linearize_at=linearize_at, ids=ids, damping=0.5)
  plain = deletion.prepare(apply_fn, w_d, (x, y), **kw)
  rows = deletion.prepare(apply_fn, w_d, (x, y), keep_rows=True, **kw)
  assert plain.jacobian is None and rows.jacobian.shape == (150, 8 + 8 * 3 + 3)
  np.testing.assert_allclose(np.asarray(rows.gram), np.asarray(plain.gram),
                             rtol=0, atol=1e-6 * float(np.abs(plain.gram).max()))

  def no_jacobian(*a, **k):
    raise AssertionError("a request with kept rows computed Jacobians")

  f1, f2, f3 = np.array([3, 17, 21]), np.arange(30, 42), np.array([5, 6])
  out, ref = rows, plain
  p_out = p_ref = w_d
  for i, f in enumerate((f1, f2, f3)):
    ref_r = deletion.forget(ref, apply_fn, p_ref, (x[f], y[f]), ids=ids[f])
    with monkeypatch.context() as m:
      m.setattr(deletion.kernels, "gram", no_jacobian)
      m.setattr(deletion.kernels, "jacobian", no_jacobian)
      out_r = deletion.forget(out, apply_fn, p_out, (x[f], y[f]), ids=ids[f])
    assert _rel(out_r.params, ref_r.params) < 1e-5  # float32 rounding
    assert out_r.delta_norm == pytest.approx(ref_r.delta_norm, rel=1e-5)
    out, ref, p_out, p_ref = out_r.state, ref_r.state, out_r.params, ref_r.params
    if i == 1:  # drop the forgotten rows: the next answer is the same
      out = deletion.compact(out)
      assert out.jacobian.shape[0] == (50 - 15) * 3
  assert int(np.sum(out.active)) == out.num_samples == 50 - 17
  gone = np.zeros(50, bool)
  gone[np.r_[f1, f2, f3]] = True
  scratch = F.unlearn(apply_fn, w_d, (x[~gone], y[~gone]), (x[gone], y[gone]),
                      anchor=w0, linearize_at=linearize_at, damping=0.5,
                      solver="primal")
  assert _rel(w_d, scratch.params) > 1e-2
  assert _rel(p_out, scratch.params) < 1e-5
  # Another sample's inputs, or another label, under these ids: refused.
  f = np.array([44, 45])
  with pytest.raises(ValueError, match="other logits"):
    deletion.forget(out, apply_fn, p_out, (x[f[::-1]], y[f]), ids=ids[f])
  with pytest.raises(ValueError, match="labels differ"):
    deletion.forget(out, apply_fn, p_out, (x[f], (y[f] + 1) % 3), ids=ids[f])


def test_kept_rows_mask_follows_the_ids_that_remain():
  apply_fn, w0, w_d, x, y = _problem(7, n=30)
  ids = np.arange(30) + 100
  st = deletion.prepare(apply_fn, w_d, (x, y), ids=ids, keep_rows=True)
  r = deletion.forget(st, apply_fn, w_d, (x[:3], y[:3]), ids=ids[:3])
  np.testing.assert_array_equal(r.state.active, np.arange(30) >= 3)
  # A mask that lost a request (an older version's MSE path kept none):
  # the next request sets it from the ids that remain.
  stale = r.state._replace(active=np.ones(30, bool))
  r2 = deletion.forget(stale, apply_fn, r.params, (x[5:7], y[5:7]),
                       ids=ids[5:7])
  want = np.ones(30, bool)
  want[[0, 1, 2, 5, 6]] = False
  np.testing.assert_array_equal(r2.state.active, want)


def test_kept_rows_need_ids_and_count_against_the_budget():
  apply_fn, w0, w_d, x, y = _problem(5, n=30)
  with pytest.raises(ValueError, match="ids: keep_rows"):
    deletion.prepare(apply_fn, w_d, (x, y), keep_rows=True)
  with pytest.raises(TypeError, match="keep_rows"):
    deletion.prepare(apply_fn, w_d, (x, y), ids=np.arange(30), keep_rows=1)
  p = 8 + 8 * 3 + 3
  need = deletion.state_bytes("mse", 30, 3, p, 4, "float64", keep_rows=True)
  assert need == 4 * p * p * 8 + 30 * 3 * p * 4
  with pytest.raises(ValueError, match="Jacobian rows.*without keep_rows"):
    deletion.prepare(apply_fn, w_d, (x, y), ids=np.arange(30), keep_rows=True,
                     memory_budget=need - 1)
  # Without rows the same budget is plenty.
  deletion.prepare(apply_fn, w_d, (x, y), ids=np.arange(30),
                   memory_budget=need - 1)
