import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax.core.solve import psd_solve


def test_cholesky_solve_matches_numpy():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 4))
    k = a @ a.T  # rank 4: singular, needs damping
    b = rng.normal(size=(7, 2))
    x, info = psd_solve(jnp.asarray(k), jnp.asarray(b), 0.3)
    np.testing.assert_allclose(x, np.linalg.solve(k + 0.3 * np.eye(7), b), rtol=1e-10)
    assert bool(info.ok) and float(info.relative_residual) < 1e-12
    true_cond = np.linalg.cond(k + 0.3 * np.eye(7))
    assert float(info.cond) <= true_cond * (1 + 1e-9)  # a lower bound


def test_pinv_solve_rank_and_value():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(9, 3))
    k = a @ a.T
    b = rng.normal(size=9)
    x, info = psd_solve(jnp.asarray(k), jnp.asarray(b), 0.0)
    np.testing.assert_allclose(x, np.linalg.pinv(k) @ b, rtol=1e-8, atol=1e-10)
    assert int(info.rank) == 3 and bool(info.ok)


def test_failed_factorisation_is_reported_not_nan():
  k = jnp.asarray([[1.0, 2.0], [2.0, 1.0]])  # indefinite: Cholesky fails
  x, info = psd_solve(k, jnp.ones(2), 1e-6)
  assert not bool(info.ok)
