"""Tangent mode: the tangent model is linear, and Fast-NTK unlearns it exactly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.scipy.optimize import minimize

import fastntk_jax as F
from fastntk_jax import peft
from fastntk_jax.training import train
from fastntk_jax.core.tangent import tangent_model


class _TinyCNN(nn.Module):
  """Conv → BatchNorm → ReLU → mean pool → Dense: a CNN with BN + head PEFT."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def _cnn(seed=0):
  """A float64 CNN whose BatchNorm statistics are frozen (inference mode)."""
  rng = np.random.default_rng(seed)
  module = _TinyCNN()
  x = jnp.asarray(rng.normal(size=(30, 6, 6, 2)))
  variables = module.init(jax.random.PRNGKey(seed), x)
  variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                     variables)
  stats = variables["batch_stats"]
  variables = dict(variables, batch_stats=jax.tree_util.tree_map(
      lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape)) ** 2, stats))
  pred = peft.any_of(peft.batchnorm(variables), peft.head("head"))
  apply_fn, w0, _ = peft.make_apply_fn(module, variables, pred)
  y = rng.integers(0, 3, 30)
  return apply_fn, w0, x, y


def _train_to_convergence(apply_fn, w0, x, y, lam, loss):
  """argmin Σ ℓ(f(w, x_i), y_i) + (λ/2)‖w − w_0‖² by BFGS (jax.scipy) and
  Newton steps with jax.hessian: the exact retrain, no library solver."""
  flat0, unravel = ravel_pytree(w0)
  onehot = jax.nn.one_hot(y, 3)

  def phi(d):
    z = apply_fn(unravel(flat0 + d), x)
    if loss == "ce":
      data = jnp.sum(jax.nn.logsumexp(z, -1) - jnp.sum(z * onehot, -1))
    else:
      data = 0.5 * jnp.sum((z - onehot) ** 2)
    return data + 0.5 * lam * d @ d

  d = minimize(phi, jnp.zeros_like(flat0), method="BFGS", tol=1e-14).x
  grad, hess = jax.jit(jax.grad(phi)), jax.jit(jax.hessian(phi))
  for _ in range(6):
    d = d - jnp.linalg.solve(hess(d), grad(d))
  assert float(jnp.linalg.norm(grad(d))) < 1e-9
  return unravel(flat0 + d)


def test_tangent_model_is_the_first_order_expansion():
  with jax.enable_x64(True):
    apply_fn, w0, x, _ = _cnn()
    lin = tangent_model(apply_fn, w0)
    np.testing.assert_allclose(lin(w0, x), apply_fn(w0, x), atol=1e-12)
    flat0, unravel = ravel_pytree(w0)
    rng = np.random.default_rng(1)
    u = jnp.asarray(rng.normal(size=flat0.shape))
    v = jnp.asarray(rng.normal(size=flat0.shape))
    jac = F.kernels.jacobian(apply_fn, w0, x)
    got = lin(unravel(flat0 + 0.7 * u - 2.0 * v), x).reshape(-1)
    want = apply_fn(w0, x).reshape(-1) + jac @ (0.7 * u - 2.0 * v)
    np.testing.assert_allclose(got, want, atol=1e-10)
    # The network itself is not linear in these parameters.
    far = apply_fn(unravel(flat0 + 0.7 * u - 2.0 * v), x).reshape(-1)
    assert float(jnp.abs(far - want).max()) > 1e-2


_SLOW = pytest.mark.slow  # the other three pairings; ~20 s each on 2 cores


@pytest.mark.parametrize("loss, kind", [
    ("ce", "class"),
    pytest.param("mse", "random", marks=_SLOW),
    pytest.param("ce", "random", marks=_SLOW),
    pytest.param("mse", "class", marks=_SLOW)])
