"""The papers' membership attacks on hand-made outputs with known answers."""

import numpy as np
import pytest

from fastntk_jax.evaluation import mia_papers


def _logits_with_confidence(p_y, y, c=4):
  """Logits whose softmax gives p_y to class y and splits the rest evenly."""
  p_y = np.asarray(p_y, float)
  rest = (1 - p_y) / (c - 1)
  z = np.log(np.repeat(rest[:, None], c, 1))
  z[np.arange(len(y)), y] = np.log(p_y)
  return z


def _sets(rng, n=60):
  y = rng.integers(0, 4, n)
  members = _logits_with_confidence(rng.uniform(0.95, 0.99, n), y)
  nonmembers = _logits_with_confidence(rng.uniform(0.3, 0.5, n), y)
  return y, members, nonmembers


def test_svc_features_hand_values():
  z = _logits_with_confidence([0.7, 0.4], np.array([0, 2]))
  y = np.array([0, 1])
  np.testing.assert_allclose(mia_papers.svc_features(z, y, "confidence")[:, 0],
                             [0.7, 0.2])
  np.testing.assert_array_equal(
      mia_papers.svc_features(z, y, "correctness")[:, 0], [1.0, 0.0])
  prob = mia_papers.svc_features(z, y, "prob")
  np.testing.assert_allclose(prob[0], [0.7, 0.1, 0.1, 0.1])
  p = prob[1]
  np.testing.assert_allclose(mia_papers.svc_features(z, y, "entropy")[1, 0],
                             -np.sum(p * np.log(p)))
  with pytest.raises(ValueError, match="feature must be one of"):
    mia_papers.svc_features(z, y, "loss")


@pytest.mark.parametrize("attack", ["svc", "entropy"])
def test_separable_outputs_give_zero_or_full_efficacy(attack):
  rng = np.random.default_rng(0)
  y, members, nonmembers = _sets(rng)
  fn = (mia_papers.svc_mia if attack == "svc" else mia_papers.entropy_mia)
  # D_f that looks like training data: all called members, efficacy 0.
  like_members = fn(members, y, nonmembers, y, members[:20], y[:20])
  assert like_members.efficacy == 0.0
  assert like_members.attack_auc == 1.0  # the shadow sets are separable
  # D_f that looks unseen: efficacy 1.
  like_test = fn(members, y, nonmembers, y, nonmembers[:20], y[:20])
  assert like_test.efficacy == 1.0
  assert like_test.num_members == 60 and like_test.num_nonmembers == 60


def test_svc_uses_as_many_members_as_test_images():
  rng = np.random.default_rng(1)
  y, members, nonmembers = _sets(rng)
  res = mia_papers.svc_mia(members, y, nonmembers[:25], y[:25], members[:5],
                           y[:5], seed=3)
  assert (res.num_members, res.num_nonmembers) == (25, 25)


def test_indistinguishable_outputs_give_auc_one_half():
  rng = np.random.default_rng(2)
  y = rng.integers(0, 4, 80)
  z = _logits_with_confidence(rng.uniform(0.3, 0.9, 80), y)
  # The same outputs on both sides: no attack can tell them apart.
  res = mia_papers.entropy_mia(z, y, z, y, z[:10], y[:10])
  assert res.attack_auc == pytest.approx(0.5, abs=1e-12)
  res = mia_papers.svc_mia(z, y, z, y, z[:10], y[:10])
  assert res.attack_auc == pytest.approx(0.5, abs=1e-12)


def test_empty_sets_are_refused():
  rng = np.random.default_rng(3)
  y, members, nonmembers = _sets(rng)
  with pytest.raises(ValueError, match="logits_forget is empty"):
    mia_papers.entropy_mia(members, y, nonmembers, y, members[:0], y[:0])
  with pytest.raises(ValueError, match="logits_test is empty"):
    mia_papers.svc_mia(members, y, nonmembers[:0], y[:0], members, y)
