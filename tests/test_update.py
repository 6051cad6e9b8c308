"""Eq. (1): kernel space = parameter space = difference of two ridge solves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.core import update


def _problem(seed, n_r, n_f, c, p):
  rng = np.random.default_rng(seed)
  j_r = rng.normal(size=(n_r * c, p))
  j_f = rng.normal(size=(n_f * c, p))
  r_r = rng.normal(size=n_r * c)  # f_0 − Y on D_r
  r_f = rng.normal(size=n_f * c)
  return j_r, j_f, r_r, r_f


def _ridge(j, e, lam):
  """Ridge step from w_0: argmin ‖J d − e‖² + λ‖d‖² (numpy, float64)."""
  if lam == 0:
    return np.linalg.pinv(j) @ e
  return j.T @ np.linalg.solve(j @ j.T + lam * np.eye(j.shape[0]), e)


def _reference(j_r, j_f, r_r, r_f, lam):
  j = np.vstack([j_r, j_f])
  e = -np.concatenate([r_r, r_f])
  return _ridge(j_r, -r_r, lam) - _ridge(j, e, lam)


def _dual(j_r, j_f, r_r, r_f, lam):
  out = update.kernel_space(jnp.asarray(j_r @ j_r.T), jnp.asarray(j_r @ j_f.T),
                            jnp.asarray(j_f @ j_f.T), jnp.asarray(r_r),
                            jnp.asarray(r_f), lam)
  return j_r.T @ np.asarray(out.coef_r) + j_f.T @ np.asarray(out.coef_f), out


def _primal(j_r, j_f, r_r, r_f, lam):
  out = update.parameter_space(jnp.asarray(j_r.T @ j_r), jnp.asarray(j_f.T @ j_f),
                               jnp.asarray(j_r.T @ r_r), jnp.asarray(j_f.T @ r_f),
                               lam)
  return np.asarray(out.delta), out


def _eq1_literal(j_r, j_f, r_r, r_f, lam):
  """Eq. (1) written out with explicit inverses (numpy)."""
  p = j_r.shape[1]
  k_rr = j_r @ j_r.T + lam * np.eye(j_r.shape[0])
  k_ff = j_f @ j_f.T + lam * np.eye(j_f.shape[0])
  th_fr = j_f @ j_r.T
  proj = np.eye(p) - j_r.T @ np.linalg.solve(k_rr, j_r)
  m = np.linalg.inv(k_ff - th_fr @ np.linalg.solve(k_rr, th_fr.T))
  v = r_f + th_fr @ np.linalg.solve(k_rr, -r_r)
  return proj @ j_f.T @ m @ v


@pytest.mark.parametrize("shape", [(6, 2, 3, 50), (20, 5, 4, 30)],
                         ids=["overparameterised", "underparameterised"])
@pytest.mark.parametrize("lam", [1e-3, 0.5, 10.0])
def test_dual_primal_ridge_agree(shape, lam):
  with jax.enable_x64(True):
    prob = _problem(0, *shape)
    ref = _reference(*prob, lam)
    lit = _eq1_literal(*prob, lam)
    dual, out_d = _dual(*prob, lam)
    primal, out_p = _primal(*prob, lam)
    scale = np.linalg.norm(ref)
    assert scale > 1e-3  # the update is not trivially zero
    np.testing.assert_allclose(lit, ref, atol=1e-9 * scale)
    np.testing.assert_allclose(dual, ref, atol=1e-9 * scale)
    np.testing.assert_allclose(primal, ref, atol=1e-9 * scale)
    assert all(bool(i.ok) for i in out_d.infos + out_p.infos)
    # V is the retrained linear model's residual on D_f.
    x_r = _ridge(prob[0], -prob[2], lam)
    np.testing.assert_allclose(out_d.v, prob[1] @ x_r + prob[3], atol=1e-9 * scale)


@pytest.mark.parametrize("shape", [(6, 2, 3, 50), (20, 5, 4, 30)],
                         ids=["overparameterised", "underparameterised"])
def test_zero_damping_is_the_pseudoinverse_limit(shape):
  with jax.enable_x64(True):
    prob = _problem(1, *shape)
    ref = _reference(*prob, 0.0)
    dual, out_d = _dual(*prob, 0.0)
    primal, out_p = _primal(*prob, 0.0)
    assert all(bool(i.ok) for i in out_d.infos + out_p.infos)
    scale = np.linalg.norm(ref)
    np.testing.assert_allclose(dual, ref, atol=1e-7 * scale)
    np.testing.assert_allclose(primal, ref, atol=1e-7 * scale)
    # ... and the limit of small positive damping.
    small = _reference(*prob, 1e-9)
    np.testing.assert_allclose(small, ref, atol=1e-4 * scale)


def test_jittable():
  with jax.enable_x64(True):
    j_r, j_f, r_r, r_f = _problem(3, 5, 2, 2, 12)
    f = jax.jit(lambda a, b, c, d: update.parameter_space(a, b, c, d, 0.2).delta)
    out = f(j_r.T @ j_r, j_f.T @ j_f, j_r.T @ r_r, j_f.T @ r_f)
    np.testing.assert_allclose(out, _reference(j_r, j_f, r_r, r_f, 0.2),
                               rtol=1e-8, atol=1e-10)


def test_forget_residual_norm_from_grams_equals_explicit():
  """‖J_f x + r_f‖ from A_f = J_fᵀJ_f, J_fᵀr_f and ‖r_f‖² alone, and the
  clip at 0 when rounding makes ‖V‖² slightly negative."""
  rng = np.random.default_rng(3)
  j_f = rng.normal(size=(12, 5))
  r_f = rng.normal(size=12)
  x = rng.normal(size=5)
  with jax.enable_x64(True):
    got = update.forget_residual_norm(jnp.asarray(j_f.T @ j_f),
                                      jnp.asarray(j_f.T @ r_f),
                                      jnp.asarray(x), jnp.asarray(r_f @ r_f))
    assert float(got) == pytest.approx(np.linalg.norm(j_f @ x + r_f), rel=1e-12)
    # V = 0 exactly (r_f = -J_f x), given with a rounding error below zero.
    r0 = -(j_f @ x)
    zero = update.forget_residual_norm(jnp.asarray(j_f.T @ j_f),
                                       jnp.asarray(j_f.T @ r0), jnp.asarray(x),
                                       jnp.asarray(r0 @ r0 - 1e-9))
    assert float(zero) == 0.0
