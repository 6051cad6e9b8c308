"""Vision Transformer with prefix prompts in every attention block, in Flax linen.

A pre-LayerNorm ViT (Dosovitskiy et al. 2021): non-overlapping ``p x p`` patches
are embedded by a strided convolution, a class token is prepended, a learned
position embedding is added, ``depth`` blocks of multi-head self-attention and a
GELU MLP follow, and a Dense ``head`` reads the final-LayerNorm'd class token.

Prefix prompts (Li & Liang 2021; Fig. 1 of Fast-NTK): every block's attention
owns ``prompt_k`` and ``prompt_v`` of shape ``(L_p, width)``. They are key and
value vectors, concatenated in front of the projected keys and values of the
``T + 1`` tokens (split across heads like them), so each query attends over
``L_p + T + 1`` positions while the sequence length stays ``T + 1``::

    q = x W_q                                   (T+1, width)
    k = [prompt_k ; x W_k],  v = [prompt_v ; x W_v]   (L_p+T+1, width)
    attn(x) = softmax(q k^T / sqrt(d_head)) v   per head, then W_out

Fast-NTK's ViT PEFT set is the prompts plus the head,
``peft.any_of(peft.prompts(), peft.head())``. Variable paths::

    params/patch_embed/{kernel,bias}       (p, p, 3, width), (width,)
    params/cls                             (1, 1, width)
    params/pos_embed                       (1, T + 1, width), T = (image_size / p)^2
    params/block{i}/ln1/{scale,bias}       (width,)
    params/block{i}/attn/{query,key,value,out}/{kernel,bias}  (width, width), (width,)
    params/block{i}/attn/prompt_k, prompt_v    (L_p, width)   only if L_p > 0
    params/block{i}/ln2/{scale,bias}       (width,)
    params/block{i}/mlp/fc1/{kernel,bias}  (width, mlp_dim), (mlp_dim,)
    params/block{i}/mlp/fc2/{kernel,bias}  (mlp_dim, width), (width,)
    params/final_ln/{scale,bias}           (width,)
    params/head/{kernel,bias}              (width, num_classes), (num_classes,)

No other path contains ``prompt`` or a module called ``head``. There is no
dropout and no BatchNorm, so ``train`` does not change the output.

References:
  Dosovitskiy et al. An Image is Worth 16x16 Words: Transformers for Image
  Recognition at Scale. 2021. https://arxiv.org/abs/2010.11929
  Li & Liang. Prefix-Tuning: Optimizing Continuous Prompts for Generation. 2021.
  https://arxiv.org/abs/2101.00190
  Li et al. Fast-NTK: Parameter-Efficient Unlearning for Large-Scale Models.
  2023. https://arxiv.org/abs/2312.14923 (Fig. 1)
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
  "PromptAttention",
  "VIT_CONFIGS",
  "VIT_MODELS",
  "ViT",
  "ViTBlock",
  "normalize_vit",
  "vit",
  "vit_by_name",
]

# name -> (width, num_heads, mlp_dim); depth is 12 for all three.
VIT_CONFIGS: dict[str, tuple[int, int, int]] = {
  "tiny": (192, 3, 768),
  "small": (384, 6, 1536),
  "base": (768, 12, 3072),
}
VIT_DEPTH = 12
# Standard names -> (config, patch_size, image_size).
VIT_MODELS: dict[str, tuple[str, int, int]] = {
  f"vit_{cfg}_{patch}": (cfg, patch, image)
  for patch, image in ((4, 32), (16, 224))
  for cfg in VIT_CONFIGS
}
_DEFAULT_IMAGE_SIZE = {4: 32, 16: 224}

_LN_EPS = 1e-6  # as in the original ViT
_dense = nn.initializers.xavier_uniform()
_PROMPT_INIT = nn.initializers.normal(stddev=0.02)


def _positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")


class PromptAttention(nn.Module):
  """Multi-head self-attention whose keys and values start with ``num_prompts`` prompts.

  Attributes:
    num_heads: number of heads; must divide the input width.
    num_prompts: ``L_p``, prompt key/value vectors per block; 0 gives plain
      self-attention and creates no prompt parameters.
  """

  num_heads: int
  num_prompts: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Attends from every token to the prompts and all tokens.

    Args:
      x: tokens ``(N, S, width)``.

    Returns:
      ``(N, S, width)``.
    """
    n, s, width = x.shape
    if width % self.num_heads:
      raise ValueError(
          f"width {width} is not divisible by num_heads={self.num_heads}.")
    d = width // self.num_heads
    dense = lambda name: nn.Dense(width, kernel_init=_dense, name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)
    if self.num_prompts > 0:
      shape = (self.num_prompts, width)
      pk = self.param("prompt_k", _PROMPT_INIT, shape, jnp.float32)
      pv = self.param("prompt_v", _PROMPT_INIT, shape, jnp.float32)
      # Prompts are already keys/values: no projection, shared by all samples.
      k = jnp.concatenate([jnp.broadcast_to(pk, (n,) + shape), k], axis=1)
      v = jnp.concatenate([jnp.broadcast_to(pv, (n,) + shape), v], axis=1)
    heads = lambda t: t.reshape(n, t.shape[1], self.num_heads, d)
    logits = jnp.einsum("nqhd,nkhd->nhqk", heads(q), heads(k)) / math.sqrt(d)
    weights = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("nhqk,nkhd->nqhd", weights, heads(v)).reshape(n, s, width)
    return dense("out")(y)


