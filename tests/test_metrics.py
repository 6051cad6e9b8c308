import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.evaluation import metrics

from fastntk_jax.data import splits


def _oracle(params, x):  # logits one-hot at the label stored in x[:, 0]
  return jnp.eye(3)[x[:, 0].astype(int)] * params


def test_accuracy_perfect_wrong_and_empty():
  x = np.array([[0], [1], [2], [1]], np.float32)
  y = np.array([0, 1, 2, 1])
  assert metrics.accuracy(_oracle, 1.0, x, y) == 1.0
  assert metrics.accuracy(_oracle, 1.0, x, (y + 1) % 3) == 0.0
  assert metrics.accuracy(_oracle, 1.0, x, np.array([0, 0, 0, 0])) == 0.25
  assert np.isnan(metrics.accuracy(_oracle, 1.0, x[:0], y[:0]))


def test_class_forgetting_report_and_split():
  x = np.array([[0], [1], [2], [1], [0]], np.float32)
  y = np.array([0, 1, 2, 1, 0])
  retain, forget = splits.class_split(x, y, [0])
  assert list(forget[1]) == [0, 0] and list(retain[1]) == [1, 2, 1]
  test = (x, np.array([0, 1, 1, 1, 2]))  # predictions 0 1 2 1 0: samples 2, 4 wrong
  r = metrics.class_forgetting_report(_oracle, 1.0, retain, forget, test, [0])
  assert r["retain"] == 1.0 and r["forget"] == 1.0
  assert r["test"] == pytest.approx(3 / 5)
  assert r["test_forgotten"] == 1.0                  # label 0: sample 0 only
  assert r["test_retained"] == pytest.approx(2 / 4)  # samples 1, 3 right; 2, 4 wrong
  with pytest.raises(ValueError, match="forget_classes"):
    splits.class_split(x, y, [7])


# --- softmax_kl, kl_to_reference, avg_gap -----------------------------------


def _kl_naive(lp, lq):  # float64 textbook formula, for moderate logits only
  lp, lq = np.asarray(lp, np.float64), np.asarray(lq, np.float64)
  p = np.exp(lp) / np.exp(lp).sum(-1, keepdims=True)
  q = np.exp(lq) / np.exp(lq).sum(-1, keepdims=True)
  return np.sum(p * np.log(p / q), axis=-1)


def test_softmax_kl_matches_textbook_formula_and_is_asymmetric():
  rng = np.random.default_rng(0)
  lp = rng.normal(size=(7, 5)).astype(np.float32) * 2
  lq = rng.normal(size=(7, 5)).astype(np.float32) * 2
  kl = metrics.softmax_kl(lp, lq)
  assert kl.shape == (7,) and kl.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(kl), _kl_naive(lp, lq), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics.softmax_kl(lp, lp)), 0,
                             atol=1e-6)
  # Hand value: p = (1/2, 1/2), q = softmax(log 1, log 3) = (1/4, 3/4):
  # KL(p||q) = ½ log 2 + ½ log(2/3); KL(q||p) = ¼ log ½ + ¾ log(3/2).
  a = np.array([[0.0, 0.0]], np.float32)
  b = np.log(np.array([[1.0, 3.0]], np.float32))
  assert float(metrics.softmax_kl(a, b)[0]) == pytest.approx(
      0.5 * np.log(2) + 0.5 * np.log(2 / 3), rel=1e-5)
  assert float(metrics.softmax_kl(b, a)[0]) == pytest.approx(
      0.25 * np.log(0.5) + 0.75 * np.log(1.5), rel=1e-5)


def test_softmax_kl_saturated_logits_stay_finite():
  # p = one-hot on class 0 (to float32), q puts e^-1000 there: KL = 1000.
  lp = np.array([[1000.0, 0.0], [0.0, 0.0]], np.float32)
  lq = np.array([[0.0, 1000.0], [0.0, 0.0]], np.float32)
  kl = np.asarray(metrics.softmax_kl(lp, lq))
  assert np.all(np.isfinite(kl))
  assert kl[0] == pytest.approx(1000.0, rel=1e-6) and kl[1] == pytest.approx(0)
  with pytest.raises(ValueError, match="logits_p and logits_q"):
    metrics.softmax_kl(lp, lq[:, :1])
  with pytest.raises(ValueError, match="logits_p and logits_q"):
    metrics.softmax_kl(lp[0], lq[0])


def _linear(params, x):
  return x @ params


def test_kl_to_reference_order_blocks_and_empty():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(11, 4)).astype(np.float32)
  w, w_ref = (rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2))
  expected = _kl_naive(x @ w_ref, x @ w).mean()  # reference (Retrain) first
  reverse = _kl_naive(x @ w, x @ w_ref).mean()
  assert abs(expected - reverse) > 1e-3  # the test can tell the order apart
  got = metrics.kl_to_reference(_linear, w, w_ref, x, block_size=4)
  assert got == pytest.approx(expected, rel=1e-5)
  assert metrics.kl_to_reference(_linear, w, w, x) == pytest.approx(0, abs=1e-6)
  assert np.isnan(metrics.kl_to_reference(_linear, w, w_ref, x[:0]))


def test_avg_gap_hand_values_missing_keys_and_nan():
  m = {"acc_forget": 10.0, "acc_retain": 95.0, "acc_test": 90.0, "mia": 20.0,
       "extra": 1.0}
  ref = {"acc_forget": 0.0, "acc_retain": 97.0, "acc_test": 91.0, "mia": 100.0}
  assert metrics.avg_gap(m, ref) == pytest.approx((10 + 2 + 1 + 80) / 4)
  assert metrics.avg_gap(m, ref, keys=("acc_retain",)) == pytest.approx(2.0)
  assert metrics.avg_gap(ref, m) == metrics.avg_gap(m, ref)
  with pytest.raises(ValueError, match="'extra'"):
    metrics.avg_gap(m, ref, keys=("acc_test", "extra"))
  with pytest.raises(ValueError, match="'mia'"):
    metrics.avg_gap({k: v for k, v in m.items() if k != "mia"}, ref)
  with pytest.raises(ValueError, match="keys"):
    metrics.avg_gap(m, ref, keys=())
  with pytest.raises(TypeError, match="keys"):
    metrics.avg_gap(m, ref, keys="mia")
  assert np.isnan(metrics.avg_gap({**m, "mia": float("nan")}, ref))


def test_softmax_js_is_symmetric_bounded_and_textbook():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) * 2
  p = np.exp(a) / np.exp(a).sum(1, keepdims=True)
  q = np.exp(b) / np.exp(b).sum(1, keepdims=True)
  m = (p + q) / 2
  want = 0.5 * (p * np.log(p / m)).sum(1) + 0.5 * (q * np.log(q / m)).sum(1)
  got = np.asarray(metrics.softmax_js(a.astype(np.float32),
                                      b.astype(np.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics.softmax_js(b, a), metrics.softmax_js(a, b),
                             rtol=1e-6, atol=1e-7)
  # Disjoint saturated distributions: the bound log 2, finite.
  sat = np.array([[100.0, -100.0]], np.float32)
  far = metrics.softmax_js(sat, -sat)
  np.testing.assert_allclose(far, [np.log(2.0)], rtol=1e-5)
  np.testing.assert_allclose(metrics.softmax_js(sat, sat), [0.0], atol=1e-7)
