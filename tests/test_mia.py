"""Tests for fastntk_jax.evaluation.mia against hand values, exact arithmetic and brute force."""

from decimal import Decimal, localcontext

import numpy as np
import pytest
from scipy import optimize

from fastntk_jax.evaluation import mia

from fastntk_jax.training import train


def _exact_features(z, y):
  """Confidence, entropy and Mentr in 80-digit decimal arithmetic.

  ``1 − p_i`` is formed as ``Σ_{j≠i} e^{z_j} / Σ_j e^{z_j}`` so that it is exact
  even when ``p_i`` is within 1e-300 of one.
  """
  with localcontext() as ctx:
    ctx.prec = 80
    z = [Decimal(float(v)) for v in z]
    e = [v.exp() for v in z]
    s = sum(e, Decimal(0))
    p = [v / s for v in e]
    q = [sum((e[j] for j in range(len(z)) if j != i), Decimal(0)) / s
         for i in range(len(z))]
    h = -sum(pi * pi.ln() for pi in p)
    m = -q[y] * p[y].ln() - sum(p[i] * q[i].ln()
                                for i in range(len(z)) if i != y)
    return np.array([float(p[y]), float(h), float(m)])


def test_modified_entropy_three_class_hand_values():
  # p = softmax(2, 1, 0) = (0.665241, 0.244728, 0.090031), y = 0:
  # Mentr = −0.334759·ln 0.665241 − 0.244728·ln 0.755272 − 0.090031·ln 0.909969
  #       = 0.136450 + 0.068688 + 0.008494 = 0.213632 (0.21363354 to 8 d.p.).
  f = mia.output_features(np.array([[2.0, 1.0, 0.0]]), np.array([0]))[0]
  assert f[0] == pytest.approx(0.66524096, abs=1e-8)
  assert f[1] == pytest.approx(0.83239558, abs=1e-8)
  assert f[2] == pytest.approx(0.21363354, abs=1e-8)
  # Same row, wrong label y = 2: −(1 − p_2) ln p_2 − Σ_{i≠2} p_i ln(1 − p_i).
  p = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
  hand = (-(1 - p[2]) * np.log(p[2]) - p[0] * np.log(1 - p[0])
          - p[1] * np.log(1 - p[1]))
  f2 = mia.output_features(np.array([[2.0, 1.0, 0.0]]), np.array([2]))[0]
  assert f2[2] == pytest.approx(hand, rel=1e-12)
  # = 0.909969·2.407606 + 0.665241·1.094344 + 0.244728·0.280674
  # = 2.190847 + 0.728002 + 0.068689 = 2.98754.
  assert f2[2] == pytest.approx(2.98754, abs=1e-5)
  # The bugs of popular code give other numbers: log p_i for the i ≠ y terms,
  # or a missing (1 − p_y) weight.
  bug_log_p = -(1 - p[0]) * np.log(p[0]) - np.sum(p[1:] * np.log(p[1:]))
  bug_no_weight = -np.log(p[0]) - np.sum(p[1:] * np.log(1 - p[1:]))
  assert abs(bug_log_p - f[2]) > 0.1 and abs(bug_no_weight - f[2]) > 0.1


def test_features_match_exact_arithmetic_including_saturated_rows():
  rng = np.random.default_rng(0)
  rows = [([0.0, 50.0, -50.0], 1),    # near one-hot, right: Mentr ≈ 2e^-100
          ([100.0, 0.0, 0.0], 1),     # near one-hot, wrong: Mentr ≈ 200
          ([100.0, 0.0, 0.0], 0),
          ([700.0, -700.0, 0.0], 1),  # p_y underflows: Mentr = 2100
          ([30.0, -30.0, 0.0], 0),
          ([0.0, 0.0, 0.0], 2),
          ([5.0, 5.0, -1.0], 0)]
  rows += [(list(rng.normal(size=10) * 4), int(rng.integers(10)))
           for _ in range(5)]
  for z, y in rows:
    got = mia.output_features(np.array([z]), np.array([y]))[0]
    want = _exact_features(z, y)
    assert np.all(np.isfinite(got)), (z, y, got)
    # Relative accuracy even for values like 7e-44; entropy's p·log p terms
    # near the subnormal range (e^-700) lose a few digits.
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-290,
                               err_msg=str((z, y)))
  f = mia.output_features(np.array([[0.0, 50.0, -50.0]]), np.array([1]))[0]
  assert f[2] == pytest.approx(2 * np.exp(-100.0), rel=1e-12)


