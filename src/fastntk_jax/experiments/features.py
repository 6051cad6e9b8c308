"""Penultimate features of a Flax classifier: the input of its head.

The linear-probe risk analysis (Fast-NTK paper, Table III) trains a new linear
head on frozen backbone features. Every model of the zoo ends in a Dense layer
named ``head``; its input is captured with :func:`flax.linen.intercept_methods`,
so no model needs a special "features" method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

__all__ = ["head_input_fn"]


def head_input_fn(module: nn.Module, *, head: str = "head",
                  **apply_kwargs) -> Callable[[Mapping, Any], jax.Array]:
  """``features(variables, x) -> (N, F)``: the input of ``module``'s head.

  Args:
    module: a Flax classifier with a submodule named ``head``.
    head: the head's name.
    **apply_kwargs: for ``module.apply`` (default ``train=False``: BatchNorm
      in inference mode, as everywhere in the bench).

  Returns:
    A function of the full variable tree and a batch of inputs.

  Raises:
    ValueError (when called): the module has no submodule named ``head``.
  """
  apply_kwargs.setdefault("train", False)

  def features(variables, x):
    captured = []

    def interceptor(next_fun, args, kwargs, context):
      if (context.module.name == head and context.method_name == "__call__"
          and not captured):
        captured.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      module.apply(variables, x, **apply_kwargs)
    if not captured:
      raise ValueError(f"head={head!r}: {type(module).__name__} has no "
                       "submodule of that name; pass the name of its final "
                       "Dense layer.")
    feats = captured[0]
    return feats.reshape(feats.shape[0], -1)

  return features
