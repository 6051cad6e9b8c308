"""CIFAR ResNet (He et al. 2016, Sec. 4.2) in Flax linen, with a PyTorch weight port.

The layout follows the CIFAR variant used by ``akamaster/pytorch_resnet_cifar10``:
a 3x3 conv stem with 16 channels, three stages of ``n = (depth - 2) / 6`` basic
blocks with 16, 32 and 64 channels, parameter-free "option A" shortcuts, global
average pooling and a linear head. Variables are named so that PEFT selection can
read them directly::

    params/conv_init/kernel            (3, 3, 3, 16)
    params/bn_init/{scale,bias}        (16,)
    params/stage{s}_block{i}/conv1/kernel, bn1/{scale,bias}, conv2/kernel, bn2/...
    params/head/{kernel,bias}          (64, num_classes), (num_classes,)
    batch_stats/<every bn...>/{mean,var}

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. 2016.
  https://arxiv.org/abs/1512.03385
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax.io.paths import ASSET_DIR, shared_data_dir

__all__ = [
    "BasicBlock",
    "blocks_per_stage",
    "CifarResNet",
    "load_resnet_cifar10",
    "normalize_cifar",
    "resnet_variables_from_torch",
    "shortcut_option_a",
]

SUPPORTED_DEPTHS = (20, 32, 44, 56, 110)
STAGE_WIDTHS = (16, 32, 64)
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)

# PyTorch's padding=1: one pixel on every side, also for stride 2 (Flax "SAME"
# would pad (0, 1) there and shift every feature map of the port).
_PAD = ((1, 1), (1, 1))


def blocks_per_stage(depth: int) -> int:
  if depth not in SUPPORTED_DEPTHS:
    raise ValueError(
        f"depth must be one of {SUPPORTED_DEPTHS} (6n + 2), got {depth!r}."
    )
  return (depth - 2) // 6


def shortcut_option_a(x: jax.Array, planes: int) -> jax.Array:
  """Parameter-free downsampling shortcut ("option A").

  Args:
    x: activations ``(N, H, W, C)``.
    planes: the output channel count; ``C + 2 * (planes // 4)`` must equal it.

  Returns:
    ``x[:, ::2, ::2, :]`` zero-padded with ``planes // 4`` channels on each side:
    shape ``(N, ceil(H / 2), ceil(W / 2), planes)``.
  """
  pad = planes // 4
  if x.shape[-1] + 2 * pad != planes:
    raise ValueError(
        f"option-A shortcut cannot map {x.shape[-1]} channels to planes={planes}; "
        "it needs in_channels + 2 * (planes // 4) == planes (e.g. 16 -> 32)."
    )
  return jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))


class BasicBlock(nn.Module):
  """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, then ReLU.

  Attributes:
    planes: output channels.
    stride: stride of the first convolution (1 or 2).
  """

  planes: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(
        nn.Conv, self.planes, (3, 3), padding=_PAD, use_bias=False, dtype=jnp.float32
    )
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=jnp.float32,
    )
    y = conv(strides=(self.stride, self.stride), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(name="conv2")(y)
    y = norm(name="bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = shortcut_option_a(x, self.planes)
    return nn.relu(y + x)


class CifarResNet(nn.Module):
  """ResNet-{20,32,44,56,110} for 32x32 images.

  Attributes:
    depth: total depth ``6n + 2``; one of 20, 32, 44, 56, 110.
    num_classes: width of the ``head`` Dense layer.

  Example:
    >>> model = CifarResNet(depth=20)
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    >>> logits = model.apply(variables, x)  # x: (N, 32, 32, 3) normalised
  """

  depth: int = 20
  num_classes: int = 10

  def __post_init__(self):
    blocks_per_stage(self.depth)  # fail at construction, not at first call
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: float images ``(N, H, W, 3)``, already normalised (see
        :func:`normalize_cifar`); ``H = W = 32`` for the CIFAR weights.
      train: use batch statistics and update ``batch_stats`` (pass
        ``mutable=["batch_stats"]`` to ``apply``) instead of running averages.

    Returns:
      Logits ``(N, num_classes)``, float32.
    """
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"x must have shape (N, H, W, 3), got {x.shape}.")
    n = blocks_per_stage(self.depth)
    x = jnp.asarray(x, jnp.float32)
    x = nn.Conv(16, (3, 3), padding=_PAD, use_bias=False, dtype=jnp.float32, name="conv_init")(x)
    x = nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
        name="bn_init",
    )(x)
    x = nn.relu(x)
    for s, planes in enumerate(STAGE_WIDTHS, start=1):
      for i in range(n):
        stride = 2 if (s > 1 and i == 0) else 1
        x = BasicBlock(planes, stride, name=f"stage{s}_block{i}")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x)


def normalize_cifar(x_uint8: jax.typing.ArrayLike) -> jax.Array:
  """Maps uint8 RGB images to the input scale the CIFAR weights were trained on.

  ``(x / 255 - mean) / std`` with mean (0.485, 0.456, 0.406) and std
  (0.229, 0.224, 0.225) per channel.

  Args:
    x_uint8: uint8 images ``(..., 3)``, e.g. ``(N, 32, 32, 3)``.

  Returns:
    float32 array of the same shape.
  """
  x = jnp.asarray(x_uint8)
  if x.dtype != jnp.uint8:
    raise ValueError(
        f"normalize_cifar expects uint8 pixels in [0, 255], got dtype {x.dtype}; "
        "pass the raw images (normalising twice would silently ruin accuracy)."
    )
  if x.ndim < 1 or x.shape[-1] != 3:
    raise ValueError(f"x_uint8 must end in 3 RGB channels, got shape {x.shape}.")
  mean = jnp.asarray(CIFAR_MEAN, jnp.float32)
  std = jnp.asarray(CIFAR_STD, jnp.float32)
  return (x.astype(jnp.float32) / 255.0 - mean) / std


