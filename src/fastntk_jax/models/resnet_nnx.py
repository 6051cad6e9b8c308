"""The CIFAR ResNets in Flax NNX, with the Linen port's names and weights.

:class:`CifarResNet` here computes exactly what
:class:`fastntk_jax.models.resnet.CifarResNet` (Linen) computes: the same
option-A shortcuts, PyTorch padding and BatchNorm settings, and the same
attribute names (``conv_init``, ``bn_init``, ``stage{s}_block{i}.conv1`` …,
``head``), so that :func:`load_linen_variables` copies the shipped
akamaster weights one to one.

Example::

  model = CifarResNet(depth=20, rngs=nnx.Rngs(0))
  load_linen_variables(model, load_resnet_cifar10(20)[1])
  model.eval()                      # BatchNorm on running statistics
  logits = model(normalize_cifar(x_uint8))
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from fastntk_jax.models.resnet import STAGE_WIDTHS
from fastntk_jax.models.resnet import blocks_per_stage
from fastntk_jax.models.resnet import shortcut_option_a

__all__ = ["BasicBlock", "CifarResNet", "load_linen_variables"]

_PAD = ((1, 1), (1, 1))  # PyTorch's padding=1, also at stride 2


def _conv(cin: int, cout: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(cin, cout, (3, 3), strides=stride, padding=_PAD,
                  use_bias=False, rngs=rngs)


def _norm(c: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # Flax's momentum is the running average's decay: 0.9 is PyTorch's 0.1.
  return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
  """conv3x3(stride) → BN → ReLU → conv3x3 → BN, plus shortcut, then ReLU."""

  def __init__(self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs):
    self.planes = planes
    self.stride = stride
    self.conv1 = _conv(cin, planes, stride, rngs)
    self.bn1 = _norm(planes, rngs)
    self.conv2 = _conv(planes, planes, 1, rngs)
    self.bn2 = _norm(planes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = shortcut_option_a(x, self.planes)
    return jax.nn.relu(y + x)


class CifarResNet(nnx.Module):
  """ResNet-{20,32,44,56,110} for 32×32 images (NNX).

  Args:
    depth: ``6n + 2``; one of 20, 32, 44, 56, 110.
    num_classes: width of the ``head``.
    rngs: initialisation.
  """

  def __init__(self, depth: int = 20, num_classes: int = 10, *,
               rngs: nnx.Rngs):
    n = blocks_per_stage(depth)
    if not isinstance(num_classes, int) or num_classes < 1:
      raise ValueError(
          f"num_classes must be a positive int, got {num_classes!r}.")
    self.depth = depth
    self.conv_init = _conv(3, 16, 1, rngs)
    self.bn_init = _norm(16, rngs)
    self.block_names = []
    cin = 16
    for s, planes in enumerate(STAGE_WIDTHS, start=1):
      for i in range(n):
        stride = 2 if (s > 1 and i == 0) else 1
        name = f"stage{s}_block{i}"
        setattr(self, name, BasicBlock(cin, planes, stride, rngs=rngs))
        self.block_names.append(name)
        cin = planes
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"x must have shape (N, H, W, 3), got {x.shape}.")
    x = jax.nn.relu(self.bn_init(self.conv_init(jnp.asarray(x, jnp.float32))))
    for name in self.block_names:
      x = getattr(self, name)(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


def load_linen_variables(model: nnx.Module, variables: Mapping) -> None:
  """Copies Linen variables (``{"params": …, "batch_stats": …}``) into an NNX
  model whose attributes carry the Linen module names (this module's
  :class:`CifarResNet`, or a ``flax.nnx.bridge.ToNNX`` wrapper).

  Raises:
    KeyError: a variable of the model that ``variables`` does not hold.
    ValueError: a shape that differs.
  """
  source = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        dict(variables.get(collection, {}))):
      source[tuple(k.key for k in path)] = leaf
  new = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Variable)):
    if isinstance(var, nnx.RngState):
      continue
    key = tuple(str(p) for p in path)
    if key not in source:
      raise KeyError(f"variables hold no value for {'/'.join(key)}.")
    value = jnp.asarray(source[key])
    if value.shape != var.get_value().shape:
      raise ValueError(f"{'/'.join(key)}: variables have shape {value.shape}, "
                       f"the model {var.get_value().shape}.")
    new[path] = var.replace(value)
  nnx.update(model, nnx.from_flat_state(new))
