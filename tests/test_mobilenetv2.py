"""Tests for fastntk_jax.models.mobilenetv2: structure, counts, BatchNorm, residuals, PEFT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax import peft
from fastntk_jax.models.mobilenetv2 import (
  InvertedResidual,
  MobileNetV2,
  make_divisible,
  mobilenetv2_blocks,
)

# Sandler et al. (2018), Table 2: (t, c, n, s), with the CIFAR stride 1 in row 2.
TABLE = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
         (6, 160, 3, 2), (6, 320, 1, 1)]


def _random_variables(model, seed=0):
  """Variables with ``init``'s tree and shapes, filled by numpy: He-normal kernels, BN
  scale ~ 1, small shifts, running stats (0, 1). (``model.init`` compiles ~60 truncated
  normal samplers: ~10 s on CPU.)"""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))

  def fill(path, spec):
    leaf = path[-1].key
    if leaf == "kernel":
      value = rng.normal(size=spec.shape) * np.sqrt(2.0 / np.prod(spec.shape[:-1]))
    elif leaf == "scale":
      value = 1.0 + 0.1 * rng.normal(size=spec.shape)
    elif leaf == "bias":
      value = 0.1 * rng.normal(size=spec.shape)
    else:
      value = np.zeros(spec.shape) if leaf == "mean" else np.ones(spec.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, dict(shapes))


@pytest.fixture(scope="module")
def default():
  model = MobileNetV2()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  return model, _random_variables(model), x


def _paths(tree, prefix=()):
  out = set()
  for k, v in tree.items():
    out |= _paths(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,)}
  return out


def _count(tree) -> int:
  return int(sum(np.prod(np.shape(l)) for l in jax.tree_util.tree_leaves(tree)))


def _closed_form(classes):
  """(all parameters, BatchNorm scale+shift parameters) of the width-1 network."""
  bn = 2 * 32
  total = 3 * 3 * 3 * 32 + bn                      # stem conv + BN
  c_in = 32
  for t, c, n, _ in TABLE:
    for _ in range(n):
      h = c_in * t
      if t != 1:
        total += c_in * h + 2 * h                  # expand 1x1 + BN
        bn += 2 * h
      total += 3 * 3 * h + 2 * h                   # depthwise 3x3 + BN
      total += h * c + 2 * c                       # project 1x1 + BN
      bn += 2 * h + 2 * c
      c_in = c
  total += c_in * 1280 + 2 * 1280                  # last conv + BN
  bn += 2 * 1280
  return total + 1280 * classes + classes, bn     # + head


def test_output_shape(default):
  model, variables, x = default
  y = jax.jit(model.apply)(variables, x)
  assert y.shape == (4, 10) and y.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(y)))


def test_train_updates_batch_stats_and_eval_is_per_sample(default):
  model, variables, x = default
  apply = jax.jit(model.apply, static_argnames="train")
  _, updates = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  old, new = variables["batch_stats"], updates["batch_stats"]
  assert _paths(old) == _paths(new)
  for path in _paths(old):
    if path[-1] == "var":  # (means after a projection BN stay ~0, correctly)
      a, b = old, new
      for k in path:
        a, b = a[k], b[k]
      assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-3, path
  # stem_bn: running = 0.9 * running + 0.1 * batch statistic of the stem conv output.
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = np.stack([xp[:, i:i + 32, j:j + 32, :] for i in range(3) for j in range(3)], 3)
  kernel = np.asarray(variables["params"]["stem_conv"]["kernel"], np.float64)
  conv = np.einsum("nhwkc,kco->nhwo", patches, kernel.reshape(9, 3, -1))
  np.testing.assert_allclose(np.asarray(new["stem_bn"]["mean"]),
                             0.1 * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new["stem_bn"]["var"]),
                             0.9 + 0.1 * conv.var((0, 1, 2)), rtol=1e-4, atol=1e-6)
  # Inference mode: a sample's logits do not depend on the rest of the batch.
  np.testing.assert_allclose(np.asarray(apply(variables, x[:1], train=False)),
                             np.asarray(apply(variables, x, train=False)[:1]),
                             rtol=1e-5, atol=1e-5)


def test_param_count_matches_closed_form():
  shapes = jax.eval_shape(MobileNetV2().init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  total, _ = _closed_form(10)
  assert _count(shapes["params"]) == total == 2_236_682
  # torchvision's ImageNet MobileNetV2 (1000 classes) has 3,504,872 parameters;
  # the CIFAR strides change no shape.
  assert _closed_form(1000)[0] == 3_504_872
  assert _count(jax.eval_shape(MobileNetV2(num_classes=1000).init, jax.random.PRNGKey(0),
                               jnp.zeros((1, 32, 32, 3)))["params"]) == 3_504_872


def test_batchnorm_predicate_selects_exactly_bn_scale_and_shift(default):
  _, variables, _ = default
  selected, _ = peft.split(variables, peft.batchnorm(variables))
  bn_modules = {("stem_bn",), ("last_bn",)}
  for i, spec in enumerate(mobilenetv2_blocks()):
    names = ("dw_bn", "project_bn") + (("expand_bn",) if spec.expansion != 1 else ())
    bn_modules |= {(f"block{i}", n) for n in names}
  expected = {("params",) + m + (leaf,) for m in bn_modules for leaf in ("scale", "bias")}
  assert _paths(selected) == expected
  assert {p[:-1] for p in _paths(variables["batch_stats"])} == bn_modules
  assert not any("prompt" in "/".join(p) for p in _paths(variables))

  peft_set, _ = peft.split(variables, peft.any_of(peft.batchnorm(variables), peft.head()))
  n_peft, n_total = _count(peft_set), _count(variables["params"])
  assert n_peft == _closed_form(10)[1] + 1280 * 10 + 10 == 46_922
  share = 100 * n_peft / n_total
  print(f"MobileNetV2: BN + head {n_peft:,} / {n_total:,} = {share:.3f} %")
  assert 0.05 <= share <= 4.88  # the paper's range for its CNNs


def test_blocks_follow_the_table():
  specs = mobilenetv2_blocks()
  assert len(specs) == sum(n for _, _, n, _ in TABLE) == 17
  expected, c_in = [], 32
  for t, c, n, s in TABLE:
    for i in range(n):
      stride = s if i == 0 else 1
      expected.append((c_in, t, c, stride, stride == 1 and c_in == c))
      c_in = c
  assert [tuple(s) for s in specs] == expected
  assert [i for i, s in enumerate(specs) if s.residual] == [2, 4, 5, 7, 8, 9, 11, 12, 14, 15]


def test_residual_only_where_stride_1_and_channels_equal(default):
  """With every projection BN's scale at 0 and shift b_i, block i outputs exactly
  b_i + (its input if it has a residual connection else 0)."""
  model, variables, x = default
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  specs = mobilenetv2_blocks()
  shifts = {}
  for i, spec in enumerate(specs):
    bn = params[f"block{i}"]["project_bn"]
    shifts[i] = jax.random.normal(jax.random.PRNGKey(i), (spec.out_channels,))
    bn["scale"], bn["bias"] = jnp.zeros_like(bn["scale"]), shifts[i]
  _, state = jax.jit(lambda v, x: model.apply(
      v, x, capture_intermediates=lambda m, method: isinstance(m, InvertedResidual),
      mutable=["intermediates"]))({"params": params, "batch_stats": variables["batch_stats"]}, x)
  outs = [np.asarray(state["intermediates"][f"block{i}"]["__call__"][0]) for i in range(17)]
  size = 32
  for i, spec in enumerate(specs):
    size //= spec.stride
    assert outs[i].shape == (4, size, size, spec.out_channels), i
    want = np.broadcast_to(np.asarray(shifts[i]), outs[i].shape)
    if spec.residual:
      want = want + outs[i - 1]
      assert np.max(np.abs(outs[i - 1])) > 0.1  # the residual test is not vacuous
    np.testing.assert_allclose(outs[i], want, rtol=1e-5, atol=1e-5, err_msg=f"block{i}")
  assert size == 4  # CIFAR strides: 32 -> 4, not ImageNet's 32 -> 1


def test_module_names_and_width_mult():
  shapes = jax.eval_shape(MobileNetV2(width_mult=0.5).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  assert shapes["stem_conv"]["kernel"].shape == (3, 3, 3, 16)
  assert "expand_conv" not in shapes["block0"]  # t = 1
  assert shapes["block0"]["dw_conv"]["kernel"].shape == (3, 3, 1, 16)
  assert shapes["block0"]["project_conv"]["kernel"].shape == (1, 1, 16, 8)
  assert shapes["block1"]["expand_conv"]["kernel"].shape == (1, 1, 8, 48)
  assert shapes["block16"]["project_conv"]["kernel"].shape == (1, 1, 480, 160)
  assert shapes["last_conv"]["kernel"].shape == (1, 1, 160, 1280)  # 1280 kept for <= 1
  assert shapes["head"]["kernel"].shape == (1280, 10)
  assert [make_divisible(v) for v in (3, 12, 16, 20, 36, 1792)] == [8, 16, 16, 24, 40, 1792]


@pytest.mark.parametrize("make,match", [
    (lambda: MobileNetV2(width_mult=0), "width_mult must be a positive number"),
    (lambda: MobileNetV2(width_mult=-1.0), "width_mult must be a positive number"),
    (lambda: MobileNetV2(num_classes=0), "num_classes must be a positive int"),
    (lambda: InvertedResidual(6, 24, stride=3), "stride must be 1 or 2"),
    (lambda: InvertedResidual(0, 24), "expansion must be an int >= 1"),
])
def test_bad_arguments_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_input_shape_raises():
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    jax.eval_shape(MobileNetV2().init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32)))


def test_inverted_residual_hidden_activation_is_relu6():
  """t = 1 block with identity depthwise/projection convs and a dw_bn shift of
  +10: the hidden activation saturates at 6 and the input is added back."""
  c = 4
  dw = np.zeros((3, 3, 1, c), np.float32)
  dw[1, 1] = 1.0
  bn = lambda shift: {"scale": jnp.ones(c), "bias": jnp.full((c,), shift)}
  stats = {"mean": jnp.zeros(c), "var": jnp.full((c,), 1.0 - 1e-5)}  # exact identity
  variables = {
      "params": {"dw_conv": {"kernel": jnp.asarray(dw)}, "dw_bn": bn(10.0),
                 "project_conv": {"kernel": jnp.eye(c).reshape(1, 1, c, c)},
                 "project_bn": bn(0.0)},
      "batch_stats": {"dw_bn": stats, "project_bn": stats},
  }
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 5, 5, c), minval=-1.0, maxval=1.0)
  y = InvertedResidual(expansion=1, features=c).apply(variables, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x) + 6.0, rtol=1e-5, atol=1e-5)