def _torch_key_for(path: tuple[str, ...]) -> tuple[str, str]:
  """Maps a Flax variable path to its PyTorch state-dict key and a transform tag."""
  collection, module, *rest = path
  leaf = rest[-1]
  if module == "head":
    return f"linear.{'weight' if leaf == 'kernel' else 'bias'}", (
        "dense" if leaf == "kernel" else "copy"
    )
  if module in ("conv_init", "bn_init"):
    prefix = module.replace("_init", "1")
  else:  # stage{s}_block{i}/<layer>
    stage, block = module.removeprefix("stage").split("_block")
    prefix = f"layer{stage}.{block}.{rest[0]}"
  names = {"kernel": "weight", "scale": "weight", "bias": "bias",
           "mean": "running_mean", "var": "running_var"}
  return f"{prefix}.{names[leaf]}", ("conv" if leaf == "kernel" else "copy")


_TRANSFORMS = {
    "conv": lambda w: np.transpose(w, (2, 3, 1, 0)),  # (out, in, kh, kw) -> (kh, kw, in, out)
    "dense": lambda w: np.transpose(w),  # (out, in) -> (in, out)
    "copy": lambda w: w,
}


def resnet_variables_from_torch(
    state_dict: Mapping[str, Any], depth: int = 20, *, num_classes: int = 10
) -> dict[str, Any]:
  """Converts a PyTorch CIFAR ResNet state dict into ``CifarResNet`` variables.

  Args:
    state_dict: arrays keyed by PyTorch names (``conv1.weight``,
      ``layer1.0.bn1.running_mean``, ``linear.weight`` ...), e.g. an
      ``np.load``-ed ``resnet20_cifar10.npz``. ``num_batches_tracked`` keys
      are ignored.
    depth: the network depth the state dict was trained with.
    num_classes: rows of ``linear.weight``.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` with the tree structure and shapes
    of ``CifarResNet(depth, num_classes).init``; float32 ``jax.Array`` leaves.

  Raises:
    ValueError: for a missing or unexpected key, or a shape mismatch; the
      message names the key.
  """
  model = CifarResNet(depth=depth, num_classes=num_classes)
  template = jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.float32)
  )
  used: set[str] = set()

  def convert(key_path, spec):
    path = tuple(k.key for k in key_path)
    key, kind = _torch_key_for(path)
    if key not in state_dict:
      raise ValueError(
          f"state_dict is missing {key!r} (needed for {'/'.join(path)} of "
          f"ResNet-{depth}); check that depth={depth} matches the checkpoint."
      )
    value = _TRANSFORMS[kind](np.asarray(state_dict[key]))
    if value.shape != spec.shape:
      raise ValueError(
          f"state_dict[{key!r}] has shape {np.asarray(state_dict[key]).shape}, which "
          f"gives {value.shape} for {'/'.join(path)}; expected {spec.shape}. Check "
          f"depth={depth} and num_classes={num_classes}."
      )
    if not np.all(np.isfinite(value)):
      raise ValueError(f"state_dict[{key!r}] holds non-finite values.")
    used.add(key)
    return jnp.asarray(value, dtype=jnp.float32)

  variables = jax.tree_util.tree_map_with_path(convert, template)
  extra = sorted(
      k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")
  )
  if extra:
    raise ValueError(
        f"state_dict has keys that ResNet-{depth} does not use: {extra}; "
        "check that depth matches the checkpoint."
    )
  return dict(variables)


def load_resnet_cifar10(
    depth: int = 20, path: str | Path | None = None
) -> tuple[CifarResNet, dict[str, Any]]:
  """Loads a CIFAR-10-trained ResNet (weights of akamaster/pytorch_resnet_cifar10).

  Args:
    depth: 20, 32, 44 or 56.
    path: a ``resnet{depth}_cifar10.npz`` of PyTorch-named float32 arrays. None
      uses the ResNet-20 copy shipped in the package for ``depth=20``, and
      ``<shared data>/weights/resnet{depth}_cifar10.npz`` otherwise.

  Returns:
    ``(model, variables)``; ``model.apply(variables, normalize_cifar(x))``
    gives logits ``(N, 10)``.
  """
  blocks_per_stage(depth)
  if path is None:
    if depth == 20:
      path = ASSET_DIR / "resnet20_cifar10.npz"
    else:
      root = shared_data_dir()
      if root is None:
        raise ValueError(
            f"only ResNet-20 weights ship with the package; for depth={depth} "
            f"pass path= to a resnet{depth}_cifar10.npz (found no ../shared/data)."
        )
      path = root / "weights" / f"resnet{depth}_cifar10.npz"
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"load_resnet_cifar10: no weights file at {path}.")
  with np.load(path, allow_pickle=False) as npz:
    state_dict = {k: npz[k] for k in npz.files}
  model = CifarResNet(depth=depth)
  return model, resnet_variables_from_torch(state_dict, depth)