class _Mlp(nn.Module):
  """``fc2(gelu(fc1(x)))``; exact (erf) GELU unless ``gelu_approximate``."""

  hidden: int
  width: int
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.hidden, kernel_init=_dense, name="fc1")(x)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    return nn.Dense(self.width, kernel_init=_dense, name="fc2")(x)


class ViTBlock(nn.Module):
  """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the GELU MLP.
    num_prompts: prefix prompts of this block's attention.
    gelu_approximate: tanh-approximate GELU (the Google ViT code's) instead
      of the exact one (timm's).
  """

  num_heads: int
  mlp_dim: int
  num_prompts: int = 0
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: tokens ``(N, S, width)``.

    Returns:
      ``(N, S, width)``.
    """
    width = x.shape[-1]
    y = nn.LayerNorm(epsilon=_LN_EPS, name="ln1")(x)
    x = x + PromptAttention(self.num_heads, self.num_prompts, name="attn")(y)
    y = nn.LayerNorm(epsilon=_LN_EPS, name="ln2")(x)
    y = _Mlp(self.mlp_dim, width, self.gelu_approximate, name="mlp")(y)
    return x + y


class ViT(nn.Module):
  """Vision Transformer classifier with ``num_prompts`` prefix prompts per block.

  Initialisation: prompts and position embedding ~ N(0, 0.02^2), class token
  zeros, Dense kernels Xavier-uniform with zero bias except ``head``, which
  keeps Flax's default (LeCun normal): a zero head, as in ViT fine-tuning,
  would make the logits independent of the prompts and their NTK zero.

  Attributes:
    num_classes: width of the ``head`` Dense layer.
    patch_size: side ``p`` of the square patches.
    width: token dimension.
    depth: number of blocks ``block0 .. block{depth-1}``.
    num_heads: attention heads; must divide ``width``.
    mlp_dim: hidden width of each MLP.
    num_prompts: ``L_p`` prompt keys and values per block; 0 is a plain ViT.
    image_size: side of the square input images; a multiple of ``patch_size``.
    gelu_approximate: the MLPs use the tanh approximation of GELU, as the
      google-research/vision_transformer and big_vision checkpoints were
      trained with; False (exact erf GELU) matches timm and the ViT paper.

  Example:
    >>> model = ViT(width=32, depth=2, num_heads=2, mlp_dim=64, num_prompts=4,
    ...             image_size=16)
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    >>> logits = model.apply(variables, x)  # x: (N, 16, 16, 3) -> (N, 10)
  """

  num_classes: int = 10
  patch_size: int = 4
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  num_prompts: int = 0
  image_size: int = 32
  gelu_approximate: bool = False

  def __post_init__(self):
    for name in ("num_classes", "patch_size", "width", "depth", "num_heads",
                 "mlp_dim", "image_size"):
      _positive_int(name, getattr(self, name))
    if self.width % self.num_heads:
      raise ValueError(
          f"width={self.width} must be divisible by num_heads={self.num_heads}; "
          "choose a head count that divides the width (e.g. width=64*num_heads).")
    if self.image_size % self.patch_size:
      raise ValueError(
          f"image_size={self.image_size} must be a multiple of patch_size="
          f"{self.patch_size}; resize the images or pick another patch size.")
    if (isinstance(self.num_prompts, bool) or not isinstance(self.num_prompts, int)
        or self.num_prompts < 0):
      raise ValueError(
          f"num_prompts must be an int >= 0 (0 for a plain ViT), got "
          f"{self.num_prompts!r}.")
    super().__post_init__()

  @property
  def num_patches(self) -> int:
    """``T = (image_size / patch_size)^2`` patch tokens (the class token not counted)."""
    return (self.image_size // self.patch_size) ** 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: float images ``(N, image_size, image_size, 3)``, e.g. from
        :func:`normalize_vit`.
      train: accepted for a signature uniform with the CNNs; the model has no
        dropout or BatchNorm, so it changes nothing.

    Returns:
      Logits ``(N, num_classes)``, float32.
    """
    del train
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"x must have shape (N, H, W, 3), got {x.shape}.")
    if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
      raise ValueError(
          f"x has {x.shape[1]}x{x.shape[2]} images but the model was built with "
          f"image_size={self.image_size}; resize the inputs or build ViT with "
          f"image_size={x.shape[1]} (the position embedding depends on it).")
    p = self.patch_size
    x = jnp.asarray(x, jnp.float32)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                kernel_init=_dense, name="patch_embed")(x)
    n = x.shape[0]
    x = x.reshape(n, -1, self.width)  # (N, T, width), patches in row-major order
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)), x], axis=1)
    pos = self.param("pos_embed", nn.initializers.normal(stddev=0.02),
                     (1, self.num_patches + 1, self.width), jnp.float32)
    x = x + pos
    for i in range(self.depth):
      x = ViTBlock(self.num_heads, self.mlp_dim, self.num_prompts,
                   self.gelu_approximate, name=f"block{i}")(x)
    x = nn.LayerNorm(epsilon=_LN_EPS, name="final_ln")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])


