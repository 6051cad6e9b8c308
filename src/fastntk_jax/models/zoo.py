"""The model registry: names, backbones, weights and PEFT selections.

This is the edge where names on the command line become Flax modules, weight
files become variables and a PEFT selection becomes the pure
``apply_fn(peft, x) -> logits`` that training and unlearning see.

=================  ============  ===========  ==========================
name               family        input        PEFT parameters
=================  ============  ===========  ==========================
resnet20 … 110     CIFAR ResNet  32 px        BatchNorm scale/shift+head
mobilenetv2        MobileNetV2   32 px        BatchNorm scale/shift+head
vit_{tiny,small,   ViT           32 px (/4),  prompts (keys, values of
base}_{4,16}                     224 px (/16) every block) + head
=================  ============  ===========  ==========================

Weights: ``resnet20`` ships with the package; ``resnet32/44/56`` come from
``../shared/data/weights``; every model accepts a backbone checkpoint written
by ``fastntk pretrain`` (:mod:`fastntk_jax.io.checkpoint`, kind ``"backbone"``),
ResNets a PyTorch-layout ``.npz``, and ViTs a google-research
vision_transformer/big_vision ``.npz`` or a timm ``.safetensors``
(:mod:`fastntk_jax.models.vit_checkpoints`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax.io import checkpoint
from fastntk_jax import peft
from fastntk_jax.models import resnet as _resnet
from fastntk_jax.models.resnet import CifarResNet, load_resnet_cifar10

__all__ = [
    "MODEL_NAMES",
    "ModelSpec",
    "NnxModel",
    "DEFAULT_WEIGHTS_DATA",
    "PeftModel",
    "backbone_training_data",
    "build",
    "init_variables",
    "load_backbone",
    "nnx_model",
    "param_counts",
    "peft_model",
    "peft_predicate",
    "resnet_bn_head",
    "spec",
    "with_new_head",
]


class ModelSpec(NamedTuple):
  """What the registry knows about a model name.

  Attributes:
    name: registry name.
    family: ``"resnet"``, ``"mobilenetv2"`` or ``"vit"``.
    image_size: input height = width in pixels.
    peft: the paper's PEFT selection: ``"batchnorm"`` or ``"prompts"``
      (each plus the head).
  """
  name: str
  family: str
  image_size: int
  peft: str


def _specs() -> dict[str, ModelSpec]:
  out = {}
  for depth in _resnet.SUPPORTED_DEPTHS:
    out[f"resnet{depth}"] = ModelSpec(f"resnet{depth}", "resnet", 32,
                                      "batchnorm")
  out["mobilenetv2"] = ModelSpec("mobilenetv2", "mobilenetv2", 32, "batchnorm")
  for size in ("tiny", "small", "base"):
    out[f"vit_{size}_4"] = ModelSpec(f"vit_{size}_4", "vit", 32, "prompts")
    out[f"vit_{size}_16"] = ModelSpec(f"vit_{size}_16", "vit", 224, "prompts")
  return out


_SPECS = _specs()
MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)
DEFAULT_NUM_PROMPTS = 5


class PeftModel(NamedTuple):
  """A model prepared for PEFT and Fast-NTK.

  Attributes:
    apply_fn: ``apply_fn(peft, x) -> logits``, BatchNorm in inference mode.
    init_params: ``w_0``: pretrained PEFT parameters with a new head.
    frozen: the rest of the variable tree (conv kernels, BatchNorm statistics).
    module: the Flax module.
    num_total: scalars in the whole model (trainable parameters, not stats).
    num_peft: scalars in the PEFT pytree.
  """
  apply_fn: Callable[[Any, Any], jax.Array]
  init_params: Any
  frozen: Any
  module: Any
  num_total: int
  num_peft: int


#: What the weights :func:`load_backbone` finds by default were trained on
#: (akamaster/pytorch_resnet_cifar10: all of CIFAR-10's train split).
DEFAULT_WEIGHTS_DATA = {f"resnet{d}": "cifar10/train" for d in (20, 32, 44, 56)}


def backbone_training_data(name: str, weights=None) -> str | None:
  """``"dataset/split"`` the backbone was trained on, or None when unknown
  (a random initialisation, or a weights file given by the user)."""
  spec(name)
  return DEFAULT_WEIGHTS_DATA.get(name) if weights in (None, "") else None


def spec(name: str) -> ModelSpec:
  """The :class:`ModelSpec` of ``name``; unknown names list the valid ones."""
  if name not in _SPECS:
    raise ValueError(f"unknown model {name!r}; choose one of "
                     f"{', '.join(MODEL_NAMES)}.")
  return _SPECS[name]


def build(name: str, *, num_classes: int = 10,
          num_prompts: int = DEFAULT_NUM_PROMPTS):
  """The Flax module for ``name``.

  Args:
    name: a registry name (:data:`MODEL_NAMES`).
    num_classes: width of the head.
    num_prompts: prompt length L_p of ViTs (ignored by CNNs); 0 gives the
      plain ViT used for pre-training.
  """
  s = spec(name)
  if s.family == "resnet":
    return _resnet.CifarResNet(depth=int(name[len("resnet"):]),
                               num_classes=num_classes)
  if s.family == "mobilenetv2":
    from fastntk_jax.models.mobilenetv2 import MobileNetV2
    return MobileNetV2(num_classes=num_classes)
  from fastntk_jax.models.vit import vit as make_vit
  _, size, patch = name.split("_")
  return make_vit(size, patch_size=int(patch), num_classes=num_classes,
                  num_prompts=num_prompts)


def preprocess_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """Maps uint8 images ``(N, H, W, 3)`` to the model's float32 input."""
  if spec(name).family == "vit":
    from fastntk_jax.models.vit import normalize_vit
    return normalize_vit
  return _resnet.normalize_cifar