def test_features_validation():
  z = np.zeros((3, 4))
  with pytest.raises(ValueError, match="labels must have shape"):
    mia.output_features(z, np.zeros(2, int))
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    mia.output_features(z, np.array([0, 1, 4]))
  with pytest.raises(TypeError, match="integers"):
    mia.output_features(z, np.zeros(3))
  with pytest.raises(ValueError, match="C >= 2"):
    mia.output_features(np.zeros((3, 1)), np.zeros(3, int))
  with pytest.raises(ValueError, match="NaN or inf"):
    mia.output_features(np.full((3, 4), np.nan), np.zeros(3, int))


def test_per_sample_loss_against_hand_formulas_and_train_loss():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(9, 4)) * 3
  y = rng.integers(0, 4, 9)
  ce = np.log(np.exp(z).sum(-1)) - z[np.arange(9), y]
  onehot = np.eye(4)[y]
  mse = 0.5 * ((z - onehot) ** 2).sum(-1)
  np.testing.assert_allclose(mia.per_sample_loss(z, y), ce, rtol=1e-12)
  np.testing.assert_allclose(mia.per_sample_loss(z, y, "mse"), mse, rtol=1e-12)
  for loss in ("ce", "mse"):
    assert mia.per_sample_loss(z, y, loss).mean() == pytest.approx(
        float(train.loss_fn(z.astype(np.float32), y, loss)), rel=1e-5)
  # Saturated: CE of a confidently right row is e^-100, not 0 or NaN.
  assert mia.per_sample_loss(np.array([[100.0, 0.0]]), np.array([0]))[0] == (
      pytest.approx(np.exp(-100.0), rel=1e-12))
  with pytest.raises(ValueError, match="loss"):
    mia.per_sample_loss(z, y, "hinge")


def _brute_auc(a, b):
  a, b = np.asarray(a)[:, None], np.asarray(b)[None, :]
  return (np.sum(a < b) + 0.5 * np.sum(a == b)) / (a.size * b.size)


def test_loss_auc_against_brute_force_and_known_values():
  rng = np.random.default_rng(2)
  for _ in range(5):
    a = rng.integers(0, 6, rng.integers(1, 40)).astype(float)  # many ties
    b = rng.integers(0, 6, rng.integers(1, 40)).astype(float)
    assert mia.loss_auc(a, b) == pytest.approx(_brute_auc(a, b), abs=1e-12)
  a, b = rng.normal(size=300), rng.normal(size=200) + 0.5
  assert mia.loss_auc(a, b) == pytest.approx(_brute_auc(a, b), abs=1e-12)
  assert mia.loss_auc([0.1, 0.2], [0.3, 0.4, 5.0]) == 1.0
  assert mia.loss_auc([0.3, 0.4, 5.0], [0.1, 0.2]) == 0.0
  assert mia.loss_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
  assert mia.loss_auc([1.0], [1.0, 2.0]) == pytest.approx(0.75)
  with pytest.raises(ValueError, match="member_losses"):
    mia.loss_auc([], [1.0])
  with pytest.raises(ValueError, match="nonmember_losses"):
    mia.loss_auc([1.0], [np.nan])


def _confident(rng, n, c=10):  # members: p_y ≈ 1
  y = rng.integers(0, c, n)
  return 12.0 * np.eye(c)[y] + 0.1 * rng.normal(size=(n, c)), y


