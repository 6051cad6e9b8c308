"""Ready-made PEFT problems: a pretrained backbone, a new head, its ``apply_fn``.

This is the edge where Flax modules and weight files meet the core: it returns
the pure ``apply_fn(peft, x) -> logits`` and the PEFT pytree ``w_0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from fastntk_jax import peft
from fastntk_jax.models import CifarResNet, load_resnet_cifar10

__all__ = ["PeftModel", "class_split", "resnet_bn_head"]


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


def class_split(x, y, forget_classes: Sequence[int]):
  """Splits ``(x, y)`` into ``retain`` and ``forget`` pairs by class."""
  y = np.asarray(y)
  mask = np.isin(y, np.asarray(list(forget_classes)))
  if not mask.any():
    raise ValueError(f"forget_classes={list(forget_classes)}: no sample has "
                     "these labels.")
  x = np.asarray(x)
  return (x[~mask], y[~mask]), (x[mask], y[mask])
