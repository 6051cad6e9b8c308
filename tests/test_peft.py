import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax import peft


def _vars():
  return {
      "params": {
          "conv": {"kernel": jnp.ones((3, 3, 3, 4))},
          "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
          "ln": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},  # no stats: not BN
          "block": {"prompt_k": jnp.zeros((2, 4)), "dense": {"kernel": jnp.ones((4, 4))}},
          "head": {"kernel": jnp.ones((4, 10)), "bias": jnp.zeros(10)},
      },
      "batch_stats": {"bn": {"mean": jnp.zeros(4), "var": jnp.ones(4)}},
  }


def _paths(tree, prefix=()):
  out = set()
  for k, v in tree.items():
    out |= _paths(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,)}
  return out


def test_split_merge_round_trip_and_predicates():
  v = _vars()
  pred = peft.any_of(peft.batchnorm(v), peft.head())
  p, f = peft.split(v, pred)
  assert _paths(p) == {("params", "bn", "scale"), ("params", "bn", "bias"),
                       ("params", "head", "kernel"), ("params", "head", "bias")}
  assert ("params", "ln", "scale") in _paths(f)
  assert ("batch_stats", "bn", "mean") in _paths(f)  # statistics stay frozen
  m = peft.merge(p, f)
  assert _paths(m) == _paths(v)
  for path in _paths(v):
    a, b = m, v
    for k in path:
      a, b = a[k], b[k]
    assert a is b


def test_prompt_predicate():
  p, _ = peft.split(_vars(), peft.prompts())
  assert _paths(p) == {("params", "block", "prompt_k")}


def test_errors():
  v = _vars()
  with pytest.raises(ValueError, match="selected no parameter"):
    peft.split(v, peft.head("classifier"))
  with pytest.raises(TypeError, match="variables"):
    peft.split([1, 2], peft.head())
  p, f = peft.split(v, peft.head())
  with pytest.raises(ValueError, match="in both peft and frozen"):
    peft.merge(p, v)


def test_make_apply_fn_uses_peft_values():
  import jax
  from fastntk_jax.models import CifarResNet
  model = CifarResNet(depth=20)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  apply_fn, w, frozen = peft.make_apply_fn(
      model, v, peft.any_of(peft.batchnorm(v), peft.head()))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  np.testing.assert_allclose(apply_fn(w, x), model.apply(v, x), atol=1e-6)
  w2 = jax.tree_util.tree_map(lambda a: a * 0, w)
  np.testing.assert_allclose(apply_fn(w2, x), 0.0, atol=1e-6)  # zero head
  assert peft.count_params(w) == 2026
