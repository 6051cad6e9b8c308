"""unlearn() on models where retraining has a closed form, and its input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastntk_jax as F


def _linear_model(seed, d=5, c=3, p=40):
  rng = np.random.default_rng(seed)
  t = rng.normal(size=(d, c * p))
  b = rng.normal(size=(c,))

  def apply_fn(params, x):  # linear in params (nonlinear features of x)
    feats = jnp.tanh(x @ t).reshape(x.shape[0], c, p) / np.sqrt(p)
    return jnp.einsum("ncp,p->nc", feats, params["w"]) + b + params["b"]

  w0 = {"w": jnp.asarray(rng.normal(size=p)), "b": jnp.zeros(c)}
  return apply_fn, w0, rng


def _ridge_from(apply_fn, w0, x, y, lam):
  flat0, unravel = jax.flatten_util.ravel_pytree(w0)
  jac = F.kernels.jacobian(apply_fn, w0, x)
  e = (jax.nn.one_hot(y, 3) - apply_fn(w0, x)).reshape(-1)
  d = jac.T @ jnp.linalg.solve(jac @ jac.T + lam * jnp.eye(jac.shape[0]), e)
  return unravel(flat0 + d)


@pytest.mark.parametrize("solver", ["dual", "primal"])
@pytest.mark.parametrize("lam", [0.05, 2.0])
def test_ridge_solution_is_unlearned_to_ridge_retrain(solver, lam):
  with jax.enable_x64(True):
    apply_fn, w0, rng = _linear_model(0)
    x = jnp.asarray(rng.normal(size=(14, 5)))
    y = rng.integers(0, 3, 14)
    forget = np.arange(14) % 4 == 0
    w_d = _ridge_from(apply_fn, w0, x, y, lam)
    w_r = _ridge_from(apply_fn, w0, x[~forget], y[~forget], lam)
    res = F.unlearn(apply_fn, w_d, (x[~forget], y[~forget]),
                    (x[forget], y[forget]), init_params=w0, damping=lam,
                    solver=solver)
    gap = max(float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(w_r)))
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree_util.tree_leaves(w_d), jax.tree_util.tree_leaves(w_r)))
    assert moved > 1e-2  # forgetting changes the parameters
    assert gap < 1e-8
    assert res.solver == solver and res.linearized_at == "init_params"
    assert jax.tree_util.tree_structure(res.params) == jax.tree_util.tree_structure(w_d)
    assert res.num_params == 43 and res.num_outputs == 3
    assert res.num_retain == 10 and res.num_forget == 4


def _gd(apply_fn, w0, x, y, steps=20000, lr=None):
  flat0, unravel = jax.flatten_util.ravel_pytree(w0)
  onehot = jax.nn.one_hot(y, 3)
  loss = lambda f: 0.5 * jnp.sum((apply_fn(unravel(f), x) - onehot) ** 2)
  jac = F.kernels.jacobian(apply_fn, w0, x)
  lr = lr or 1.0 / float(jnp.linalg.eigvalsh(jac @ jac.T).max())
  grad = jax.jit(jax.grad(loss))
  body = lambda i, f: f - lr * grad(f)
  flat = jax.lax.fori_loop(0, steps, body, flat0)
  return unravel(flat), float(loss(flat))


@pytest.mark.parametrize("damping", [0.0, 1e-10])
def test_gradient_descent_model_is_unlearned_to_gradient_descent_retrain(damping):
  """P > N·C: GD on MSE from w_0 converges to the min-norm interpolant."""
  with jax.enable_x64(True):
    apply_fn, w0, rng = _linear_model(1, p=300)
    x = jnp.asarray(rng.normal(size=(12, 5)))
    y = rng.integers(0, 3, 12)
    forget = np.arange(12) < 3
    w_d, loss_d = _gd(apply_fn, w0, x, y)
    w_r, loss_r = _gd(apply_fn, w0, x[~forget], y[~forget])
    assert loss_d < 1e-10 and loss_r < 1e-10  # trained to convergence
    assert float(jnp.abs(w_d['w'] - w_r['w']).max()) > 0.1
    for solver in ("dual", "primal"):
      res = F.unlearn(apply_fn, w_d, (x[~forget], y[~forget]),
                      (x[forget], y[forget]), init_params=w0,
                      damping=damping, solver=solver)
      for a, b in zip(jax.tree_util.tree_leaves(res.params),
                      jax.tree_util.tree_leaves(w_r)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_ce_residual_differs_from_mse():
  apply_fn, w0, rng = _linear_model(2)
  x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  y = rng.integers(0, 3, 8)
  w0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), w0)
  a = F.unlearn(apply_fn, w0, (x[2:], y[2:]), (x[:2], y[:2]), loss="mse")
  b = F.unlearn(apply_fn, w0, (x[2:], y[2:]), (x[:2], y[:2]), loss="ce")
  assert not np.allclose(a.params["w"], b.params["w"])
  assert a.params["w"].dtype == jnp.float32


def test_auto_picks_the_cheaper_solver():
  # P = 43 << N·C: primal; P huge vs N·C: dual.
  assert F.choose_solver(n=100, c=10, p=43) == "primal"
  assert F.choose_solver(n=10, c=10, p=100_000) == "dual"
  # The dual does not fit a small budget: primal even when the dual is cheaper.
  assert F.choose_solver(n=10, c=10, p=100_000, memory_budget=2**40) == "dual"
  with pytest.raises(ValueError, match="memory_budget"):
    F.choose_solver(n=10**5, c=10, p=10**6, memory_budget=2**20)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def small():
  apply_fn, w0, rng = _linear_model(3)
  w0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), w0)
  x = rng.normal(size=(10, 5)).astype(np.float32)
  y = rng.integers(0, 3, 10)
  return apply_fn, w0, (x[3:], y[3:]), (x[:3], y[:3])


def _call(small, **over):
  apply_fn, w, retain, forget = small
  args = dict(apply_fn=apply_fn, params=w, retain=retain, forget=forget)
  args.update(over)
  return F.unlearn(args.pop("apply_fn"), args.pop("params"), args.pop("retain"),
                   args.pop("forget"), **args)


@pytest.mark.parametrize("over, err, match", [
    (lambda s: {"retain": (s[2][0], s[2][1][:-1])}, ValueError, "retain: x has 7 samples but y has 6"),
    (lambda s: {"forget": (s[3][0], np.array([0, 1, 3]))}, ValueError, r"forget: labels must lie in \[0, 3\)"),
    (lambda s: {"retain": (s[2][0], -np.ones(7, int))}, ValueError, r"retain: labels must lie"),
    (lambda s: {"forget": (s[3][0][:0], s[3][1][:0])}, ValueError, "forget set is empty"),
    (lambda s: {"forget": (np.zeros((3, 4), np.float32), s[3][1])}, ValueError, "per-sample shape"),
    (lambda s: {"forget": (np.full((3, 5), np.nan, np.float32), s[3][1])}, ValueError, "forget: x contains NaN"),
    (lambda s: {"params": {"w": s[1]["w"].at[0].set(jnp.inf), "b": s[1]["b"]}}, ValueError, "params: contains NaN"),
    (lambda s: {"init_params": {"w": s[1]["w"]}}, ValueError, "init_params must have the tree structure"),
    (lambda s: {"damping": -1.0}, ValueError, "damping must be finite and ≥ 0"),
    (lambda s: {"damping": "1"}, TypeError, "damping must be a float"),
    (lambda s: {"loss": "l2"}, ValueError, "loss must be one of"),
    (lambda s: {"solver": "qr"}, ValueError, "solver must be one of"),
    (lambda s: {"retain": (s[2][0], s[2][1].astype(float))}, TypeError, "integer class labels"),
    (lambda s: {"retain": s[2][0]}, TypeError, r"retain: expected a pair \(x, y\)"),
    (lambda s: {"solver": "dual", "memory_budget": 1000}, ValueError, "memory_budget.*primal"),
    (lambda s: {"implementation": 3}, ValueError, "implementation must be 1 or 2"),
])
def test_bad_input_raises_before_work(small, over, err, match):
  with pytest.raises(err, match=match):
    _call(small, **over(small))


def test_nan_logits_are_reported(small):
  apply_fn, w, retain, forget = small
  bad = lambda params, x: apply_fn(params, x) * jnp.nan
  with pytest.raises(ValueError, match="NaN or infinite logits"):
    F.unlearn(bad, w, retain, forget, damping=1e-3)


@pytest.mark.parametrize("solver", ["dual", "primal"])
def test_failed_factorisation_raises_with_explanation(small, solver):
  """Finite logits, but J has entries ~1e19: the float32 Gram overflows and the
  Cholesky factorisation fails. That must raise, not return NaNs."""
  apply_fn, w, retain, forget = small
  huge = lambda params, x: 1e19 * (apply_fn(params, x) - apply_fn(
      jax.lax.stop_gradient(params), x))
  with pytest.raises(F.UnlearningError, match="factorisation .* failed"):
    F.unlearn(huge, w, retain, forget, damping=1e-3, solver=solver)
