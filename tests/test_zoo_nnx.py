"""The zoo's models in Flax NNX compute what the Linen ports compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fastntk_jax as F
from fastntk_jax import data
from fastntk_jax.models import resnet_nnx
from fastntk_jax.models import zoo
from fastntk_jax.peft import nnx as peft_nnx


@pytest.fixture(scope="module")
def images():
  x, y, _, _ = data.load_embedded_cifar10()
  idx = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(10)])
  return x[idx], y[idx]


def _both(name, **kw):
  module, variables, _ = zoo.load_backbone(
      name, num_prompts=kw.get("num_prompts", 0), seed=3)
  lin = zoo.peft_model(name, module, variables, num_classes=10, seed=3)
  net = zoo.nnx_model(name, seed=3, **kw)
  return lin, net, peft_nnx.make_apply_fn(net.model, net.peft_filter)


# About 40 s (the full ResNet-20 twice, Linen and NNX); slow-marked to keep the
# default suite under 10 minutes. tests/test_peft_nnx.py checks NNX BatchNorm +
# head kernels and updates against explicit Jacobians, and the loader is
# checked by test_loading_linen_variables_names_what_is_missing_or_misshapen.
@pytest.mark.slow
def test_nnx_resnet20_is_the_linen_resnet20(images):
  lin, net, nn_peft = _both("resnet20")
  assert isinstance(net.model, resnet_nnx.CifarResNet) and net.pretrained
  assert (nn_peft.num_peft, nn_peft.num_total) == (lin.num_peft, lin.num_total)
  assert nn_peft.num_peft == 2026
  x = np.asarray(zoo.preprocess_fn("resnet20")(jnp.asarray(images[0])))
  a = lin.apply_fn(lin.init_params, x)
  b = nn_peft.apply_fn(nn_peft.init_params, x)
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  # The same PEFT leaves (names and shapes), so the same Jacobian columns.
  shapes = lambda tree: sorted((p, np.shape(v)) for p, v in zip(
      _paths(tree), jax.tree_util.tree_leaves(tree)))
  assert shapes(nn_peft.init_params) == shapes(lin.init_params["params"])
  # Equal kernels and equal f give equal updates; that unlearn's update on
  # an NNX model is Eq. (1) is test_peft_nnx's. Here: it goes back in.
  retain = (x[2:], images[1][2:])
  forget = (x[:2], images[1][:2])
  rb = F.unlearn(nn_peft.apply_fn, nn_peft.init_params, retain, forget,
                 anchor=nn_peft.init_params, solver="dual")
  assert rb.delta_norm > 1e-3
  peft_nnx.update(net.model, rb.params)
  np.testing.assert_allclose(net.model(x), nn_peft.apply_fn(rb.params, x),
                             rtol=1e-5, atol=1e-6)


# ViT-Tiny/4 in both APIs (~40 s on 2 cores); the bridge, the loader and the
# prompt filter are covered by test_a_bridged_linen_vit_loads_its_variables.
@pytest.mark.slow
def test_nnx_vit_wraps_the_linen_vit_with_prompts_and_head(images):
  lin, net, nn_peft = _both("vit_tiny_4", num_prompts=2)
  paths = {"/".join(p) for p in _paths(nn_peft.init_params)}
  assert any("prompt_k" in p for p in paths) and any(
      p.startswith("head/") for p in paths)
  assert not any("query" in p for p in paths)
  assert nn_peft.num_peft == lin.num_peft
  x = np.asarray(zoo.preprocess_fn("vit_tiny_4")(jnp.asarray(images[0][:4])))
  np.testing.assert_allclose(nn_peft.apply_fn(nn_peft.init_params, x),
                             lin.apply_fn(lin.init_params, x),
                             rtol=1e-5, atol=1e-6)


def test_a_bridged_linen_vit_loads_its_variables():
  from fastntk_jax.models.vit import ViT
  module = ViT(num_classes=3, patch_size=8, width=16, depth=1, num_heads=2,
               mlp_dim=32, num_prompts=2, image_size=16)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3)))
  variables = module.init(jax.random.PRNGKey(0), x[:1])
  model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(5))  # other random init
  nnx.bridge.lazy_init(model, jnp.zeros((1, 16, 16, 3)))
  assert not np.allclose(model(x), module.apply(variables, x))
  resnet_nnx.load_linen_variables(model, variables)
  np.testing.assert_allclose(model(x), module.apply(variables, x), rtol=1e-5,
                             atol=1e-6)
  sel = peft_nnx.make_apply_fn(model, peft_nnx.any_of(peft_nnx.prompts(),
                                                      peft_nnx.head()))
  paths = {"/".join(p) for p in _paths(sel.init_params)}
  assert paths == {"block0/attn/prompt_k", "block0/attn/prompt_v",
                   "head/bias", "head/kernel"}
  np.testing.assert_allclose(sel.apply_fn(sel.init_params, x),
                             module.apply(variables, x), rtol=1e-5, atol=1e-6)


def _paths(tree):
  return [tuple(str(getattr(k, "key", k)) for k in p)
          for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_loading_linen_variables_names_what_is_missing_or_misshapen():
  model = resnet_nnx.CifarResNet(20, 10, rngs=nnx.Rngs(0))
  _, variables = zoo.load_backbone("resnet20")[:2]
  params = dict(variables["params"])
  del params["head"]
  with pytest.raises(KeyError, match="head/bias|head/kernel"):
    resnet_nnx.load_linen_variables(
        model, {"params": params, "batch_stats": variables["batch_stats"]})
  params = dict(variables["params"])
  params["head"] = {"kernel": np.zeros((64, 3)), "bias": np.zeros(3)}
  with pytest.raises(ValueError, match="head"):
    resnet_nnx.load_linen_variables(
        model, {"params": params, "batch_stats": variables["batch_stats"]})
