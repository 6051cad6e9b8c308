"""Per-sample losses: gradients and curvature against JAX's own derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.core import objective


@pytest.mark.parametrize("name", ["mse", "ce"])
def test_gradient_and_hessian_match_autodiff(name):
  with jax.enable_x64(True):
    loss = objective.LOSSES[name]
    rng = np.random.default_rng(0)
    z = jnp.asarray(3 * rng.normal(size=(6, 4)))
    y = jnp.asarray(rng.integers(0, 4, 6))
    u = jnp.asarray(rng.normal(size=(6, 4)))
    one = lambda zi, yi: loss.value(zi[None], yi[None])[0]
    grad = jax.vmap(jax.grad(one))(z, y)
    hess = jax.vmap(jax.hessian(one))(z, y)
    np.testing.assert_allclose(loss.grad(z, y), grad, atol=1e-12)
    lf = loss.hess_factor(z)
    np.testing.assert_allclose(jnp.einsum("ncd,ned->nce", lf, lf), hess,
                               atol=1e-12)
    np.testing.assert_allclose(loss.hess_matvec(z, u),
                               jnp.einsum("ncd,nd->nc", hess, u), atol=1e-12)
    assert loss.quadratic == (name == "mse")


def test_cross_entropy_value_is_the_usual_one():
  z = jnp.asarray([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  y = jnp.asarray([0, 2])
  want = -jnp.log(jax.nn.softmax(z, -1)[jnp.arange(2), y])
  np.testing.assert_allclose(objective.cross_entropy.value(z, y), want,
                             rtol=1e-6)
  np.testing.assert_allclose(objective.squared_error.value(z, y),
                             0.5 * jnp.sum((z - jax.nn.one_hot(y, 3)) ** 2, -1))