def _uniform(rng, n, c=10):  # non-members: p ≈ uniform
  return 0.1 * rng.normal(size=(n, c)), rng.integers(0, c, n)


def test_perfect_attack_separates_members_from_non_members():
  rng = np.random.default_rng(3)
  members, nonmembers = _confident(rng, 300), _uniform(rng, 200)
  like_members = _confident(rng, 50)
  like_nonmembers = _uniform(rng, 50)
  r = mia.mia_efficacy(*members, *nonmembers, *like_members)
  assert r.efficacy == 0.0 and r.member_rate == 1.0
  assert r.attack_balanced_accuracy == 1.0 and r.attack_train_accuracy == 1.0
  assert r.num_shadow == 200  # the larger side subsampled to the smaller
  assert r.feature_names == mia.FEATURES
  r = mia.mia_efficacy(*members, *nonmembers, *like_nonmembers)
  assert r.efficacy == 1.0 and r.member_rate == 0.0
  half = tuple(np.concatenate([a, b]) for a, b in zip(like_members,
                                                      like_nonmembers))
  assert mia.mia_efficacy(*members, *nonmembers, *half).efficacy == 0.5
  # One feature suffices here; the cap limits the shadow set per side.
  r = mia.mia_efficacy(*members, *nonmembers, *like_nonmembers,
                       features=("entropy",), max_per_side=40)
  assert r.efficacy == 1.0 and r.num_shadow == 40
  assert r.feature_names == ("entropy",)


def test_uninformative_outputs_give_chance_level():
  # Members, non-members and D_f all come from one distribution: the attack
  # learns nothing. On one draw, its half-plane through the (skewed) feature
  # cloud can call anywhere from ~35% to ~65% of D_f non-member; averaged over
  # draws, half.
  rng = np.random.default_rng(4)
  effs, accs = [], []
  for seed in range(16):
    draw = lambda n: (2 * rng.normal(size=(n, 10)), rng.integers(0, 10, n))  # noqa: E731
    r = mia.mia_efficacy(*draw(3000), *draw(3000), *draw(3000), seed=seed)
    effs.append(r.efficacy)
    accs.append(r.attack_balanced_accuracy)
    assert 0.2 < r.efficacy < 0.8
    assert abs(r.attack_balanced_accuracy - 0.5) < 0.03
  assert abs(np.mean(effs) - 0.5) < 0.08
  assert abs(np.mean(accs) - 0.5) < 0.01


def test_efficacy_matches_an_independent_logistic_fit():
  # Equal shadow sides (no subsampling): the reference re-derives the features,
  # standardises them and fits the same penalised log-loss with L-BFGS.
  rng = np.random.default_rng(5)
  n, c = 400, 5
  y_r, y_t, y_f = (rng.integers(0, c, n) for _ in range(3))
  z_r = 1.5 * np.eye(c)[y_r] + rng.normal(size=(n, c))
  z_t = 0.5 * np.eye(c)[y_t] + rng.normal(size=(n, c))
  z_f = 1.0 * np.eye(c)[y_f] + rng.normal(size=(n, c))
  r = mia.mia_efficacy(z_r, y_r, z_t, y_t, z_f, y_f)

  feats = [mia.output_features(z, y) for z, y in ((z_r, y_r), (z_t, y_t),
                                                 (z_f, y_f))]
  x = np.concatenate(feats[:2])
  t = np.r_[np.ones(n), np.zeros(n)]
  mu, sd = x.mean(0), x.std(0)
  a = np.c_[(x - mu) / sd, np.ones(2 * n)]

  def f(theta):
    s = a @ theta
    value = np.sum(np.logaddexp(0, s) - t * s) + 0.5 * theta[:3] @ theta[:3]
    grad = a.T @ (1 / (1 + np.exp(-s)) - t) + np.r_[theta[:3], 0.0]
    return value, grad

  theta = optimize.minimize(f, np.zeros(4), jac=True, method="L-BFGS-B",
                            options={"gtol": 1e-10, "ftol": 1e-15}).x
  score = lambda z: np.c_[(z - mu) / sd, np.ones(len(z))] @ theta  # noqa: E731
  assert 0.55 < r.attack_balanced_accuracy < 0.95  # a real, imperfect attack
  assert r.attack_balanced_accuracy == pytest.approx(
      np.mean((score(x) >= 0) == (t == 1)), abs=1.5 / (2 * n))
  assert r.efficacy == pytest.approx(np.mean(score(feats[2]) < 0),
                                     abs=1.5 / n)
  assert r.member_rate == pytest.approx(1 - r.efficacy)
  assert r.attack_train_accuracy == r.attack_balanced_accuracy  # sides equal


