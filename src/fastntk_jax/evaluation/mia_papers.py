"""The membership attacks of the papers' released code, for comparable numbers.

* :func:`svc_mia` — SalUn's ``SVC_MIA`` (OPTML-Group/Unlearn-Saliency,
  ``Classification/evaluation/SVC_MIA.py``, called from ``main_random.py``):
  an RBF support-vector classifier, ``SVC(C=3, gamma="auto")``, fitted on
  ONE raw feature (SalUn reports ``"confidence"``, the probability of the true
  label) of shadow members (D_r, as many as there are test images) against
  shadow non-members (the test set); MIA-efficacy = the share of D_f it calls
  non-member.
* :func:`entropy_mia` — SFR-on's ``get_membership_attack_prob``
  (K1nght/Unified-Unlearning-w-Remain-Geometry,
  ``Classification/evaluation/mia.py``): a class-balanced logistic regression
  (lbfgs) on the entropy of the softmax, fitted on all of D_r (members)
  against all of the test set (non-members), applied to D_f. The released
  function returns the share of D_f predicted MEMBER; it is returned here as
  the efficacy ``1 −`` that, so that every MIA of the bench reads the same way
  (higher = more of D_f looks unseen).

Both use scikit-learn, as the released code does. Each also reports the
attack's AUC on its own shadow data (members against non-members, from its
decision function): 0.5 says the attack cannot tell members at all, so its
verdict on D_f carries no information.

Deviation, stated: SalUn takes the FIRST ``len(test)`` samples of its retain
set (in CIFAR-10's shuffled order); the bench's D_r is stored in class order,
so a seeded random subset of that size is used instead.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fastntk_jax.evaluation import mia

__all__ = ["PaperMIA", "SVC_FEATURES", "entropy_mia", "svc_features",
           "svc_mia"]

#: The features of SalUn's ``SVC_MIA``, each attacked separately.
SVC_FEATURES = ("correctness", "confidence", "entropy", "m_entropy", "prob")


class PaperMIA(NamedTuple):
  """``efficacy``: share of D_f called non-member, in [0, 1];
  ``attack_auc``: the attack's AUC on its shadow members vs non-members;
  ``num_members``, ``num_nonmembers``: shadow samples per side."""
  efficacy: float
  attack_auc: float
  num_members: int
  num_nonmembers: int


def svc_features(logits, y, feature: str) -> np.ndarray:
  """SalUn's per-sample attack input ``(N, d)`` from logits and labels.

  ``correctness`` (1 if the arg-max is ``y``), ``confidence`` (``p_y``),
  ``entropy`` (``H(p)``), ``m_entropy`` (Song & Mittal's modified entropy) —
  each ``(N, 1)`` — or ``prob``, the whole softmax ``(N, C)``.
  """
  if feature not in SVC_FEATURES:
    raise ValueError(f"feature must be one of {SVC_FEATURES}, got {feature!r}.")
  feats = mia.output_features(logits, y)  # validates logits and labels
  if feature == "correctness":
    return (np.argmax(np.asarray(logits), -1) == np.asarray(y)).astype(
        np.float64)[:, None]
  if feature == "prob":
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
  col = {"confidence": 0, "entropy": 1, "m_entropy": 2}[feature]
  return feats[:, col:col + 1]


def _auc(score_members, score_nonmembers) -> float:
  # loss_auc(a, b) = P(b's loss > a's loss); a member's "loss" is −score.
  return float(mia.loss_auc(-np.asarray(score_members),
                            -np.asarray(score_nonmembers)))


def svc_mia(logits_retain, y_retain, logits_test, y_test, logits_forget,
            y_forget, *, feature: str = "confidence", seed: int = 0
            ) -> PaperMIA:
  """SalUn's SVC attack on one feature (see the module docstring).

  Args:
    logits_retain, y_retain: D_r (members).
    logits_test, y_test: held-out images (non-members).
    logits_forget, y_forget: D_f, the target.
    feature: one of :data:`SVC_FEATURES` (SalUn reports ``"confidence"``).
    seed: which D_r samples serve as shadow members.

  Returns:
    :class:`PaperMIA`.
  """
  from sklearn.svm import SVC  # pylint: disable=import-outside-toplevel
  f_r = svc_features(logits_retain, y_retain, feature)
  f_t = svc_features(logits_test, y_test, feature)
  f_f = svc_features(logits_forget, y_forget, feature)
  for name, f in (("retain", f_r), ("test", f_t), ("forget", f_f)):
    if len(f) == 0:
      raise ValueError(f"logits_{name} is empty: the SVC attack needs samples "
                       "of D_r, the test set and D_f.")
  n = min(len(f_r), len(f_t))
  rng = np.random.default_rng(seed)
  members = f_r[np.sort(rng.choice(len(f_r), n, replace=False))]
  x = np.concatenate([members, f_t])
  t = np.concatenate([np.ones(len(members)), np.zeros(len(f_t))])
  if len(np.unique(x, axis=0)) == 1:  # one point: SVC cannot separate it
    return PaperMIA(float("nan"), 0.5, len(members), len(f_t))
  clf = SVC(C=3, gamma="auto", kernel="rbf")
  clf.fit(x, t)
  score = clf.decision_function(x)
  auc = _auc(score[:len(members)], score[len(members):])
  efficacy = 1.0 - float(np.mean(clf.predict(f_f)))
  return PaperMIA(efficacy, auc, len(members), len(f_t))


def entropy_mia(logits_retain, y_retain, logits_test, y_test, logits_forget,
                y_forget) -> PaperMIA:
  """SFR-on's entropy attack (see the module docstring); efficacy = share of
  D_f predicted non-member (the released function returns 1 − this).

  Args:
    logits_retain, y_retain: D_r (members, all of them).
    logits_test, y_test: held-out images (non-members, all of them).
    logits_forget, y_forget: D_f, the target.

  Returns:
    :class:`PaperMIA`.
  """
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  ent = lambda z, yy: mia.output_features(z, yy)[:, 1:2]
  e_r, e_t = ent(logits_retain, y_retain), ent(logits_test, y_test)
  e_f = ent(logits_forget, y_forget)
  for name, f in (("retain", e_r), ("test", e_t), ("forget", e_f)):
    if len(f) == 0:
      raise ValueError(f"logits_{name} is empty: the entropy attack needs "
                       "samples of D_r, the test set and D_f.")
  x = np.concatenate([e_r, e_t])
  t = np.concatenate([np.ones(len(e_r)), np.zeros(len(e_t))])
  clf = LogisticRegression(class_weight="balanced", solver="lbfgs")
  clf.fit(x, t)
  score = clf.decision_function(x)
  auc = _auc(score[:len(e_r)], score[len(e_r):])
  efficacy = 1.0 - float(np.mean(clf.predict(e_f)))
  return PaperMIA(efficacy, auc, len(e_r), len(e_t))
