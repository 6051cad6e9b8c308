"""The NeurIPS 2023 challenge's forget score on cases with known answers."""

import math

import numpy as np
import pytest

from fastntk_jax.evaluation import forget_score as fs


def test_logit_scaled_confidence_is_log_odds_of_the_label():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 5, 4)) * 3
  y = np.array([0, 3, 1, 2, 2])
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  py = p[:, np.arange(5), y]
  np.testing.assert_allclose(fs.logit_scaled_confidence(z, y),
                             np.log(py) - np.log1p(-py), rtol=1e-10)
  # Stable where p_y rounds to 1 in float64: log-odds = margin for 2 classes.
  big = np.array([[800.0, 0.0], [0.0, 790.0]])
  np.testing.assert_allclose(fs.logit_scaled_confidence(big, np.array([0, 1])),
                             [800.0, 790.0])
  with pytest.raises(ValueError, match="N = len"):
    fs.logit_scaled_confidence(z, y[:3])


def test_indistinguishable_models_score_one():
  rng = np.random.default_rng(1)
  r = rng.normal(size=(16, 6))
  res = fs.forget_score(r.copy(), r)
  np.testing.assert_array_equal(res.epsilons, 0.0)
  assert res.score == 1.0
  assert res.max_epsilon == math.ceil(math.log(15)) == 3


def test_separable_or_collapsed_models_score_zero():
  rng = np.random.default_rng(2)
  r = rng.normal(size=(16, 4))
  far = fs.forget_score(r + 100.0, r)  # a threshold separates them
  np.testing.assert_array_equal(far.epsilons, fs.EPSILON_CAP)
  assert far.score == 0.0
  collapsed = np.full_like(r, 0.3)  # every unlearned model says the same
  assert fs.forget_score(collapsed, r).score == 0.0


def test_epsilon_of_two_overlapping_clusters():
  # 90 % of the retrained models at +1 and 10 % at −1; the unlearned models
  # the other way round. A rule can only take or leave a whole cluster, so
  # the best is the cut between them: FPR = FNR = 0.1, ε = log(0.9 − δ) −
  # log(0.1).
  retrained = np.repeat([1.0, -1.0], [90, 10])[:, None]
  unlearned = np.repeat([-1.0, 1.0], [90, 10])[:, None]
  eps = fs.example_epsilons(unlearned, retrained)
  want = math.log(0.9 - fs.DELTA) - math.log(0.1)
  assert eps[0] == pytest.approx(want, abs=1e-9)
  # Unequal error rates: the larger of the two log-ratios counts.
  retrained = np.repeat([1.0, -1.0], [95, 5])[:, None]
  unlearned = np.repeat([-1.0, 1.0], [80, 20])[:, None]
  eps = fs.example_epsilons(unlearned, retrained)
  want = max(math.log(0.8 - fs.DELTA) - math.log(0.05),
             math.log(0.95 - fs.DELTA) - math.log(0.2))
  assert eps[0] == pytest.approx(want, abs=1e-9) and want > 2.7
  retrained = np.repeat([1.0, -1.0], [90, 10])[:, None]
  unlearned = np.repeat([-1.0, 1.0], [90, 10])[:, None]
  # ε ≈ 2.197 lies in the bucket [2, 2.5): the fifth, worth 1/16 with 100
  # models (buckets up to ceil(log 99) = 5).
  res = fs.forget_score(unlearned, retrained)
  assert res.score == pytest.approx(1 / 16)
  assert fs.bucket_points(100)[:5] == [(0.5, 1.0), (1.0, 0.5), (1.5, 0.25),
                                       (2.0, 0.125), (2.5, 0.0625)]
  assert fs.bucket_points(2) == []


def test_final_score():
  assert fs.final_score(0.5, 90.0, 70.0, 100.0, 80.0) == pytest.approx(
      0.5 * 0.9 * 0.875)


@pytest.mark.parametrize("fn,shape_message", [
    (fs.example_epsilons, "both be"), (fs.confidence_gap, "same examples")])
def test_bad_confidences_are_refused(fn, shape_message):
  with pytest.raises(ValueError, match=shape_message):
    fn(np.zeros((4, 3)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="at least 2 models"):
    fn(np.zeros((1, 3)), np.zeros((1, 3)))
  for bad in (np.nan, np.inf):
    with pytest.raises(ValueError, match="finite"):
      fn(np.full((3, 2), bad), np.zeros((3, 2)))


def test_confidence_gap_on_hand_made_samples():
  # Retrain: per example, the values base + (-1, 0, 1) * s_i; its SD is s_i.
  base = np.array([-2.0, -3.0, -1.0])
  s = np.array([0.1, 0.2, 0.5])
  steps = np.array([-1.0, 0.0, 1.0])[:, None]
  r = base + steps * s
  # Shifted by +0.2 everywhere, spread doubled.
  u = base + 0.2 + 2 * steps * s
  g = fs.confidence_gap(u, r)
  assert g.mean_difference == pytest.approx(0.2)
  assert g.retrain_sd == pytest.approx(s.mean())
  assert g.shift_in_sds == pytest.approx(np.mean(0.2 / s))
  assert g.spread_ratio == pytest.approx(2.0)
  # Another Retrain with the same values in another order: no gap.
  same = fs.confidence_gap(r[::-1], r)
  assert same.mean_difference == pytest.approx(0.0, abs=1e-12)
  assert same.shift_in_sds == pytest.approx(0.0, abs=1e-9)
  assert same.spread_ratio == pytest.approx(1.0)
  # Shifts in both directions count by their size, not cancelling.
  u2 = r + np.array([0.1, -0.2, 0.0])
  g2 = fs.confidence_gap(u2, r)
  assert g2.mean_difference == pytest.approx(-0.1 / 3)
  assert g2.shift_in_sds == pytest.approx((0.1 / 0.1 + 0.2 / 0.2) / 3)
  # The sides may have different numbers of models, not of examples.
  assert fs.confidence_gap(u[:2], r).spread_ratio > 0
  # (bad input: test_bad_confidences_are_refused)
