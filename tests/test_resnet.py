"""Tests for fastntk_jax.models.resnet: structure, weight port and pretrained accuracy."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.data import load_cifar10_lossless, load_embedded_cifar10
from fastntk_jax.models import (
    CifarResNet,
    load_resnet_cifar10,
    normalize_cifar,
    resnet_variables_from_torch,
)
from fastntk_jax.models.resnet import BasicBlock, shortcut_option_a

ASSETS = Path(__file__).resolve().parents[1] / "src" / "fastntk_jax" / "assets"
BATCH = 250


def _torch_state(path: Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def _init_shapes(depth: int):
  """Shape/dtype tree of ``CifarResNet(depth).init`` (a real init costs seconds on CPU)."""
  return jax.eval_shape(
      CifarResNet(depth=depth).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))
  )


@pytest.fixture(scope="module")
def pretrained():
  """ResNet-20 from the package asset and a jitted uint8 -> predicted-class function."""
  model, variables = load_resnet_cifar10(depth=20)
  predict = jax.jit(lambda x: jnp.argmax(model.apply(variables, normalize_cifar(x)), -1))
  return model, variables, predict


def _accuracy(predict, x: np.ndarray, y: np.ndarray) -> float:
  assert len(x) % BATCH == 0  # one compiled shape
  pred = np.concatenate([np.asarray(predict(x[i : i + BATCH])) for i in range(0, len(x), BATCH)])
  return float(np.mean(pred == y))


@pytest.mark.parametrize("depth", [0, 18, 21, 50, 1202])
def test_bad_depth_raises(depth):
  with pytest.raises(ValueError, match="depth must be one of"):
    CifarResNet(depth=depth)
  with pytest.raises(ValueError, match="depth must be one of"):
    resnet_variables_from_torch({}, depth)
  with pytest.raises(ValueError, match="depth must be one of"):
    load_resnet_cifar10(depth=depth)


def test_param_count_and_tree_match_checkpoint():
  state = _torch_state(ASSETS / "resnet20_cifar10.npz")
  converted = load_resnet_cifar10(depth=20)[1]
  init = _init_shapes(20)

  assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(converted)
  shapes_init = jax.tree_util.tree_map(lambda s: s.shape, init)
  shapes_conv = jax.tree_util.tree_map(jnp.shape, converted)
  assert shapes_init == shapes_conv
  assert set(converted) == {"params", "batch_stats"}

  n_params = sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(init["params"]))
  n_stats = sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(init["batch_stats"]))
  running = sum(v.size for k, v in state.items() if k.endswith(("running_mean", "running_var")))
  trainable = sum(v.size for v in state.values()) - running
  assert n_params == trainable == 269_722  # "0.27M" in He et al. (2016), Table 6
  assert n_stats == running

  params = converted["params"]
  assert set(params) == {"conv_init", "bn_init", "head"} | {
      f"stage{s}_block{i}" for s in (1, 2, 3) for i in range(3)
  }
  assert set(params["stage2_block0"]) == {"conv1", "bn1", "conv2", "bn2"}
  assert params["stage2_block0"]["conv1"]["kernel"].shape == (3, 3, 16, 32)
  assert params["head"]["kernel"].shape == (64, 10)
  assert set(converted["batch_stats"]["bn_init"]) == {"mean", "var"}
  # Layout conversion: conv (out, in, kh, kw) -> (kh, kw, in, out), linear transposed.
  np.testing.assert_array_equal(
      params["stage3_block1"]["conv2"]["kernel"],
      state["layer3.1.conv2.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(params["head"]["kernel"], state["linear.weight"].T)
  np.testing.assert_array_equal(params["bn_init"]["scale"], state["bn1.weight"])
  np.testing.assert_array_equal(
      converted["batch_stats"]["stage1_block2"]["bn2"]["var"], state["layer1.2.bn2.running_var"]
  )


def test_state_dict_errors_name_the_key():
  state = _torch_state(ASSETS / "resnet20_cifar10.npz")

  missing = dict(state)
  del missing["layer2.1.bn1.running_var"]
  with pytest.raises(ValueError, match=r"missing 'layer2\.1\.bn1\.running_var'"):
    resnet_variables_from_torch(missing, 20)

  extra = dict(state, **{"layer4.0.conv1.weight": np.zeros((1, 1, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"layer4\.0\.conv1\.weight"):
    resnet_variables_from_torch(extra, 20)

  bad_shape = dict(state, **{"linear.weight": np.zeros((100, 64), np.float32)})
  with pytest.raises(ValueError, match=r"'linear\.weight'\] has shape \(100, 64\)"):
    resnet_variables_from_torch(bad_shape, 20)

  # A ResNet-20 checkpoint is not a ResNet-32 one: the first absent block is named.
  with pytest.raises(ValueError, match=r"missing 'layer1\.3\."):
    resnet_variables_from_torch(state, 32)

  # PyTorch's bookkeeping counters are ignored.
  tracked = dict(state, **{"bn1.num_batches_tracked": np.asarray(7)})
  resnet_variables_from_torch(tracked, 20)


def test_option_a_shortcut_shape_and_values():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 16))
  out = shortcut_option_a(x, 32)
  assert out.shape == (2, 16, 16, 32)
  np.testing.assert_array_equal(out[..., 8:24], x[:, ::2, ::2, :])
  assert not np.any(out[..., :8]) and not np.any(out[..., 24:])
  assert shortcut_option_a(out, 64).shape == (2, 8, 8, 64)
  with pytest.raises(ValueError, match="option-A shortcut"):
    shortcut_option_a(x, 64)

  block = BasicBlock(32, stride=2)
  variables = block.init(jax.random.PRNGKey(0), x)
  assert block.apply(variables, x).shape == (2, 16, 16, 32)
  assert set(variables["params"]) == {"conv1", "bn1", "conv2", "bn2"}  # shortcut: no params


def test_stride2_conv_pads_like_pytorch():
  """padding=1 on every side: Flax 'SAME' would pad (0, 1) for even sizes and shift outputs."""
  x = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1) * jnp.ones((1, 1, 1, 16))
  block = BasicBlock(32, stride=2)
  variables = block.init(jax.random.PRNGKey(0), x)
  kernel = np.zeros((3, 3, 16, 32), np.float32)
  kernel[0, 0, 0, 0] = 1.0  # picks the top-left tap of the 3x3 window
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  params["conv1"]["kernel"] = jnp.asarray(kernel)
  _, state = block.apply(
      {**variables, "params": params}, x, capture_intermediates=True, mutable=["intermediates"]
  )
  conv1 = np.asarray(state["intermediates"]["conv1"]["__call__"][0][0, :, :, 0])
  # Output (i, j) sees the padded input at (2i - 1, 2j - 1): zero padding at i or j = 0.
  np.testing.assert_array_equal(conv1, [[0.0, 0.0], [0.0, float(x[0, 1, 1, 0])]])


def test_train_mode_updates_batch_stats(pretrained):
  model, variables, _ = pretrained
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 32, 3))
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(
      variables["batch_stats"]
  )
  # momentum 0.9: new = 0.9 * old + 0.1 * batch statistic.
  old = np.asarray(variables["batch_stats"]["bn_init"]["mean"])
  new = np.asarray(updates["batch_stats"]["bn_init"]["mean"])
  conv = jax.lax.conv_general_dilated(
      x, variables["params"]["conv_init"]["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  batch_mean = np.asarray(conv.mean(axis=(0, 1, 2)))
  np.testing.assert_allclose(new, 0.9 * old + 0.1 * batch_mean, rtol=1e-4, atol=1e-5)


def test_normalize_cifar():
  x = np.full((2, 32, 32, 3), 255, np.uint8)
  out = normalize_cifar(x)
  assert out.dtype == jnp.float32 and out.shape == x.shape
  expected = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    normalize_cifar(x.astype(np.float32))


def test_shipped_weights_equal_shared(shared_data):
  for name in ("resnet20_cifar10.npz", "LICENSE-akamaster-resnet-cifar10.txt"):
    assert (ASSETS / name).read_bytes() == (shared_data / "weights" / name).read_bytes(), name


def test_other_depths_convert(shared_data):
  for depth in (32, 44, 56):
    state = _torch_state(shared_data / "weights" / f"resnet{depth}_cifar10.npz")
    converted = resnet_variables_from_torch(state, depth)
    template = jax.eval_shape(
        CifarResNet(depth=depth).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))
    )
    assert jax.tree_util.tree_map(jnp.shape, converted) == jax.tree_util.tree_map(
        lambda s: s.shape, template
    )


def test_pretrained_accuracy_lossless(shared_data, pretrained):
  _, _, x_test, y_test = load_cifar10_lossless(shared_data / "cifar10-lossless-subset.npz")
  acc = _accuracy(pretrained[2], x_test[:1000], y_test[:1000])
  print(f"ResNet-20 accuracy on lossless CIFAR-10 test[0:1000]: {100 * acc:.1f} %")
  assert abs(acc - 0.915) <= 0.003, acc


def test_pretrained_accuracy_embedded_jpeg(pretrained):
  _, _, x_test, y_test = load_embedded_cifar10()
  acc = _accuracy(pretrained[2], x_test, y_test)
  # JPEG (quality ~75) costs ~11 points: README reports 80.8 % on JPEG test[0:1000].
  print(f"ResNet-20 accuracy on embedded JPEG test subset (100/class): {100 * acc:.1f} %")
  assert acc > 0.70, acc