def vit(name: str, *, patch_size: int, num_classes: int = 10,
        num_prompts: int = 10, image_size: int | None = None) -> ViT:
  """A named ViT configuration (depth 12) with prefix prompts.

  Args:
    name: ``"tiny"`` (192, 3 heads, MLP 768), ``"small"`` (384, 6, 1536) or
      ``"base"`` (768, 12, 3072); see :data:`VIT_CONFIGS`.
    patch_size: patch side, e.g. 4 (CIFAR) or 16 (ImageNet-size inputs).
    num_classes: head width.
    num_prompts: ``L_p`` prompts per block.
    image_size: input side; None gives 32 for ``patch_size=4`` and 224 for 16.

  Returns:
    An (uninitialised) :class:`ViT`.
  """
  if name not in VIT_CONFIGS:
    raise ValueError(
        f"unknown ViT config {name!r}; valid names are {sorted(VIT_CONFIGS)} "
        f"(or use vit_by_name with one of {sorted(VIT_MODELS)}).")
  if image_size is None:
    if patch_size not in _DEFAULT_IMAGE_SIZE:
      raise ValueError(
          f"no default image_size for patch_size={patch_size!r}; pass "
          "image_size= (defaults exist for patch 4 -> 32 and 16 -> 224).")
    image_size = _DEFAULT_IMAGE_SIZE[patch_size]
  width, heads, mlp = VIT_CONFIGS[name]
  return ViT(num_classes=num_classes, patch_size=patch_size, width=width,
             depth=VIT_DEPTH, num_heads=heads, mlp_dim=mlp,
             num_prompts=num_prompts, image_size=image_size)


def vit_by_name(name: str, *, num_classes: int = 10, num_prompts: int = 10) -> ViT:
  """One of the standard ViTs ``vit_{tiny,small,base}_{4,16}`` (see :data:`VIT_MODELS`).

  ``*_4`` models take 32x32 images, ``*_16`` models 224x224.
  """
  if name not in VIT_MODELS:
    raise ValueError(
        f"unknown ViT name {name!r}; valid names are {sorted(VIT_MODELS)}.")
  config, patch, image = VIT_MODELS[name]
  return vit(config, patch_size=patch, num_classes=num_classes,
             num_prompts=num_prompts, image_size=image)


def normalize_vit(x_uint8: jax.typing.ArrayLike) -> jax.Array:
  """Maps uint8 RGB images to ``[-1, 1]``: ``(x / 255 - 0.5) / 0.5``.

  The mean/std 0.5 convention of the original ViT checkpoints, the same for
  every channel.

  Args:
    x_uint8: uint8 images ``(..., 3)``, e.g. ``(N, 32, 32, 3)``.

  Returns:
    float32 array of the same shape.
  """
  x = jnp.asarray(x_uint8)
  if x.dtype != jnp.uint8:
    raise ValueError(
        f"normalize_vit expects uint8 pixels in [0, 255], got dtype {x.dtype}; "
        "pass the raw images (normalising twice would silently ruin accuracy).")
  if x.ndim < 1 or x.shape[-1] != 3:
    raise ValueError(f"x_uint8 must end in 3 RGB channels, got shape {x.shape}.")
  return (x.astype(jnp.float32) / 255.0 - 0.5) / 0.5
