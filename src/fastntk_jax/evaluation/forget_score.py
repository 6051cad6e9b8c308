"""The forget score of the NeurIPS 2023 machine-unlearning challenge.

An unlearning method is run many times (different seeds) and so is Retrain.
For every forget-set example, each model gives a *logit-scaled confidence*
``log p_y − log(1 − p_y)``; the two samples of it (unlearned models against
retrained ones) are compared by the best membership test of two simple
families — one threshold, or an interval around the peakier sample — and
that test's false-positive and false-negative rates give a per-example
``(ε, δ)`` privacy estimate

    ε = max(log(1 − δ − FPR) − log FNR, log(1 − δ − FNR) − log FPR), ≥ 0,

maximised over thresholds, with δ = 1e-5. Each example scores points by its
ε bucket — 1 for ε < 0.5, ½ for ε < 1, ¼ for ε < 1.5 … up to
``ceil(log(M − 1))`` with ``M`` models, 0 beyond — and the forget score is
the mean over examples: 1 when the unlearned models cannot be told from
retrained ones, 0 when every example gives them away. The challenge's final
score multiplies it by the ratios of the unlearned to the retrained models'
accuracy on D_r and on the test set (:func:`final_score`).

Conventions kept from the challenge's evaluation (google-deepmind/
unlearning_evaluation, ``metric.py``), re-implemented here in NumPy:

* thresholds are spaced 1/100 apart; the interval family slides a window as
  wide as the narrower sample's range, ±2 around it;
* an example whose one sample's range is below 1 % of the other's gets the
  cap ε = 50 (a collapsed distribution is always distinguishable);
* thresholds with exactly one of FPR, FNR zero are discarded (too few
  samples to estimate them); both zero with perfect separation is ε = ∞,
  capped at 50.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = [
  "DELTA",
  "EPSILON_CAP",
  "ConfidenceGap",
  "ForgetScore",
  "bucket_points",
  "confidence_gap",
  "example_epsilons",
  "final_score",
  "forget_score",
  "logit_scaled_confidence",
]

#: δ of the per-example (ε, δ) estimate.
DELTA = 1e-5
#: The largest ε an example is given.
EPSILON_CAP = 50.0
_PER_UNIT = 100  # thresholds per unit of confidence
_BUFFER = 2.0  # how far the interval family slides beyond the sample


class ForgetScore(NamedTuple):
  """Result of :func:`forget_score`.

  Attributes:
    score: mean points over the forget set, in ``[0, 1]``.
    epsilons: ``(N_f,)`` per-example ε, in ``[0, EPSILON_CAP]``.
    max_epsilon: the largest ε that still earns points, ``ceil(log(M − 1))``.
    num_models: ``M``, models per side.
  """
  score: float
  epsilons: np.ndarray
  max_epsilon: float
  num_models: int


def logit_scaled_confidence(logits, labels) -> np.ndarray:
  """``log p_y − log(1 − p_y)`` per row, computed stably in float64.

  Exact also where ``p_y`` rounds to 1 (the challenge's code adds 1e-45 to
  both probabilities, which caps the confidence near ±103).

  Args:
    logits: ``(..., N, C)``.
    labels: ``(N,)`` integer labels.

  Returns:
    ``(..., N)`` confidences (any real number; 0 is ``p_y = ½``).
  """
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels)
  if z.ndim < 2 or z.shape[-2] != y.shape[0]:
    raise ValueError(f"logits must be (..., N, C) with N = len(labels) = "
                     f"{y.shape[0]}, got {z.shape}.")
  if z.shape[-1] < 2:
    raise ValueError("logits need at least 2 classes.")
  z = z - z.max(axis=-1, keepdims=True)
  idx = np.broadcast_to(y[:, None], z.shape[:-1] + (1,))
  zy = np.take_along_axis(z, idx, axis=-1)[..., 0]
  others = np.where(np.arange(z.shape[-1]) == y[:, None], -np.inf, z)
  log_rest = np.logaddexp.reduce(others, axis=-1)
  return zy - log_rest


def _rates_single(pos, neg):
  """FPR and FNR of "positive iff c ≥ t" over the threshold grid."""
  lo, hi = min(pos.min(), neg.min()), max(pos.max(), neg.max())
  t = np.linspace(lo, hi, max(int(math.ceil((hi - lo) * _PER_UNIT)), 1))
  fnr = (pos[:, None] < t).mean(axis=0)
  fpr = (neg[:, None] >= t).mean(axis=0)
  return fpr, fnr


def _rates_interval(pos, neg):
  """FPR and FNR of "the peakier sample iff l ≤ c ≤ r" over the grid of
  intervals (the peakier sample is the positive one)."""
  if np.ptp(pos) >= np.ptp(neg):
    pos, neg = neg, pos
  width = np.ptp(pos)
  lo, hi = pos.min() + width - _BUFFER, pos.max() + _BUFFER
  right = np.linspace(lo, hi, max(int(math.ceil((hi - lo) * _PER_UNIT)), 1))
  n_left = int(math.ceil(2 * _BUFFER * _PER_UNIT))
  offsets = np.linspace(-width - _BUFFER, -width + _BUFFER, n_left)
  left = (right[:, None] + offsets[None, :]).reshape(-1)
  right = np.repeat(right, n_left)

  def inside(c):
    return ((left[None, :] <= c[:, None]) & (c[:, None] <= right[None, :])
            ).mean(axis=0)

  tpr, fpr = inside(pos), inside(neg)
  return fpr, 1.0 - tpr


def _epsilon(pos, neg, delta: float) -> float:
  """The per-example ε of two samples of confidences (``pos`` has the
  larger median)."""
  spans = sorted([float(np.ptp(pos)), float(np.ptp(neg))])
  if spans[1] == 0 or spans[0] / spans[1] < 0.01:
    return EPSILON_CAP
  fpr, fnr = (np.concatenate(r) for r in zip(_rates_interval(pos, neg),
                                             _rates_single(pos, neg)))
  perfect = (fpr == 0) & (fnr == 0)
  usable = (fpr > 0) & (fnr > 0)
  with np.errstate(divide="ignore", invalid="ignore"):
    eps = np.maximum(np.log(1 - delta - fpr) - np.log(fnr),
                     np.log(1 - delta - fnr) - np.log(fpr))
  eps = np.clip(eps[usable], 0.0, None)
  if perfect.any():
    return EPSILON_CAP
  if eps.size == 0:
    raise ValueError("every threshold had FPR or FNR at 0: the samples are "
                     "too small to estimate ε; use more models.")
  return float(min(np.nanmax(eps), EPSILON_CAP))


def example_epsilons(unlearned, retrained, delta: float = DELTA) -> np.ndarray:
  """Per-example ε of ``unlearned`` against ``retrained`` confidences.

  Args:
    unlearned, retrained: ``(M, N_f)``: each model's logit-scaled confidence
      (:func:`logit_scaled_confidence`) on each forget example; ``M ≥ 2``
      models per side, the same ``M``.
    delta: δ.

  Returns:
    ``(N_f,)`` ε in ``[0, EPSILON_CAP]``.
  """
  u, r = np.asarray(unlearned, np.float64), np.asarray(retrained, np.float64)
  if u.ndim != 2 or u.shape != r.shape:
    raise ValueError(f"unlearned and retrained must both be (models, "
                     f"examples), got {u.shape} and {r.shape}.")
  if u.shape[0] < 2:
    raise ValueError(f"need at least 2 models per side, got {u.shape[0]}.")
  if not (np.isfinite(u).all() and np.isfinite(r).all()):
    raise ValueError("confidences must be finite.")
  out = np.empty(u.shape[1])
  for i in range(u.shape[1]):
    a, b = r[:, i], u[:, i]
    pos, neg = (a, b) if np.median(a) > np.median(b) else (b, a)
    out[i] = _epsilon(pos, neg, delta)
  return out


class ConfidenceGap(NamedTuple):
  """Result of :func:`confidence_gap`: why a forget score is what it is.

  Attributes:
    mean_difference: mean over examples of (unlearned − retrained) mean
      confidence, in confidence units; signed, so shifts of opposite sign
      on different examples cancel (``shift_in_sds`` does not).
    retrain_sd: mean over examples of the retrained models' standard
      deviation: how far two Retrains differ on one example.
    shift_in_sds: mean over examples of |mean difference| / retrained SD:
      the shift in units of Retrain's own spread (about 0 for another
      Retrain; above 1 a few dozen models tell the two apart).
    spread_ratio: mean over examples of unlearned SD / retrained SD.
  """
  mean_difference: float
  retrain_sd: float
  shift_in_sds: float
  spread_ratio: float


def confidence_gap(unlearned, retrained) -> ConfidenceGap:
  """How the unlearned models' confidences differ from Retrain's, per
  example: the mean shift, in confidence units and in units of Retrain's
  spread over models, and the ratio of the spreads.

  Args:
    unlearned, retrained: ``(M, N_f)`` logit-scaled confidences, as for
      :func:`example_epsilons` (the two ``M`` may differ here).

  Returns:
    :class:`ConfidenceGap`.
  """
  u, r = np.asarray(unlearned, np.float64), np.asarray(retrained, np.float64)
  if u.ndim != 2 or r.ndim != 2 or u.shape[1] != r.shape[1]:
    raise ValueError(f"unlearned and retrained must be (models, examples) "
                     f"with the same examples, got {u.shape} and {r.shape}.")
  if min(u.shape[0], r.shape[0]) < 2:
    raise ValueError("need at least 2 models per side.")
  if not (np.isfinite(u).all() and np.isfinite(r).all()):
    raise ValueError("confidences must be finite.")
  diff = u.mean(0) - r.mean(0)
  sd_u, sd_r = u.std(0, ddof=1), r.std(0, ddof=1)
  tiny = np.finfo(np.float64).tiny
  return ConfidenceGap(float(diff.mean()), float(sd_r.mean()),
                       float(np.mean(np.abs(diff) / np.maximum(sd_r, tiny))),
                       float(np.mean(sd_u / np.maximum(sd_r, tiny))))


def bucket_points(num_models: int) -> list[tuple[float, float]]:
  """``(upper ε of the bucket, points)``: 1 below 0.5, ½ below 1, … for the
  buckets that end at most at ``ceil(log(M − 1))``."""
  max_eps = math.ceil(math.log(num_models - 1)) if num_models > 2 else 0
  out, start, points = [], 0.0, 1.0
  while start + 0.5 <= max_eps:
    out.append((start + 0.5, points))
    start, points = start + 0.5, points / 2
  return out


def forget_score(unlearned, retrained, delta: float = DELTA) -> ForgetScore:
  """The challenge's forget score: mean bucket points of the per-example ε.

  Args:
    unlearned, retrained: ``(M, N_f)`` logit-scaled confidences, as for
      :func:`example_epsilons`.
    delta: δ.

  Returns:
    :class:`ForgetScore`.
  """
  eps = example_epsilons(unlearned, retrained, delta)
  m = int(np.shape(unlearned)[0])
  buckets = bucket_points(m)
  points = np.zeros_like(eps)
  for i, e in enumerate(eps):
    for upper, p in buckets:
      if e < upper:
        points[i] = p
        break
  max_eps = float(buckets[-1][0]) if buckets else 0.0
  return ForgetScore(float(points.mean()), eps, max_eps, m)


def final_score(score: float, acc_retain: float, acc_test: float,
                retrain_acc_retain: float, retrain_acc_test: float) -> float:
  """The challenge's final score: forget score × (RA / RA_Retrain) ×
  (TA / TA_Retrain), the accuracies averaged over each side's models."""
  if min(retrain_acc_retain, retrain_acc_test) <= 0:
    raise ValueError("Retrain's accuracies must be > 0.")
  return float(score * (acc_retain / retrain_acc_retain)
               * (acc_test / retrain_acc_test))