def test_mia_validation_names_the_argument():
  rng = np.random.default_rng(6)
  z, y = _uniform(rng, 20)
  with pytest.raises(ValueError, match="logits_forget"):
    mia.mia_efficacy(z, y, z, y, z[:0], y[:0])
  with pytest.raises(ValueError, match="logits_test"):
    mia.mia_efficacy(z, y, z, y[:5], z, y)
  with pytest.raises(ValueError, match="features"):
    mia.mia_efficacy(z, y, z, y, z, y, features=("confidence", "loss"))
  with pytest.raises(TypeError, match="features"):
    mia.mia_efficacy(z, y, z, y, z, y, features="entropy")
  with pytest.raises(ValueError, match="max_per_side"):
    mia.mia_efficacy(z, y, z, y, z, y, max_per_side=0)
  with pytest.raises(ValueError, match="number of classes"):
    mia.mia_efficacy(z, y, z[:, :5], y % 5, z, y)


def test_balancing_subsamples_at_random_and_is_seeded():
  # D_r is sorted: 200 confident rows, then 200 uniform ones. A random
  # subsample of 200 mixes both (attack ≈ 75% right); a prefix would take only
  # the confident rows and make the attack perfect.
  rng = np.random.default_rng(7)
  zc, yc = _confident(rng, 200)
  zu, yu = _uniform(rng, 200)
  retain = np.concatenate([zc, zu]), np.concatenate([yc, yu])
  test = _uniform(rng, 200)
  r = mia.mia_efficacy(*retain, *test, *test, seed=1)
  assert r.num_shadow == 200
  assert 0.6 < r.attack_balanced_accuracy < 0.9
  assert r == mia.mia_efficacy(*retain, *test, *test, seed=1)
  others = {mia.mia_efficacy(*retain, *test, *test, seed=s).attack_balanced_accuracy
            for s in range(2, 8)}
  assert len(others) > 1  # other seeds draw other subsamples


def test_logistic_fit_matches_scipy_with_a_free_intercept():
  # Unbalanced labels, so the (unpenalised) intercept is far from zero.
  rng = np.random.default_rng(8)
  x = rng.normal(size=(300, 3))
  t = (x @ np.array([1.0, -2.0, 0.5]) + 1.5 + rng.normal(size=300) > 0) * 1.0
  w, b = mia._fit_logistic(x, t, 2.0)
  a = np.c_[x, np.ones(300)]

  def f(theta):
    s = a @ theta
    grad = a.T @ (1 / (1 + np.exp(-s)) - t) + 2.0 * np.r_[theta[:3], 0.0]
    return (np.sum(np.logaddexp(0, s) - t * s)
            + theta[:3] @ theta[:3]), grad

  ref = optimize.minimize(f, np.zeros(4), jac=True, method="L-BFGS-B",
                          options={"gtol": 1e-12, "ftol": 1e-16}).x
  assert ref[3] > 1.0
  np.testing.assert_allclose(np.r_[w, b], ref, atol=1e-5)
  # Separable data: the penalty keeps the answer finite.
  w, b = mia._fit_logistic(np.r_[-np.ones((5, 1)), np.ones((5, 1))],
                           np.r_[np.zeros(5), np.ones(5)], 1.0)
  assert np.isfinite(b) and 0 < w[0] < 10
