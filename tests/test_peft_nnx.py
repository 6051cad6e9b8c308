"""Flax NNX models: PEFT split, kernels and updates against explicit Jacobians.

The references are forward passes written by hand on the models' arrays (no
NNX), differentiated with ``jax.jacrev``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from fastntk_jax import unlearn

from fastntk_jax.core import kernels

from fastntk_jax.peft import nnx as peft_nnx

C = 3
F64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)


class CNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs, **F64)
    self.bn1 = nnx.BatchNorm(4, rngs=rngs, **F64)
    self.conv2 = nnx.Conv(4, 5, (3, 3), strides=2, rngs=rngs, **F64)
    self.bn2 = nnx.BatchNorm(5, rngs=rngs, **F64)
    self.head = nnx.Linear(5, C, rngs=rngs, **F64)

  def __call__(self, x):
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = jax.nn.relu(self.bn2(self.conv2(x)))
    return self.head(x.mean((1, 2)))


def _cnn():
  model = CNN(nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for bn in (model.bn1, model.bn2):  # statistics that are not 0 / 1
    bn.mean.set_value(jnp.asarray(rng.normal(size=bn.mean[...].shape) * 0.3))
    bn.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, size=bn.var[...].shape)))
    bn.scale.set_value(jnp.asarray(1 + 0.2 * rng.normal(size=bn.scale[...].shape)))
    bn.bias.set_value(jnp.asarray(0.2 * rng.normal(size=bn.bias[...].shape)))
  return model


def _ref_cnn(model, p, x):
  """The CNN by hand: SAME convolutions, inference-mode BatchNorm."""
  def conv(m, x, stride):
    y = jax.lax.conv_general_dilated(x, m.kernel[...], (stride, stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + m.bias[...]

  def bn(m, q, x):
    return (x - m.mean[...]) / jnp.sqrt(m.var[...] + m.epsilon) * q["scale"] + q["bias"]

  x = jax.nn.relu(bn(model.bn1, p["bn1"], conv(model.conv1, x, 1)))
  x = jax.nn.relu(bn(model.bn2, p["bn2"], conv(model.conv2, x, 2)))
  return x.mean((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]


def _jac(fn, params, x):
  flat, unravel = ravel_pytree(params)
  return jax.jacrev(lambda f: fn(unravel(f), x).reshape(-1))(flat)


def _eq1(jac, r, rows, lam):
  """Eq. (1) with the residual at the anchor, explicitly."""
  j_r, r_r = jac[rows], r[rows]
  eye = jnp.eye(jac.shape[1])
  x_r = -jnp.linalg.solve(j_r.T @ j_r + lam * eye, j_r.T @ r_r)
  x_d = -jnp.linalg.solve(jac.T @ jac + lam * eye, jac.T @ r)
  return x_r - x_d


def _unlearn_matches_eq1(apply_fn, ref_fn, w0, w_d, x, y, lam=0.3):
  jac = _jac(ref_fn, w_d, x)
  shift = ravel_pytree(w0)[0] - ravel_pytree(w_d)[0]
  r = (ref_fn(w_d, x) - jax.nn.one_hot(y, C)).reshape(-1) + jac @ shift
  rows = np.repeat(y != 0, C)
  want = ravel_pytree(w_d)[0] + _eq1(jac, r, rows, lam)
  res = unlearn(apply_fn, w_d, (x[y != 0], y[y != 0]), (x[y == 0], y[y == 0]),
                anchor=w0, damping=lam)
  np.testing.assert_allclose(ravel_pytree(res.params)[0], want, atol=1e-7)
  return res


def _perturbed(tree, scale, seed):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [a + scale * jnp.asarray(rng.normal(size=a.shape), a.dtype)
                for a in leaves])


def test_cnn_batchnorm_and_head_kernels_and_update_match_explicit_jacobians():
  with jax.enable_x64(True):
    model = _cnn()
    sel = peft_nnx.make_apply_fn(model, peft_nnx.any_of(peft_nnx.batchnorm(model),
                                                        peft_nnx.head()))
    w0 = sel.init_params
    assert set(w0) == {"bn1", "bn2", "head"} and set(w0["bn1"]) == {"scale", "bias"}
    assert sel.num_peft == 2 * 4 + 2 * 5 + 5 * C + C
    assert sel.num_total == sel.num_peft + 3 * 3 * 3 * 4 + 4 + 3 * 3 * 4 * 5 + 5
    x = jnp.asarray(np.random.default_rng(1).normal(size=(9, 6, 6, 3)))
    y = np.arange(9) % C
    # Inference mode: the running statistics, as the hand-written forward.
    np.testing.assert_allclose(sel.apply_fn(w0, x), _ref_cnn(model, w0, x),
                               rtol=1e-10, atol=1e-10)
    assert model.bn1.use_running_average is False  # the user's model untouched
    j1 = _jac(lambda p, x: _ref_cnn(model, p, x), w0, x)
    j2 = _jac(lambda p, x: _ref_cnn(model, p, x), w0, x[:4])
    np.testing.assert_allclose(kernels.ntk(sel.apply_fn, w0, x, x[:4]), j1 @ j2.T,
                               rtol=1e-9, atol=1e-10)
    w_d = _perturbed(w0, 0.3, 2)
    res = _unlearn_matches_eq1(sel.apply_fn, lambda p, x: _ref_cnn(model, p, x),
                               w0, w_d, x, y)
    # The unlearned parameters go back into the model.
    peft_nnx.update(model, res.params)
    model.eval()
    np.testing.assert_allclose(model(x), sel.apply_fn(res.params, x),
                               rtol=1e-10, atol=1e-10)


class PromptViT(nnx.Module):
  """One attention block with prefix prompts in keys and values, and a head."""

  def __init__(self, rngs, width=8, heads=2, num_prompts=3, patch=2):
    self.patch = patch
    self.heads = heads
    self.embed = nnx.Linear(patch * patch * 3, width, rngs=rngs, **F64)
    self.query = nnx.Linear(width, width, rngs=rngs, **F64)
    self.key = nnx.Linear(width, width, rngs=rngs, **F64)
    self.value = nnx.Linear(width, width, rngs=rngs, **F64)
    init = nnx.initializers.normal(0.5)
    self.prompt_k = nnx.Param(init(rngs.params(), (num_prompts, width), jnp.float64))
    self.prompt_v = nnx.Param(init(rngs.params(), (num_prompts, width), jnp.float64))
    self.norm = nnx.LayerNorm(width, rngs=rngs, **F64)
    self.head = nnx.Linear(width, C, rngs=rngs, **F64)

  def tokens(self, x):
    n, s, _, c = x.shape
    g = s // self.patch
    t = x.reshape(n, g, self.patch, g, self.patch, c).transpose(0, 1, 3, 2, 4, 5)
    return t.reshape(n, g * g, -1)

  def __call__(self, x):
    z = self.embed(self.tokens(x))
    n, s, w = z.shape
    d = w // self.heads
    pk = jnp.broadcast_to(self.prompt_k[...], (n,) + self.prompt_k[...].shape)
    pv = jnp.broadcast_to(self.prompt_v[...], (n,) + self.prompt_v[...].shape)
    q = self.query(z).reshape(n, s, self.heads, d)
    k = jnp.concatenate([pk, self.key(z)], 1).reshape(n, -1, self.heads, d)
    v = jnp.concatenate([pv, self.value(z)], 1).reshape(n, -1, self.heads, d)
    a = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(d), -1)
    z = z + jnp.einsum("nhqk,nkhd->nqhd", a, v).reshape(n, s, w)
    return self.head(self.norm(z).mean(1))


def _ref_vit(model, p, x):
  """The prompt block by hand on the arrays, one head at a time."""
  lin = lambda m, t: t @ m.kernel[...] + m.bias[...]
  z = lin(model.embed, model.tokens(x))
  n, s, w = z.shape
  d = w // model.heads
  q = lin(model.query, z)
  k = jnp.concatenate([jnp.broadcast_to(p["prompt_k"], (n,) + p["prompt_k"].shape),
                       lin(model.key, z)], 1)
  v = jnp.concatenate([jnp.broadcast_to(p["prompt_v"], (n,) + p["prompt_v"].shape),
                       lin(model.value, z)], 1)
  out = []
  for h in range(model.heads):
    sl = slice(h * d, (h + 1) * d)
    a = jax.nn.softmax(q[..., sl] @ jnp.swapaxes(k[..., sl], 1, 2) / math.sqrt(d), -1)
    out.append(a @ v[..., sl])
  z = z + jnp.concatenate(out, -1)
  mu = z.mean(-1, keepdims=True)
  var = ((z - mu) ** 2).mean(-1, keepdims=True)
  z = (z - mu) / jnp.sqrt(var + model.norm.epsilon) * model.norm.scale[...]
  z = z + model.norm.bias[...]
  return z.mean(1) @ p["head"]["kernel"] + p["head"]["bias"]


def test_vit_prompts_and_head_kernels_and_update_match_explicit_jacobians():
  with jax.enable_x64(True):
    model = PromptViT(nnx.Rngs(3))
    sel = peft_nnx.make_apply_fn(model, peft_nnx.any_of(peft_nnx.prompts(),
                                                        peft_nnx.head()))
    w0 = sel.init_params
    assert set(w0) == {"prompt_k", "prompt_v", "head"}
    x = jnp.asarray(np.random.default_rng(4).normal(size=(9, 4, 4, 3)))
    y = np.arange(9) % C
    ref = lambda p, x: _ref_vit(model, p, x)
    np.testing.assert_allclose(sel.apply_fn(w0, x), ref(w0, x), rtol=1e-10,
                               atol=1e-10)
    j = _jac(ref, w0, x)
    np.testing.assert_allclose(kernels.ntk(sel.apply_fn, w0, x), j @ j.T,
                               rtol=1e-9, atol=1e-10)
    _unlearn_matches_eq1(sel.apply_fn, ref, w0, _perturbed(w0, 0.3, 5), x, y)


class LoraMLP(nnx.Module):
  def __init__(self, rngs, rank=2):
    self.hidden = nnx.LoRALinear(4, 6, lora_rank=rank, rngs=rngs,
                                 lora_param_dtype=jnp.float64, **F64)
    self.out = nnx.Linear(6, C, rngs=rngs, **F64)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def test_lora_factors_end_to_end():
  with jax.enable_x64(True):
    model = LoraMLP(nnx.Rngs(6))
    sel = peft_nnx.make_apply_fn(model, peft_nnx.lora())
    w0 = sel.init_params
    lo = w0["hidden"]["lora"]
    assert set(lo) == {"lora_a", "lora_b"} and float(jnp.abs(lo["lora_b"]).max()) == 0

    def ref(p, x):
      h = model.hidden
      pre = x @ h.kernel[...] + h.bias[...]
      pre = pre + x @ p["hidden"]["lora"]["lora_a"] @ p["hidden"]["lora"]["lora_b"]
      return jnp.tanh(pre) @ model.out.kernel[...] + model.out.bias[...]

    x = jnp.asarray(np.random.default_rng(7).normal(size=(12, 4)))
    y = np.arange(12) % C
    np.testing.assert_allclose(sel.apply_fn(w0, x), ref(w0, x), rtol=1e-10)
    # B = 0 at w_0: the logits do not depend on A there.
    j0 = kernels.jacobian(sel.apply_fn, w0, x)
    n_a = lo["lora_a"].size
    flat_names = [k for k, _ in jax.tree_util.tree_flatten_with_path(w0)[0]]
    assert "lora_a" in str(flat_names[0])  # ravel order: lora_a first
    assert float(jnp.abs(j0[:, :n_a]).max()) == 0.0
    assert float(jnp.abs(j0[:, n_a:]).max()) > 0.0
    # After fine-tuning (here: a perturbed B) A counts, and the update is Eq. (1).
    w_d = _perturbed(w0, 0.5, 8)
    assert float(jnp.abs(kernels.jacobian(sel.apply_fn, w_d, x)[:, :n_a]).max()) > 1e-3
    res = _unlearn_matches_eq1(sel.apply_fn, ref, w0, w_d, x, y)
    peft_nnx.update(model, res.params)
    np.testing.assert_allclose(model(x), sel.apply_fn(res.params, x), rtol=1e-10)


def test_bad_filters_and_models_are_named():
  with jax.enable_x64(True):  # the test models are float64
    model = _cnn()
    with pytest.raises(ValueError, match="selects no variable"):
      peft_nnx.make_apply_fn(model, peft_nnx.head("classifier"))
    with pytest.raises(ValueError, match="not parameters"):
      peft_nnx.make_apply_fn(model, nnx.BatchStat)
    with pytest.raises(TypeError, match="nnx.Module"):
      peft_nnx.make_apply_fn({"params": {}}, nnx.Param)
    with pytest.raises(ValueError, match="no nnx.BatchNorm"):
      peft_nnx.batchnorm(LoraMLP(nnx.Rngs(0)))
    sel = peft_nnx.make_apply_fn(model, peft_nnx.head())
    with pytest.raises(KeyError, match="not a parameter"):
      peft_nnx.update(model, {"nohead": {"kernel": jnp.zeros((5, C))}})
    with pytest.raises(ValueError, match="shape"):
      peft_nnx.update(model, {"head": {"kernel": jnp.zeros((4, C)),
                                       "bias": sel.init_params["head"]["bias"]}})
