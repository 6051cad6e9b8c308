"""Membership inference: how much an unlearned model still "remembers" D_f.

The "MIA-efficacy" of SalUn (Fan et al. 2024, https://arxiv.org/abs/2310.12508)
and SFR-on: an attack learns to tell members (the retain set D_r, label 1)
from non-members (the held-out test set, label 0) from the model's outputs on
them, and is then applied to the forget set D_f. The efficacy is the fraction
of D_f the attack calls NON-member: higher means more forgotten, and
Retrain's value is the target (a model that never saw D_f is not necessarily
at 1: D_f may simply look like training data).

The attack's features are computed per sample from the logits and the label
(:func:`output_features`): the confidence ``p_y``, the entropy, and the
modified entropy of Song & Mittal (2021, https://arxiv.org/abs/2003.10595).

:func:`loss_auc` is the threshold-free loss attack: the AUC of "lower loss ⇒
member", 0.5 when members and non-members are indistinguishable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

__all__ = [
    "FEATURES",
    "MIAResult",
    "loss_auc",
    "mia_efficacy",
    "output_features",
    "per_sample_loss",
]

#: Column names of :func:`output_features`, in order.
FEATURES = ("confidence", "entropy", "modified_entropy")


class NonFiniteLogitsError(ValueError):
  """The model under evaluation gives NaN or infinite logits (e.g. a
  baseline whose optimisation diverged)."""


def _check_logits(logits, y, name: str):
  logits = np.asarray(logits, np.float64)
  y = np.asarray(y)
  if logits.ndim != 2 or logits.shape[1] < 2:
    raise ValueError(f"{name}: logits must have shape (N, C) with C >= 2; got "
                     f"{logits.shape}.")
  if y.shape != logits.shape[:1]:
    raise ValueError(f"{name}: labels must have shape ({logits.shape[0]},) to "
                     f"match the logits; got {y.shape}.")
  if y.size and not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"{name}: labels must be integers; got dtype {y.dtype}.")
  if y.size and (y.min() < 0 or y.max() >= logits.shape[1]):
    raise ValueError(f"{name}: labels must lie in [0, {logits.shape[1]}); got "
                     f"range [{y.min()}, {y.max()}].")
  if not np.all(np.isfinite(logits)):
    raise NonFiniteLogitsError(f"{name}: logits contain NaN or inf; evaluate a model "
                     "whose outputs are finite.")
  return logits, y.astype(np.int64)


def _lse_parts(z):
  """``logsumexp`` over the last axis as ``(m, l)`` with ``lse = m + l``.

  ``m`` is the row maximum and ``l = log1p(Σ_{j≠argmax} exp(z_j − m))``: the
  arg-max term is taken out of the sum and added back by ``log1p``, so that
  ``log p`` of a near-certain class, ``(z_k − m) − l = −l``, keeps its tiny
  value (``−e^{−50}``, not 0). Rows without a finite entry give ``m = -inf``.
  """
  n = np.arange(z.shape[0])
  k = np.argmax(z, axis=-1)
  m = z[n, k]
  finite_m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(z - finite_m[:, None])
  e[n, k] = 0.0
  return m, np.log1p(np.sum(e, axis=-1))


def _log_softmax(z):
  m, l = _lse_parts(z)
  return (z - m[:, None]) - l[:, None]


def _log1m_softmax(z, log_p):
  """``log(1 − p_i)`` for every class, accurate even when ``p_i → 1``.

  ``log1p(−p_i)`` is accurate for ``p_i ≤ ½``, which holds for every class but
  the arg-max. For the arg-max ``k``, ``1 − p_k = Σ_{j≠k} p_j``, so
  ``log(1 − p_k) = logsumexp_{j≠k} z_j − logsumexp_j z_j``: no cancellation.
  """
  with np.errstate(divide="ignore"):  # the arg-max entry is replaced below
    out = np.log1p(-np.exp(log_p))
  n = np.arange(z.shape[0])
  k = np.argmax(z, axis=-1)
  others = z.copy()
  others[n, k] = -np.inf
  m_o, l_o = _lse_parts(others)
  m, l = _lse_parts(z)
  out[n, k] = (m_o - m) + (l_o - l)
  return out


def output_features(logits, y) -> np.ndarray:
  """Per-sample attack features from logits and labels.

  With ``p = softmax(logits)``:

  * confidence ``p_y``;
  * entropy ``H(p) = −Σ_i p_i log p_i``;
  * modified entropy (Song & Mittal 2021, Eq. for ``Mentr``)
    ``Mentr(p, y) = −(1 − p_y) log p_y − Σ_{i≠y} p_i log(1 − p_i)``.

  ``Mentr`` is small both when the model is confidently right (``p_y → 1``)
  and large when it is confidently wrong, unlike the entropy, which cannot
  see the label. All logarithms are taken from log-probabilities
  (``log p`` by log-softmax, ``log(1 − p)`` by a log-sum-exp over the other
  classes), so saturated outputs give finite values.

  Args:
    logits: ``(N, C)`` logits, ``C >= 2``.
    y: ``(N,)`` integer labels.

  Returns:
    float64 array ``(N, 3)``: columns ``[confidence, entropy,
    modified_entropy]`` (see :data:`FEATURES`).
  """
  z, y = _check_logits(logits, y, "output_features")
  log_p = _log_softmax(z)
  p = np.exp(log_p)
  n = np.arange(z.shape[0])
  entropy = -np.sum(p * log_p, axis=-1)
  log1m_p = _log1m_softmax(z, log_p)
  one_minus_py = np.exp(log1m_p[n, y])
  other = p * log1m_p
  other[n, y] = 0.0
  mentr = -one_minus_py * log_p[n, y] - np.sum(other, axis=-1)
  return np.stack([p[n, y], entropy, mentr], axis=-1)


def per_sample_loss(logits, y, loss: str = "ce") -> np.ndarray:
  """Per-sample loss, float64 ``(N,)``.

  Args:
    logits: ``(N, C)`` logits.
    y: ``(N,)`` integer labels.
    loss: ``"ce"`` (cross-entropy ``−log softmax(f)_y``) or ``"mse"``
      (``½‖f − onehot(y)‖²``, the loss of :func:`fastntk_jax.training.train.loss_fn`).

  Returns:
    The loss of each sample.
  """
  if loss not in ("ce", "mse"):
    raise ValueError(f"loss must be 'ce' or 'mse', got {loss!r}.")
  z, y = _check_logits(logits, y, "per_sample_loss")
  n = np.arange(z.shape[0])
  if loss == "ce":
    return -_log_softmax(z)[n, y]
  target = np.zeros_like(z)
  target[n, y] = 1.0
  return 0.5 * np.sum((z - target) ** 2, axis=-1)


def loss_auc(member_losses, nonmember_losses) -> float:
  """AUC of the loss-threshold attack (members should have LOWER loss).

  ``AUC = P(ℓ_member < ℓ_nonmember) + ½ P(ℓ_member = ℓ_nonmember)`` over all
  member/non-member pairs, computed exactly from mid-ranks (the Mann–Whitney
  U statistic) in ``O(n log n)``. 1 means every member has a lower loss than
  every non-member, 0.5 means indistinguishable.

  Args:
    member_losses: ``(M,)`` losses of members.
    nonmember_losses: ``(K,)`` losses of non-members.

  Returns:
    The AUC in ``[0, 1]``.
  """
  a = np.asarray(member_losses, np.float64).reshape(-1)
  b = np.asarray(nonmember_losses, np.float64).reshape(-1)
  for name, v in (("member_losses", a), ("nonmember_losses", b)):
    if v.size == 0:
      raise ValueError(f"{name} is empty: the AUC needs samples on both sides.")
    if np.any(np.isnan(v)):
      raise ValueError(f"{name} contains NaN; NaN losses cannot be ranked.")
  ranks = stats.rankdata(np.concatenate([a, b]), method="average")
  # Sum of the non-members' mid-ranks minus its minimum counts the pairs where
  # the non-member's loss is higher, ties counting ½.
  u = ranks[a.size:].sum() - b.size * (b.size + 1) / 2.0
  return float(u / (a.size * b.size))


class MIAResult(NamedTuple):
  """Result of :func:`mia_efficacy`.

  Attributes:
    efficacy: fraction of D_f predicted NON-member, in ``[0, 1]``.
    member_rate: ``1 − efficacy``.
    attack_train_accuracy: accuracy of the attack on every shadow sample (all
      of D_r and of the test set, including those left out by balancing).
    attack_balanced_accuracy: accuracy on the balanced set it was fitted on
      (equal numbers of members and non-members, so ½(TPR + TNR)); 0.5 means
      the attack learnt nothing.
    num_shadow: shadow samples per side in the fit.
    feature_names: the features used, in order.
    attack_auc: the AUC of the attack's score on the balanced set it was
      fitted on (members against non-members); 0.5 = no signal.
  """
  efficacy: float
  member_rate: float
  attack_train_accuracy: float
  attack_balanced_accuracy: float
  num_shadow: int
  feature_names: tuple
  attack_auc: float = float("nan")


def _fit_logistic(x, t, l2: float, max_iter: int = 100, tol: float = 1e-10):
  """L2-regularised logistic regression with an intercept, by Newton's method.

  Minimises ``Σ_n log(1 + exp(−s_n (w·x_n + b))) + ½ l2 ‖w‖²`` (``s = 2t − 1``;
  the intercept is not penalised). The objective is strictly convex for
  ``l2 > 0``, so the optimum is finite even on separable data; a backtracking
  line search keeps Newton's steps from overshooting.

  Returns:
    ``(w (F,), b)``.
  """
  n, f = x.shape
  a = np.concatenate([x, np.ones((n, 1))], axis=1)
  s = 2.0 * t - 1.0
  reg = np.full(f + 1, l2)
  reg[-1] = 0.0

  def objective(theta):
    return np.sum(np.logaddexp(0.0, -s * (a @ theta))) + 0.5 * np.sum(
        reg * theta**2)

  theta = np.zeros(f + 1)
  value = objective(theta)
  for _ in range(max_iter):
    prob = 1.0 / (1.0 + np.exp(-(a @ theta)))
    grad = a.T @ (prob - t) + reg * theta
    hess = (a * (prob * (1 - prob))[:, None]).T @ a + np.diag(reg)
    # A tiny ridge keeps the unpenalised intercept's system solvable when all
    # probabilities saturate.
    step = np.linalg.solve(hess + 1e-12 * np.eye(f + 1), grad)
    decrease = grad @ step
    if decrease < tol:
      break
    lr = 1.0
    while True:
      trial = theta - lr * step
      trial_value = objective(trial)
      if trial_value <= value - 1e-4 * lr * decrease:
        break
      lr *= 0.5
      if lr < 1e-10:  # no progress possible in floating point: at the optimum
        return theta[:-1], theta[-1]
    theta, value = trial, trial_value
  return theta[:-1], theta[-1]


def _check_mia_inputs(features, max_per_side, l2, named_sets):
  """Checks :func:`mia_efficacy`'s options; returns ``(features, sets)``
  with ``sets[name] = (logits, labels)`` validated."""
  if isinstance(features, str):
    raise TypeError("features must be a sequence of names, not a string; "
                    f"wrap it: features=({features!r},).")
  features = tuple(features)
  unknown = [f for f in features if f not in FEATURES]
  if not features or unknown:
    raise ValueError(f"features must be a non-empty selection of {FEATURES}; "
                     f"got {features}.")
  if len(set(features)) != len(features):
    raise ValueError(f"features lists a name twice: {features}.")
  if max_per_side is not None and int(max_per_side) < 1:
    raise ValueError(f"max_per_side must be None or >= 1, got {max_per_side}.")
  if not l2 > 0:
    raise ValueError(f"l2 must be > 0 (it keeps the fit finite), got {l2}.")
  sets = {}
  for name, lg, yy in named_sets:
    z, yy = _check_logits(lg, yy, f"logits_{name}/y_{name}")
    if z.shape[0] == 0:
      raise ValueError(f"logits_{name} is empty: the attack needs at least one "
                       f"sample of the {name} set.")
    sets[name] = (z, yy)
  widths = {k: v[0].shape[1] for k, v in sets.items()}
  if len(set(widths.values())) != 1:
    raise ValueError(f"the logits disagree on the number of classes: {widths}.")
  return features, sets


def mia_efficacy(logits_retain, y_retain, logits_test, y_test, logits_forget,
                 y_forget, *, features: Sequence[str] = FEATURES, seed: int = 0,
                 max_per_side: int | None = None, l2: float = 1.0) -> MIAResult:
  """MIA-efficacy: the fraction of D_f a membership attack calls non-member.

  1. Shadow data: D_r's outputs are members (label 1), the test set's are
     non-members (label 0). The larger side is subsampled (seeded) to the
     smaller's size, and both to ``max_per_side`` when given, so that the
     attack cannot win by predicting the majority.
  2. Features (:func:`output_features`, the columns named in ``features``)
     are standardised with the balanced set's mean and standard deviation.
  3. An L2-regularised logistic regression with an intercept is fitted by
     Newton's method; a sample is a member iff ``P(member) ≥ ½``.
  4. ``efficacy`` = fraction of D_f predicted non-member.

  SalUn's code fits scikit-learn's SVC on the same features; a logistic
  regression is used here because it needs no scikit-learn dependency, is a
  convex fit with a unique, deterministic answer, and, on these three
  low-dimensional features, separates members from non-members about as
  well as a linear SVM.

  Args:
    logits_retain: ``(N_r, C)`` logits on D_r (members).
    y_retain: ``(N_r,)`` labels of D_r.
    logits_test: ``(N_t, C)`` logits on held-out data (non-members).
    y_test: ``(N_t,)`` labels of the held-out data.
    logits_forget: ``(N_f, C)`` logits on D_f.
    y_forget: ``(N_f,)`` labels of D_f.
    features: which of :data:`FEATURES` to use.
    seed: the subsampling seed.
    max_per_side: optional cap on the shadow samples per side.
    l2: the L2 penalty on the attack's weights (``½ l2 ‖w‖²`` added to the
      summed log-loss; 1.0 is scikit-learn's default ``C = 1``).

  Returns:
    :class:`MIAResult`.
  """
  features, sets = _check_mia_inputs(
      features, max_per_side, l2, (("retain", logits_retain, y_retain),
                                   ("test", logits_test, y_test),
                                   ("forget", logits_forget, y_forget)))
  cols = [FEATURES.index(f) for f in features]
  feats = {k: output_features(*v)[:, cols] for k, v in sets.items()}
  rng = np.random.default_rng(seed)
  per_side = min(len(feats["retain"]), len(feats["test"]))
  if max_per_side is not None:
    per_side = min(per_side, int(max_per_side))

  def pick(a):
    if len(a) == per_side:
      return a
    return a[np.sort(rng.choice(len(a), per_side, replace=False))]

  members, nonmembers = pick(feats["retain"]), pick(feats["test"])
  x = np.concatenate([members, nonmembers])
  t = np.concatenate([np.ones(per_side), np.zeros(per_side)])
  mean = x.mean(axis=0)
  std = x.std(axis=0)
  std = np.where(std > 0, std, 1.0)  # a constant feature carries no signal

  w, b = _fit_logistic((x - mean) / std, t, float(l2))

  def is_member(a):
    return ((a - mean) / std) @ w + b >= 0.0

  balanced = float(np.mean(is_member(x) == (t == 1)))
  shadow_correct = (np.sum(is_member(feats["retain"]))
                    + np.sum(~is_member(feats["test"])))
  num_all = len(feats["retain"]) + len(feats["test"])
  shadow_acc = float(shadow_correct / num_all)
  efficacy = float(np.mean(~is_member(feats["forget"])))
  score = ((x - mean) / std) @ w
  auc = loss_auc(-score[:per_side], -score[per_side:])  # higher = member
  return MIAResult(efficacy, 1.0 - efficacy, shadow_acc, balanced, per_side,
                   features, float(auc))