def init_variables(module, image_size: int, seed: int = 0) -> dict:
  """Fresh variables of ``module`` for ``image_size`` inputs (NumPy leaves)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  v = jax.jit(lambda k: module.init(k, x))(jax.random.PRNGKey(seed))
  return jax.tree_util.tree_map(np.asarray, jax.device_get(
      {k: dict(c) for k, c in v.items()}))


def param_counts(name: str, *, num_classes: int = 10,
                 num_prompts: int = DEFAULT_NUM_PROMPTS) -> tuple[int, int]:
  """``(total, peft)`` parameter counts of ``name`` without running it.

  ``total`` counts every trainable parameter (prompts and head included;
  BatchNorm running statistics excluded); ``peft`` counts the paper's
  selection (:func:`peft_predicate`).
  """
  module = build(name, num_classes=num_classes, num_prompts=num_prompts)
  size = spec(name).image_size
  shapes = jax.eval_shape(
      lambda k: module.init(k, jnp.zeros((1, size, size, 3), jnp.float32)),
      jax.random.PRNGKey(0))
  shapes = {k: dict(c) for k, c in shapes.items()}
  sel, _ = peft.split(shapes, peft_predicate(name, shapes))
  num = lambda t: int(sum(int(np.prod(l.shape))
                          for l in jax.tree_util.tree_leaves(t)))
  return num(shapes["params"]), num(sel)


def peft_predicate(name: str, variables: Mapping, *,
                   mode: str = "peft") -> peft.Predicate:
  """The parameters to tune.

  Args:
    name: registry name.
    variables: the variable tree the predicate will split.
    mode: ``"peft"`` (the paper's selection: BatchNorm or prompts, plus the
      head) or ``"all"`` (every parameter; BatchNorm statistics stay frozen).
  """
  if mode == "all":
    return lambda path, leaf: path[0] == "params"
  if mode != "peft":
    raise ValueError(f"mode must be 'peft' or 'all', got {mode!r}.")
  if spec(name).peft == "batchnorm":
    return peft.any_of(peft.batchnorm(variables), peft.head("head"))
  return peft.any_of(peft.prompts("prompt"), peft.head("head"))


def _overlay(fresh: Mapping, loaded: Mapping, path=()) -> dict:
  """``fresh`` with every leaf that ``loaded`` also has replaced by it."""
  out = {}
  for k, v in fresh.items():
    if isinstance(v, Mapping):
      sub = loaded.get(k, {}) if isinstance(loaded, Mapping) else {}
      out[k] = _overlay(v, sub, path + (k,))
    elif isinstance(loaded, Mapping) and k in loaded:
      w = np.asarray(loaded[k])
      if w.shape != np.shape(v):
        raise ValueError(
            f"backbone weight {'/'.join(path + (k,))} has shape {w.shape}, the "
            f"model expects {np.shape(v)}; was it made for another model?")
      out[k] = w
    else:
      out[k] = v
  return out


def load_backbone(name: str, weights: str | Path | None = None, *,
                  num_prompts: int = DEFAULT_NUM_PROMPTS,
                  seed: int = 0) -> tuple[Any, dict, bool]:
  """The module and its variables, pretrained where weights exist.

  Args:
    name: registry name.
    weights: a ``fastntk pretrain`` checkpoint; for ResNets a PyTorch-layout
      ``.npz``; for ViTs a vision_transformer/big_vision ``.npz`` or a timm
      ``.safetensors`` of the same architecture (its position embedding is
      resampled to the model's input size; prompts are new); None uses the shipped/shared CIFAR-10 weights of
      ResNet-20/32/44/56 and a random initialisation for the others.
    num_prompts: ViT prompt length (prompts are new: never in a backbone).
    seed: initialisation of whatever the weights do not hold.

  Returns:
    ``(module, variables, pretrained)``; the head keeps the backbone's
    classes (see :func:`peft_model` for a new head).
  """
  s = spec(name)
  if weights is not None and not Path(weights).is_file():
    raise FileNotFoundError(f"--weights: no file at {weights}.")
  suffix = Path(weights).suffix if weights is not None else ""
  if s.family == "vit" and suffix in (".npz", ".safetensors"):
    from fastntk_jax.models import vit_checkpoints
    from fastntk_jax.models.vit import VIT_CONFIGS, VIT_DEPTH
    _, size, patch = name.split("_")
    width, heads, mlp = VIT_CONFIGS[size]
    module, variables, _ = vit_checkpoints.load_vit(
        weights, num_prompts=num_prompts, image_size=s.image_size,
        num_heads=heads, seed=seed,
        expect={"width": width, "depth": VIT_DEPTH, "mlp_dim": mlp,
                "patch_size": int(patch)})
    return module, variables, True
  if weights is not None and suffix == ".npz":
    if s.family != "resnet":
      raise ValueError(f"{weights}: PyTorch .npz weights exist only for CIFAR "
                       "ResNets; pass a checkpoint from `fastntk pretrain`.")
    module, variables = _resnet.load_resnet_cifar10(int(name[6:]), path=weights)
    return module, jax.tree_util.tree_map(np.asarray, variables), True
  if weights is not None:
    ckpt = checkpoint.load(weights, expect_kind="backbone")
    if ckpt.config.get("model") != name:
      raise ValueError(f"{weights} holds a {ckpt.config.get('model')!r} "
                       f"backbone, not {name!r}; pass --model "
                       f"{ckpt.config.get('model')}.")
    num_classes = int(ckpt.config.get("num_classes", 10))
    module = build(name, num_classes=num_classes, num_prompts=num_prompts)
    fresh = init_variables(module, s.image_size, seed)
    return module, _overlay(fresh, ckpt.trees["variables"]), True
  if s.family == "resnet" and int(name[6:]) in (20, 32, 44, 56):
    try:
      module, variables = _resnet.load_resnet_cifar10(int(name[6:]))
      return module, jax.tree_util.tree_map(np.asarray, variables), True
    except FileNotFoundError:
      pass
  module = build(name, num_prompts=num_prompts)
  return module, init_variables(module, s.image_size, seed), False


def peft_model(name: str, module, variables: Mapping, *, num_classes: int,
               mode: str = "peft", new_head: bool = True,
               head_scale: float = 0.1, seed: int = 0) -> PeftModel:
  """Splits a backbone into PEFT parameters and the frozen rest.

  Args:
    name: registry name.
    module, variables: from :func:`load_backbone`.
    num_classes: classes of the downstream task.
    mode: ``"peft"`` or ``"all"`` (:func:`peft_predicate`).
    new_head: replace the head by a new one (Flax's default initialisation
      times ``head_scale``, zero bias; see
      :func:`resnet_bn_head` for why 0.1).
    head_scale: scale of the new head's kernel.
    seed: the new head's initialisation.
  """
  if new_head or getattr(module, "num_classes", num_classes) != num_classes:
    module, variables = with_new_head(name, module, variables,
                                      num_classes=num_classes,
                                      head_scale=head_scale, seed=seed)
  pred = peft_predicate(name, variables, mode=mode)
  apply_fn, w0, frozen = peft.make_apply_fn(module, variables, pred)
  return PeftModel(apply_fn, w0, frozen, module,
                  peft.count_params(variables["params"]), peft.count_params(w0))


def resnet_bn_head(depth: int = 20, *, num_classes: int = 10, seed: int = 0,
                   head_scale: float = 0.1,
                   weights: str | None = None) -> PeftModel:
  """A pretrained CIFAR ResNet with BatchNorm + a new head as PEFT parameters.

  Args:
    depth: 20 (weights shipped), 32/44/56 (weights in ../shared/data) or a
      ``weights`` path.
    num_classes: outputs of the new head.
    seed: initialisation of the new head.
    head_scale: the new head's kernel is Flax's default Dense initialisation
      times ``head_scale`` (bias zero). Near-zero initial logits matter for MSE
      fine-tuning: with the full-scale head (logits ≈ 0.8 against one-hot
      targets) MSE fine-tuning with Adam at 1e-2 collapsed to a near-constant
      output (13 % on D_r after 6 epochs; docs/defaults.md, section 3);
      a zero head would make the BatchNorm Jacobian vanish at ``w_0``.
    weights: optional path to a PyTorch-layout ``.npz`` checkpoint.

  Returns:
    :class:`PeftModel`; ``apply_fn`` takes normalised images
    (:func:`fastntk_jax.models.normalize_cifar`).
  """
  model, variables = load_resnet_cifar10(depth, path=weights)
  if num_classes != model.num_classes:
    model = CifarResNet(depth=depth, num_classes=num_classes)
  fresh = model.init(jax.random.PRNGKey(seed), np.zeros((1, 32, 32, 3),
                                                        np.float32))
  params = dict(variables["params"])
  new_head = fresh["params"]["head"]  # a new classification head
  params["head"] = {"kernel": new_head["kernel"] * head_scale,
                    "bias": np.zeros_like(new_head["bias"])}
  variables = {"params": params, "batch_stats": variables["batch_stats"]}
  predicate = peft.any_of(peft.batchnorm(variables), peft.head("head"))
  apply_fn, w0, frozen = peft.make_apply_fn(model, variables, predicate)
  return PeftModel(apply_fn, w0, frozen, model,
                   peft.count_params(variables["params"]),
                   peft.count_params(w0))


def with_new_head(name: str, module, variables: Mapping, *, num_classes: int,
                  head_scale: float = 0.1, seed: int = 0):
  """``(module, variables)`` with a new ``head`` of ``num_classes`` outputs:
  Flax's default initialisation times ``head_scale``, zero bias."""
  variables = {k: dict(v) for k, v in variables.items()}
  module = module.clone(num_classes=num_classes)
  fresh = init_variables(module, spec(name).image_size, seed)
  head = fresh["params"]["head"]
  variables["params"]["head"] = {
      "kernel": np.asarray(head["kernel"]) * head_scale,
      "bias": np.zeros_like(head["bias"])}
  return module, variables


class NnxModel(NamedTuple):
  """A zoo model as a Flax NNX module, with its PEFT filter.

  Attributes:
    model: the ``nnx.Module`` (in inference mode: BatchNorm on running
      statistics); ``model(x)`` gives logits for preprocessed ``x``
      (:func:`preprocess_fn`).
    peft_filter: the NNX filter of the paper's PEFT selection, for
      :func:`fastntk_jax.peft.nnx.make_apply_fn`.
    pretrained: the backbone weights were loaded (not a random init).
  """
  model: Any
  peft_filter: Any
  pretrained: bool


def nnx_model(name: str, weights: str | Path | None = None, *,
              num_classes: int = 10, num_prompts: int = DEFAULT_NUM_PROMPTS,
              head_scale: float = 0.1, seed: int = 0) -> NnxModel:
  """A zoo model in Flax NNX: pretrained backbone, a new head.

  CIFAR ResNets are native NNX (:mod:`fastntk_jax.models.resnet_nnx`, the same
  names and numbers as the Linen port); the ViTs and MobileNetV2 are their
  Linen modules wrapped by ``flax.nnx.bridge.ToNNX``. Either way the weights
  are those :func:`load_backbone` finds, and the PEFT filter selects what
  :func:`peft_predicate` selects.

  Example::

    m = zoo.nnx_model("resnet20")
    peft = fastntk_jax.peft.nnx.make_apply_fn(m.model, m.peft_filter)
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from fastntk_jax.models import resnet_nnx  # pylint: disable=import-outside-toplevel
  from fastntk_jax.peft import nnx as peft_nnx  # pylint: disable=import-outside-toplevel
  s = spec(name)
  module, variables, pretrained = load_backbone(
      name, weights, num_prompts=num_prompts if s.family == "vit" else 0,
      seed=seed)
  module, variables = with_new_head(name, module, variables,
                                    num_classes=num_classes,
                                    head_scale=head_scale, seed=seed)
  rngs = nnx.Rngs(seed)
  if s.family == "resnet":
    model = resnet_nnx.CifarResNet(module.depth, num_classes, rngs=rngs)
  else:
    model = nnx.bridge.ToNNX(module, rngs=rngs)
    nnx.bridge.lazy_init(model, jnp.zeros((1, s.image_size, s.image_size, 3),
                                          jnp.float32))
  resnet_nnx.load_linen_variables(model, variables)
  model.eval()
  linen_pred = peft_predicate(name, variables)

  def selected(path, value):
    return (isinstance(value, nnx.Param)
            and bool(linen_pred(("params",) + tuple(map(str, path)), value)))

  filt = (peft_nnx.any_of(peft_nnx.batchnorm(model), peft_nnx.head())
          if s.family == "resnet" else selected)
  return NnxModel(model, filt, pretrained)
