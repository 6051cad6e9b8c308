"""unlearn() on a real CNN: ResNet-20, PEFT = BatchNorm + head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fastntk_jax as F
from fastntk_jax import data
from fastntk_jax.models import zoo
from fastntk_jax.data import splits
from fastntk_jax.models import normalize_cifar


@pytest.fixture(scope="module")
def problem():
  m = zoo.resnet_bn_head(20, seed=0)
  xtr, ytr, _, _ = data.load_embedded_cifar10()
  idx = np.concatenate([np.flatnonzero(ytr == c)[:2] for c in range(10)])
  x, y = np.asarray(normalize_cifar(xtr[idx])), ytr[idx]
  retain, forget = splits.class_split(x, y, [0])
  # A perturbed w_D so that the update is not trivial.
  flat, unravel = ravel_pytree(m.init_params)
  w_d = unravel(flat + 0.05 * jax.random.normal(jax.random.PRNGKey(0), flat.shape))
  return m, w_d, retain, forget


# The w_0 variant (about 30 s) runs the same solvers on the same model; it is
# slow-marked to keep the default suite under 10 minutes. tests/test_unlearn.py
# checks linearize_at="w_0" with both solvers on small models.
@pytest.mark.parametrize("init", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_dual_equals_primal_on_resnet(problem, init):
  m, w_d, retain, forget = problem
  kw = dict(anchor=m.init_params if init else None,
            linearize_at="w_0" if init else "w_D", damping=0.5)
  dual = F.unlearn(m.apply_fn, w_d, retain, forget, solver="dual", **kw)
  primal = F.unlearn(m.apply_fn, w_d, retain, forget, solver="primal", **kw)
  d = ravel_pytree(dual.params)[0] - ravel_pytree(w_d)[0]
  p = ravel_pytree(primal.params)[0] - ravel_pytree(w_d)[0]
  assert float(jnp.linalg.norm(d)) > 1e-2
  assert float(jnp.linalg.norm(d - p)) < 2e-3 * float(jnp.linalg.norm(d))
  assert dual.solver == "dual" and primal.solver == "primal"
  assert dual.num_params == 2026 and dual.num_outputs == 10
  np.testing.assert_allclose(dual.forget_residual_norm,
                             primal.forget_residual_norm, rtol=1e-3)
  # NT implementation 2 gives the same kernel update.
  impl2 = F.unlearn(m.apply_fn, w_d, retain, forget, solver=F.KernelSpace(implementation=2), **kw)
  np.testing.assert_allclose(ravel_pytree(impl2.params)[0],
                             ravel_pytree(dual.params)[0], atol=1e-4)


def test_dense_kernel_over_budget_is_refused_before_work(problem):
  m, w_d, retain, forget = problem
  with pytest.raises(ValueError, match=r"memory_budget.*solver='primal'"):
    F.unlearn(m.apply_fn, w_d, retain, forget, solver="dual",
              memory_budget=10_000)