def test_unlearning_the_tangent_model_equals_retraining_it(loss, kind):
  """A tangent CNN trained to convergence on D is unlearned to the tangent
  model retrained on D_r, for both losses, class and random forgetting;
  the network's own apply_fn linearised at w_0 gives the same update."""
  with jax.enable_x64(True):
    apply_fn, w0, x, y = _cnn(2)
    lin = tangent_model(apply_fn, w0)
    lam = 0.4
    forget = (y == 2) if kind == "class" else (np.arange(30) % 4 == 1)
    w_d = _train_to_convergence(lin, w0, x, y, lam, loss)
    w_r = _train_to_convergence(lin, w0, x[~forget], y[~forget], lam, loss)
    flat = lambda t: ravel_pytree(t)[0]
    scale = float(jnp.linalg.norm(flat(w_r)))
    assert float(jnp.linalg.norm(flat(w_d) - flat(w_r))) > 1e-2 * scale
    retain, forget_set = (x[~forget], y[~forget]), (x[forget], y[forget])
    runs = [(lin, "w_D", s) for s in ("primal", "dual", "cg")]
    runs += [(apply_fn, "w_0", "primal")]
    for fn, lin_at, solver in runs:
      res = F.unlearn(fn, w_d, retain, forget_set, anchor=w0,
                      linearize_at=lin_at, damping=lam, loss=loss,
                      solver=(F.MatrixFree(cg_tol=1e-12) if solver == "cg"
                              else solver))
      gap = float(jnp.linalg.norm(flat(res.params) - flat(w_r))) / scale
      assert gap < 1e-6, (lin_at, solver, gap)


def test_finetune_option_trains_the_tangent_model_with_the_proximal_term():
  with jax.enable_x64(True):
    apply_fn, w0, x, y = _cnn(3)
    lam = 2.0
    cfg = train.FinetuneConfig(loss="ce", epochs=400, batch_size=30,
                               learning_rate=3e-2, augment=False,
                               proximal=lam, tangent=True)
    res = train.finetune(apply_fn, w0, x, y, config=cfg)
    rng = np.random.default_rng(4)
    probe = jax.tree_util.tree_map(
        lambda a: a + 0.1 * jnp.asarray(rng.normal(size=a.shape)), w0)
    np.testing.assert_allclose(res.apply_fn(probe, x),
                               tangent_model(apply_fn, w0)(probe, x),
                               atol=1e-12)
    want = _train_to_convergence(tangent_model(apply_fn, w0), w0, x, y, lam,
                                 "ce")
    flat = lambda t: ravel_pytree(t)[0]
    gap = float(jnp.linalg.norm(flat(res.params) - flat(want)))
    assert gap < 1e-2 * float(jnp.linalg.norm(flat(want) - flat(w0)))
    # Without the proximal term the same recipe ends elsewhere.
    free = train.finetune(apply_fn, w0, x, y,
                          config=cfg._replace(proximal=0.0)).params
    assert float(jnp.linalg.norm(flat(free) - flat(want))) > 10 * gap
    # The reported loss is the objective: mean CE + (λ/N)/2‖w − w_0‖².
    z = res.apply_fn(res.params, x)
    mean_ce = float(jnp.mean(jax.nn.logsumexp(z, -1)
                             - z[jnp.arange(30), y]))
    prox = lam / 30 * float(train.proximal_term(res.params, w0))
    assert res.losses[-1] == pytest.approx(mean_ce + prox, rel=1e-3)
    # An ordinary fine-tune returns the network's own apply_fn.
    plain = train.finetune(apply_fn, w0, x, y, config=cfg._replace(
        tangent=False, epochs=1))
    assert plain.apply_fn is apply_fn


def test_bad_recipe_options_are_refused():
  with jax.enable_x64(True):
    apply_fn, w0, x, y = _cnn(5)
    with pytest.raises(ValueError, match="config.proximal must be"):
      train.finetune(apply_fn, w0, x, y,
                     config=train.FinetuneConfig(proximal=-1.0))
    with pytest.raises(ValueError, match="config.tangent must be"):
      train.finetune(apply_fn, w0, x, y,
                     config=train.FinetuneConfig(tangent="yes"))
