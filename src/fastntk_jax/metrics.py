"""Evaluation of unlearning: accuracy on D_r, D_f and held-out data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from fastntk_jax import kernels

__all__ = ["accuracy", "class_forgetting_report"]


def accuracy(apply_fn: Callable[[Any, Any], Any], params, x, y, *,
             block_size: int = 500) -> float:
  """Fraction of ``x`` whose arg-max logit equals ``y``; NaN when empty."""
  y = np.asarray(y)
  if len(y) == 0:
    return float("nan")
  logits = kernels.predict(apply_fn, params, x, block_size=block_size)
  return float(jnp.mean(jnp.argmax(logits, axis=-1) == jnp.asarray(y)))


def class_forgetting_report(apply_fn, params, retain, forget, test,
                            forget_classes: Sequence[int]) -> dict[str, float]:
  """Accuracies for class forgetting.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits``.
    params: the parameters to evaluate.
    retain, forget, test: ``(x, y)`` pairs.
    forget_classes: the forgotten classes (to split the test set).

  Returns:
    ``{"retain", "forget", "test", "test_retained", "test_forgotten"}``.
  """
  x_t, y_t = test
  y_t = np.asarray(y_t)
  mask = np.isin(y_t, np.asarray(forget_classes))
  x_t = np.asarray(x_t)
  return {
      "retain": accuracy(apply_fn, params, *retain),
      "forget": accuracy(apply_fn, params, *forget),
      "test": accuracy(apply_fn, params, x_t, y_t),
      "test_retained": accuracy(apply_fn, params, x_t[~mask], y_t[~mask]),
      "test_forgotten": accuracy(apply_fn, params, x_t[mask], y_t[mask]),
  }
