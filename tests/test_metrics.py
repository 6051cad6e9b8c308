import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax import metrics, setups


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
  retain, forget = setups.class_split(x, y, [0])
  assert list(forget[1]) == [0, 0] and list(retain[1]) == [1, 2, 1]
  test = (x, np.array([0, 1, 1, 1, 2]))  # predictions 0 1 2 1 0: samples 2, 4 wrong
  r = metrics.class_forgetting_report(_oracle, 1.0, retain, forget, test, [0])
  assert r["retain"] == 1.0 and r["forget"] == 1.0
  assert r["test"] == pytest.approx(3 / 5)
  assert r["test_forgotten"] == 1.0                  # label 0: sample 0 only
  assert r["test_retained"] == pytest.approx(2 / 4)  # samples 1, 3 right; 2, 4 wrong
  with pytest.raises(ValueError, match="forget_classes"):
    setups.class_split(x, y, [7])
