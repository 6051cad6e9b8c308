"""Evaluation of unlearning: accuracies, output divergence and gap to Retrain.

* :func:`accuracy`, :func:`class_forgetting_report` — accuracy on D_r, D_f and
  held-out data.
* :func:`softmax_kl`, :func:`kl_to_reference` — how far the unlearned model's
  predictive distribution is from a reference (Retrain) model's.
* :func:`avg_gap` — the SFR-on paper's "Avg.D": the mean absolute difference
  to Retrain over a few headline metrics.

Membership inference, relearn time and linear probes live in
:mod:`fastntk_jax.evaluation.mia`, :mod:`fastntk_jax.evaluation.relearn` and :mod:`fastntk_jax.evaluation.probe`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax.core import kernels

__all__ = [
    "DEFAULT_GAP_KEYS",
    "accuracy",
    "avg_gap",
    "class_forgetting_report",
    "kl_to_reference",
    "softmax_js",
    "softmax_kl",
]

#: The metrics the SFR-on paper averages in "Avg.D" (accuracies on D_f, D_r,
#: the test set, and MIA-efficacy).
DEFAULT_GAP_KEYS = ("acc_forget", "acc_retain", "acc_test", "mia")


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


def _logit_pair(logits_p, logits_q):
  """Both logit arrays, checked to be ``(N, C)`` alike, in one float dtype
  (at least float32)."""
  logits_p = jnp.asarray(logits_p)
  logits_q = jnp.asarray(logits_q)
  if logits_p.ndim != 2 or logits_p.shape != logits_q.shape:
    raise ValueError(
        "logits_p and logits_q must both have shape (N, C); got "
        f"{logits_p.shape} and {logits_q.shape}.")
  dtype = jnp.result_type(logits_p.dtype, logits_q.dtype, jnp.float32)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  return logits_p.astype(dtype), logits_q.astype(dtype)


def _kl_rows(logits_p, logits_q):
  log_p = jax.nn.log_softmax(logits_p, axis=-1)
  log_q = jax.nn.log_softmax(logits_q, axis=-1)
  # exp(log_p) underflows to exactly 0 where p does, and 0 * finite = 0, so a
  # vanishing class contributes nothing instead of 0 * log 0 = NaN.
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


_kl_rows_jit = jax.jit(_kl_rows)


def softmax_kl(logits_p, logits_q) -> jax.Array:
  """Per-sample ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)``.

  ``p = softmax(logits_p)`` and ``q = softmax(logits_q)`` are never formed
  before the logarithm: both log-probabilities come from ``log_softmax``, so
  saturated logits give finite results instead of ``log(0)``.

  Args:
    logits_p: ``(N, C)`` logits of the first distribution.
    logits_q: ``(N, C)`` logits of the second distribution.

  Returns:
    ``(N,)`` KL divergences (≥ 0 up to rounding), float32 for float32 input.
  """
  return _kl_rows_jit(*_logit_pair(logits_p, logits_q))


def _js_rows(logits_p, logits_q):
  log_p = jax.nn.log_softmax(logits_p, axis=-1)
  log_q = jax.nn.log_softmax(logits_q, axis=-1)
  log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)
  kl = lambda a: jnp.sum(jnp.exp(a) * (a - log_m), axis=-1)
  return 0.5 * (kl(log_p) + kl(log_q))


_js_rows_jit = jax.jit(_js_rows)


def softmax_js(logits_p, logits_q) -> jax.Array:
  """Per-sample Jensen–Shannon divergence ``½ KL(p ‖ m) + ½ KL(q ‖ m)``,
  ``m = (p + q)/2``, from log-probabilities (finite for saturated logits).

  Symmetric and bounded by ``log 2``, unlike :func:`softmax_kl`.

  Returns:
    ``(N,)`` divergences in nats.
  """
  return _js_rows_jit(*_logit_pair(logits_p, logits_q))


def kl_to_reference(apply_fn: Callable[[Any, Any], Any], params, ref_params,
                    x, *, block_size: int = 256) -> float:
  """Mean over ``x`` of ``KL(p_ref ‖ p_params)``.

  The reference (Retrain) comes first: the divergence weighs the classes by
  how likely the model we want to imitate finds them.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (N, C)``.
    params: the parameters under evaluation (e.g. after unlearning).
    ref_params: the reference parameters (e.g. Retrain's), same structure.
    x: inputs ``(N, ...)``.
    block_size: samples per :func:`fastntk_jax.core.kernels.predict` block.

  Returns:
    The mean KL divergence in nats; NaN when ``x`` is empty.
  """
  if np.shape(x)[:1] == (0,) or np.ndim(x) == 0:
    return float("nan")
  ref = kernels.predict(apply_fn, ref_params, x, block_size=block_size)
  out = kernels.predict(apply_fn, params, x, block_size=block_size)
  return float(jnp.mean(softmax_kl(ref, out)))


def avg_gap(metrics: Mapping[str, float], reference: Mapping[str, float],
            keys: Sequence[str] = DEFAULT_GAP_KEYS) -> float:
  """Mean absolute gap to a reference: ``mean_k |metrics[k] − reference[k]|``.

  With the default keys and ``reference`` = Retrain's metrics this is the
  "Avg.D" of the SFR-on paper. Both dicts must use the same units (the bench
  reports percentages). NaN values propagate (a metric that could not be
  measured makes the gap unknown rather than silently smaller).

  Args:
    metrics: ``{name: value}`` of the method under evaluation.
    reference: ``{name: value}`` of the reference (Retrain).
    keys: the names to average over.

  Returns:
    The mean absolute difference, a float.
  """
  if isinstance(keys, str):
    raise TypeError("keys must be a sequence of metric names, not a single "
                    f"string; wrap it: keys=({keys!r},).")
  keys = tuple(keys)
  if not keys:
    raise ValueError("keys is empty: name at least one metric to compare.")
  for name, d in (("metrics", metrics), ("reference", reference)):
    missing = [k for k in keys if k not in d]
    if missing:
      raise ValueError(
          f"{name} has no value for key {missing[0]!r} (missing: {missing}); "
          f"it has {sorted(d)}. Add it or pass keys= without it.")
  gaps = [abs(float(metrics[k]) - float(reference[k])) for k in keys]
  return math.fsum(gaps) / len(gaps)
