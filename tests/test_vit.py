"""Tests for fastntk_jax.models.vit: an independent numpy forward pass, prompts, counts, PEFT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from fastntk_jax import peft
from fastntk_jax.models.vit import (
  VIT_CONFIGS,
  VIT_MODELS,
  PromptAttention,
  ViT,
  normalize_vit,
  vit,
  vit_by_name,
)


SMALL = dict(num_classes=5, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
             image_size=16)


def _init(model, seed=0, n=3):
  x = jax.random.normal(jax.random.PRNGKey(seed + 100), (n, model.image_size, model.image_size, 3))
  variables = model.init(jax.random.PRNGKey(seed), x)
  return x, variables


def _perturb(variables, seed=1, scale=0.1):
  """Adds noise to every leaf so that no bias, LN shift or class token is trivially zero."""
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _paths(tree, prefix=()):
  out = set()
  for k, v in tree.items():
    out |= _paths(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,)}
  return out


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


# ----------------------------------------------------------------- numpy reference

def _np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


def _ref_attention(x, p, num_heads):
  """Standard softmax attention, one head and one sample at a time; prompts prepended
  to the projected keys/values when present."""
  n, s, w = x.shape
  d = w // num_heads
  q, k, v = _dense(x, p["query"]), _dense(x, p["key"]), _dense(x, p["value"])
  out = np.zeros_like(q)
  for b in range(n):
    kb, vb = k[b], v[b]
    if "prompt_k" in p:
      kb = np.concatenate([p["prompt_k"], kb], 0)
      vb = np.concatenate([p["prompt_v"], vb], 0)
    for h in range(num_heads):
      sl = slice(h * d, (h + 1) * d)
      logits = q[b][:, sl] @ kb[:, sl].T / np.sqrt(d)  # (s, L_p + s)
      a = np.exp(logits - logits.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      out[b][:, sl] = a @ vb[:, sl]
  return _dense(out, p["out"])


def _ref_vit(params, x, patch, num_heads):
  """ViT forward pass (Dosovitskiy et al. 2021, Eqs. 1-4) in float64 numpy."""
  params, x = _np(params), np.asarray(x, np.float64)
  n, hgt, wid, c = x.shape
  g = hgt // patch
  # Patches in row-major order, pixels ordered (row, col, channel) like the kernel.
  patches = x.reshape(n, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(n, g * g, patch * patch * c)
  kernel = params["patch_embed"]["kernel"]
  tokens = patches @ kernel.reshape(-1, kernel.shape[-1]) + params["patch_embed"]["bias"]
  cls = np.broadcast_to(params["cls"], (n, 1, tokens.shape[-1]))
  z = np.concatenate([cls, tokens], 1) + params["pos_embed"]
  i = 0
  while f"block{i}" in params:
    blk = params[f"block{i}"]
    z = z + _ref_attention(_ln(z, blk["ln1"]), blk["attn"], num_heads)
    h = _dense(_ln(z, blk["ln2"]), blk["mlp"]["fc1"])
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    z = z + _dense(h, blk["mlp"]["fc2"])
    i += 1
  return _dense(_ln(z, params["final_ln"])[:, 0], params["head"])


# ----------------------------------------------------------------- forward pass

@pytest.mark.parametrize("num_prompts", [0, 3])
def test_forward_matches_numpy_reference(num_prompts):
  model = ViT(**SMALL, num_prompts=num_prompts)
  x, variables = _init(model)
  variables = _perturb(variables)
  got = np.asarray(model.apply(variables, x))
  want = _ref_vit(variables["params"], x, SMALL["patch_size"], SMALL["num_heads"])
  assert got.shape == (3, SMALL["num_classes"]) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  has_prompts = any("prompt" in "/".join(p) for p in _paths(variables))
  assert has_prompts == (num_prompts > 0)


def test_prompt_attention_matches_reference():
  n, s, w, heads, lp = 2, 5, 12, 3, 4
  x = jax.random.normal(jax.random.PRNGKey(0), (n, s, w))
  module = PromptAttention(num_heads=heads, num_prompts=lp)
  params = _perturb(module.init(jax.random.PRNGKey(1), x))["params"]
  assert params["prompt_k"].shape == params["prompt_v"].shape == (lp, w)
  got = module.apply({"params": params}, x)
  want = _ref_attention(np.asarray(x, np.float64), _np(params), heads)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  # The reference without prompts differs: the prompts take part in the softmax.
  plain = {k: v for k, v in _np(params).items() if not k.startswith("prompt")}
  assert np.max(np.abs(_ref_attention(np.asarray(x, np.float64), plain, heads) - want)) > 1e-3


def test_zero_prompts_is_the_prompt_model_without_prompt_leaves():
  _, v0 = _init(ViT(**SMALL, num_prompts=0))
  _, v3 = _init(ViT(**SMALL, num_prompts=3))
  shapes = lambda v: {p: jnp.shape(_get(v, p)) for p in _paths(v)}
  s0, s3 = shapes(v0), shapes(v3)
  prompt_paths = {p for p in s3 if "prompt" in p[-1]}
  assert len(prompt_paths) == 2 * SMALL["depth"]
  assert s0 == {p: s for p, s in s3.items() if p not in prompt_paths}


def test_prompts_change_outputs():
  model = ViT(**SMALL, num_prompts=3)
  x, variables = _init(model)
  base = model.apply(variables, x)
  for leaf in ("prompt_k", "prompt_v"):
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])  # copy
    params["block0"]["attn"][leaf] = params["block0"]["attn"][leaf] + 1.0
    changed = model.apply({"params": params}, x)
    assert float(jnp.max(jnp.abs(changed - base))) > 1e-4, leaf


def test_output_shape_and_train_flag_is_inert():
  model = ViT(**SMALL, num_prompts=2)
  x, variables = _init(model, n=4)
  y = model.apply(variables, x)
  assert y.shape == (4, SMALL["num_classes"])
  np.testing.assert_array_equal(np.asarray(y), np.asarray(model.apply(variables, x, train=True)))
  assert set(variables) == {"params"}  # no batch_stats: nothing to mutate


# ----------------------------------------------------------------- sizes

def _vit_param_count(width, depth, mlp, patch, image, classes, lp):
  """Closed form: patch embed + cls + pos + depth * block + final LN + head."""
  tokens = (image // patch) ** 2 + 1
  patch_embed = patch * patch * 3 * width + width
  block = (2 * width                      # ln1
           + 3 * (width * width + width)  # query, key, value
           + width * width + width        # out
           + 2 * width                    # ln2
           + width * mlp + mlp            # fc1
           + mlp * width + width          # fc2
           + 2 * lp * width)              # prompt_k, prompt_v
  return (patch_embed + width + tokens * width + depth * block + 2 * width
          + width * classes + classes)


def _shapes_count(model, tree=None):
  if tree is None:
    tree = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, model.image_size, model.image_size, 3)))
  return tree, int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(tree)))

# name -> (total, prompts + head) with L_p = 10 and 10 classes; the ratio is
# below 0.4 % only for base; tiny (0.89 %) and small (0.45 %) exceed it.
EXPECTED = {
  "vit_tiny_4": (5_408_842, 48_010),
  "vit_small_4": (21_434_506, 96_010),
  "vit_base_4": (85_336_330, 192_010),
  "vit_tiny_16": (5_572_426, 48_010),
  "vit_small_16": (21_761_674, 96_010),
  "vit_base_16": (85_990_666, 192_010),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_param_counts_and_peft_ratio(name):
  model = vit_by_name(name, num_prompts=10)
  tree, total = _shapes_count(model)
  config, patch, image = VIT_MODELS[name]
  width, heads, mlp = VIT_CONFIGS[config]
  assert (model.width, model.num_heads, model.mlp_dim, model.depth) == (width, heads, mlp, 12)
  assert total == _vit_param_count(width, 12, mlp, patch, image, 10, 10) == EXPECTED[name][0]
  selected, _ = peft.split(dict(tree), peft.any_of(peft.prompts(), peft.head()))
  n_peft = _shapes_count(model, selected)[1]
  assert n_peft == 12 * 2 * 10 * width + width * 10 + 10 == EXPECTED[name][1]
  ratio = 100 * n_peft / total
  print(f"{name}: total {total:,}, prompts + head {n_peft:,} = {ratio:.3f} %")
  if config == "base":
    assert ratio < 0.4  # the paper's "< 0.4 %" holds for ViT-Base
  else:
    assert ratio == pytest.approx({"tiny": 0.888, "small": 0.448}[config], abs=0.03)


@pytest.mark.parametrize("config,published", [
    ("tiny", 5_717_416), ("small", 22_050_664), ("base", 86_567_656)])


def test_plain_vit16_matches_published_counts(config, published):
  # ViT-{Ti,S,B}/16 at 224 px with a 1000-class head and no prompts ("86M" for
  # ViT-Base in Dosovitskiy et al. 2021, Table 1).
  model = vit(config, patch_size=16, num_classes=1000, num_prompts=0)
  assert _shapes_count(model)[1] == published


def test_peft_selection_is_prompts_and_head_only():
  model = ViT(**SMALL, num_prompts=3)
  _, variables = _init(model)
  selected, frozen = peft.split(variables, peft.any_of(peft.prompts(), peft.head()))
  expected = {("params", f"block{i}", "attn", leaf)
              for i in range(SMALL["depth"]) for leaf in ("prompt_k", "prompt_v")}
  expected |= {("params", "head", "kernel"), ("params", "head", "bias")}
  assert _paths(selected) == expected
  for path in _paths(frozen):
    assert not any("prompt" in p or p == "head" for p in path), path


def test_jit_grad_through_prompts_is_finite_and_nonzero():
  model = ViT(**SMALL, num_prompts=3)
  x, variables = _init(model)
  apply_fn, params, _ = peft.make_apply_fn(
      model, variables, peft.any_of(peft.prompts(), peft.head()))
  labels = jnp.arange(x.shape[0]) % SMALL["num_classes"]

  def loss(p):
    logp = jax.nn.log_softmax(apply_fn(p, x))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

  grads = jax.jit(jax.grad(loss))(params)
  for i in range(SMALL["depth"]):
    for leaf in ("prompt_k", "prompt_v"):
      g = np.asarray(grads["params"][f"block{i}"]["attn"][leaf])
      assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 0, (i, leaf)
  assert np.max(np.abs(np.asarray(grads["params"]["head"]["kernel"]))) > 0


# ----------------------------------------------------------------- names, errors, inputs

def test_named_constructors():
  assert sorted(VIT_MODELS) == sorted(
      f"vit_{c}_{p}" for c in ("tiny", "small", "base") for p in (4, 16))
  assert vit("tiny", patch_size=4).image_size == 32
  assert vit("base", patch_size=16).image_size == 224
  m = vit_by_name("vit_small_16", num_classes=100, num_prompts=5)
  assert (m.width, m.num_heads, m.mlp_dim, m.patch_size, m.image_size, m.num_classes,
          m.num_prompts) == (384, 6, 1536, 16, 224, 100, 5)


@pytest.mark.parametrize("make,match", [
    (lambda: ViT(**{**SMALL, "width": 30, "num_heads": 4}), "divisible by num_heads"),
    (lambda: ViT(**{**SMALL, "image_size": 18}), "multiple of patch_size"),
    (lambda: ViT(**SMALL, num_prompts=-1), "num_prompts must be an int >= 0"),
    (lambda: ViT(**{**SMALL, "depth": 0}), "depth must be a positive int"),
    (lambda: ViT(**{**SMALL, "num_classes": 0}), "num_classes must be a positive int"),
    (lambda: vit("huge", patch_size=16), r"valid names are \['base', 'small', 'tiny'\]"),
    (lambda: vit_by_name("vit_tiny_8"), "vit_base_16"),
    (lambda: vit("tiny", patch_size=8), "pass image_size="),
])


def test_bad_arguments_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_wrong_input_size_raises():
  model = ViT(**SMALL)
  _, variables = _init(model)
  with pytest.raises(ValueError, match="image_size=16"):
    model.apply(variables, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    model.apply(variables, jnp.zeros((1, 16, 16, 1)))


def test_normalize_vit():
  x = np.array([[[0, 128, 255]]], np.uint8)
  np.testing.assert_allclose(np.asarray(normalize_vit(x)),
                             [[[-1.0, 128 / 127.5 - 1, 1.0]]], atol=1e-6)
  assert normalize_vit(x).dtype == jnp.float32
  with pytest.raises(ValueError, match="uint8"):
    normalize_vit(x.astype(np.float32))
