"""MobileNetV2 (Sandler et al. 2018) for 32x32 images, in Flax linen.

The ImageNet network of the paper's Table 2, adapted to CIFAR the usual way:
the stem convolution and the second stage (c = 24) have stride 1 instead of 2,
so a 32x32 input is reduced 8x (to 4x4) instead of 32x (to 1x1). Everything
else is the paper's: 3x3 conv stem with 32 channels, 17 inverted residual
blocks (expansion t, output channels c, repeats n, first stride s)::

    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)

a 1x1 conv to 1280 channels, global average pooling and a Dense ``head``.
Every convolution has no bias and is followed by BatchNorm (momentum 0.9,
eps 1e-5); the activation is ReLU6 (the paper's), except after each block's
projection, which is linear ("linear bottleneck"). A block adds its input
when its stride is 1 and its input and output channel counts are equal.

``width_mult`` scales every channel count, rounded to a multiple of 8 (never
down by more than 10 %); the last conv keeps 1280 channels for
``width_mult <= 1``, as in the reference implementations. Variable paths::

    params/stem_conv/kernel                          (3, 3, 3, 32)
    params/stem_bn/{scale,bias}                      (32,)
    params/block{i}/expand_conv/kernel, expand_bn/   1x1, C_in -> t C_in (absent if t = 1)
    params/block{i}/dw_conv/kernel, dw_bn/           3x3 depthwise, (3, 3, 1, t C_in)
    params/block{i}/project_conv/kernel, project_bn/ 1x1, t C_in -> C_out
    params/last_conv/kernel, last_bn/                1x1, 320 -> 1280
    params/head/{kernel,bias}                        (1280, num_classes), (num_classes,)
    batch_stats/<every *_bn>/{mean,var}

``peft.any_of(peft.batchnorm(variables), peft.head())`` is the paper's CNN
PEFT set (BatchNorm scale/shift plus head).

References:
  Sandler, Howard, Zhu, Zhmoginov, Chen. MobileNetV2: Inverted Residuals and
  Linear Bottlenecks. 2018. https://arxiv.org/abs/1801.04381
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
  "CIFAR_BLOCK_SETTING",
  "BlockSpec",
  "InvertedResidual",
  "MobileNetV2",
  "make_divisible",
  "mobilenetv2_blocks",
]

# (expansion t, channels c, repeats n, stride s of the first repeat); the
# second row's stride is 1 here, 2 in the paper's ImageNet Table 2.
CIFAR_BLOCK_SETTING: tuple[tuple[int, int, int, int], ...] = (
  (1, 16, 1, 1),
  (6, 24, 2, 1),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280

# PyTorch's padding=1 on every side, also for stride 2 (Flax "SAME" pads (0, 1)).
_PAD = ((1, 1), (1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``),
  rounding up instead where rounding down would lose more than 10 %."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


class BlockSpec(NamedTuple):
  """One inverted residual block of the network, as built."""

  in_channels: int
  expansion: int
  out_channels: int
  stride: int
  residual: bool


def mobilenetv2_blocks(width_mult: float = 1.0) -> list[BlockSpec]:
  """The 17 blocks of :class:`MobileNetV2` (``block0`` .. ``block16``) in order.

  Args:
    width_mult: channel multiplier.

  Returns:
    A :class:`BlockSpec` per block; ``residual`` is True exactly where the
    stride is 1 and ``in_channels == out_channels``.
  """
  _check_width_mult(width_mult)
  blocks = []
  c_in = make_divisible(STEM_CHANNELS * width_mult)
  for t, c, n, s in CIFAR_BLOCK_SETTING:
    c_out = make_divisible(c * width_mult)
    for i in range(n):
      stride = s if i == 0 else 1
      blocks.append(BlockSpec(c_in, t, c_out, stride, stride == 1 and c_in == c_out))
      c_in = c_out
  return blocks


def _check_width_mult(width_mult) -> None:
  if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not (
      width_mult > 0):
    raise ValueError(
        f"width_mult must be a positive number (1.0 for the standard network), "
        f"got {width_mult!r}.")


def _norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=jnp.float32, name=name)


class InvertedResidual(nn.Module):
  """1x1 expand -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 project -> BN.

  The expansion conv is omitted when ``expansion == 1``. The input is added to
  the output when ``stride == 1`` and the input has ``features`` channels.

  Attributes:
    expansion: ``t``; the hidden width is ``round(t * C_in)``.
    features: output channels ``C_out``.
    stride: stride of the depthwise conv, 1 or 2.
  """

  expansion: int
  features: int
  stride: int = 1

  def __post_init__(self):
    if isinstance(self.expansion, bool) or not isinstance(self.expansion, int) or (
        self.expansion < 1):
      raise ValueError(f"expansion must be an int >= 1, got {self.expansion!r}.")
    if self.stride not in (1, 2):
      raise ValueError(f"stride must be 1 or 2, got {self.stride!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the block.

    Args:
      x: activations ``(N, H, W, C_in)``.
      train: use and update batch statistics.

    Returns:
      ``(N, ceil(H / stride), ceil(W / stride), features)``.
    """
    c_in = x.shape[-1]
    hidden = int(round(c_in * self.expansion))
    conv = functools.partial(nn.Conv, use_bias=False, dtype=jnp.float32)
    y = x
    if self.expansion != 1:
      y = conv(hidden, (1, 1), name="expand_conv")(y)
      y = nn.relu6(_norm(train, "expand_bn")(y))
    y = conv(hidden, (3, 3), strides=(self.stride, self.stride), padding=_PAD,
             feature_group_count=hidden, name="dw_conv")(y)
    y = nn.relu6(_norm(train, "dw_bn")(y))
    y = conv(self.features, (1, 1), name="project_conv")(y)
    y = _norm(train, "project_bn")(y)  # linear bottleneck: no activation
    if self.stride == 1 and c_in == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 for 32x32 inputs (CIFAR strides; see the module docstring).

  Attributes:
    num_classes: width of the ``head`` Dense layer.
    width_mult: channel multiplier; channels are rounded to multiples of 8.

  Example:
    >>> model = MobileNetV2()
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    >>> logits = model.apply(variables, x)  # x: (N, 32, 32, 3) -> (N, 10)
    >>> logits, updates = model.apply(variables, x, train=True,
    ...                               mutable=["batch_stats"])
  """

  num_classes: int = 10
  width_mult: float = 1.0

  def __post_init__(self):
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or (
        self.num_classes < 1):
      raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}.")
    _check_width_mult(self.width_mult)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: float images ``(N, H, W, 3)``, normalised; the strides are chosen for
        ``H = W = 32`` (any size works, the pooling is global).
      train: use batch statistics and update ``batch_stats`` (pass
        ``mutable=["batch_stats"]`` to ``apply``) instead of running averages.

    Returns:
      Logits ``(N, num_classes)``, float32.
    """
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"x must have shape (N, H, W, 3), got {x.shape}.")
    x = jnp.asarray(x, jnp.float32)
    stem = make_divisible(STEM_CHANNELS * self.width_mult)
    x = nn.Conv(stem, (3, 3), padding=_PAD, use_bias=False, dtype=jnp.float32,
                name="stem_conv")(x)
    x = nn.relu6(_norm(train, "stem_bn")(x))
    for i, spec in enumerate(mobilenetv2_blocks(self.width_mult)):
      x = InvertedResidual(spec.expansion, spec.out_channels, spec.stride,
                           name=f"block{i}")(x, train=train)
    last = make_divisible(LAST_CHANNELS * max(1.0, self.width_mult))
    x = nn.Conv(last, (1, 1), use_bias=False, dtype=jnp.float32, name="last_conv")(x)
    x = nn.relu6(_norm(train, "last_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x)
