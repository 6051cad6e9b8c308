"""Tests for fastntk_jax.evaluation.probe: separable blobs, pure noise, a reference loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastntk_jax.evaluation import probe


def _blobs(rng, n, f, c, sep=4.0):
  y = rng.integers(0, c, n)
  centres = sep * np.eye(c, f)
  return (centres[y] + rng.normal(size=(n, f))).astype(np.float32), y


def test_separable_blobs_are_read_perfectly():
  rng = np.random.default_rng(0)
  x, y = _blobs(rng, 600, 8, 4, sep=8.0)
  x = 50.0 + 10.0 * x  # standardisation removes offset and scale
  r = probe.linear_probe(x, y, x[:400], y[:400], x[400:], y[400:],
                         num_classes=4, epochs=30)
  assert r.train_accuracy >= 0.99
  assert r.acc_retain >= 0.99 and r.acc_forget >= 0.99
  assert r.epochs == 30 and r.seconds > 0


def test_noise_features_give_chance_on_held_out_labels():
  rng = np.random.default_rng(1)
  k = 4
  x, y = rng.normal(size=(400, 30)).astype(np.float32), rng.integers(0, k, 400)
  x_r, y_r = rng.normal(size=(2000, 30)), rng.integers(0, k, 2000)
  x_f, y_f = rng.normal(size=(2000, 30)), rng.integers(0, k, 2000)
  r = probe.linear_probe(x, y, x_r, y_r, x_f, y_f, num_classes=k, epochs=50)
  # It memorises some of its own random labels (30 features, 400 samples)...
  assert r.train_accuracy > 0.35
  # ...but knows nothing about fresh samples: chance is 1/4 (sd ~ 0.01).
  assert abs(r.acc_retain - 0.25) < 0.04 and abs(r.acc_forget - 0.25) < 0.04


def _reference_head(x, y, k, epochs, lr, wd, batch, seed):
  """The documented training, eagerly: zero init, AdamW on W only, shuffled
  batches with a short last batch, CE on standardised features."""
  mu, sd = x.mean(0), x.std(0)
  xs = jnp.asarray((x - mu) / np.where(sd > 0, sd, 1.0))
  head = {"w": jnp.zeros((x.shape[1], k)), "b": jnp.zeros(k)}
  tx = optax.adamw(lr, weight_decay=wd, mask={"w": True, "b": False})
  state = tx.init(head)

  def loss(h, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(
        xb @ h["w"] + h["b"], yb).mean()

  n = len(x)
  for e in range(epochs):
    order = np.asarray(jax.random.permutation(
        jax.random.fold_in(jax.random.PRNGKey(seed), e), n))
    for s in range(0, n, batch):
      idx = order[s:s + batch]
      g = jax.grad(loss)(head, xs[idx], jnp.asarray(y[idx]))
      updates, state = tx.update(g, state, head)
      head = optax.apply_updates(head, updates)
  return lambda a: np.argmax(((a - mu) / np.where(sd > 0, sd, 1.0))  # noqa: E731
                             @ np.asarray(head["w"]) + np.asarray(head["b"]), -1)


def test_matches_an_eager_reference_loop():
  # Random labels make every accuracy depend on the exact weights learnt.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(70, 6)).astype(np.float32)
  x[:, 2] = 3.0  # a constant feature must not divide by zero
  y = rng.integers(0, 3, 70)
  x_r, y_r = rng.normal(size=(300, 6)).astype(np.float32), rng.integers(0, 3, 300)
  x_r[:, 2] = 3.0
  kw = dict(num_classes=3, epochs=6, learning_rate=0.05, weight_decay=0.1,
            batch_size=16, seed=4)  # 70 = 4·16 + 6: a short last batch
  r = probe.linear_probe(x, y, x_r, y_r, x_r[:0], y_r[:0], **kw)
  predict = _reference_head(x, y, 3, 6, 0.05, 0.1, 16, 4)
  assert r.train_accuracy == pytest.approx(np.mean(predict(x) == y), abs=1.5 / 70)
  assert r.acc_retain == pytest.approx(np.mean(predict(x_r) == y_r), abs=1.5 / 300)
  assert np.isnan(r.acc_forget)  # empty D_f
  assert r.train_accuracy > 0.45  # it did learn its (random) labels


def test_validation_errors():
  rng = np.random.default_rng(3)
  x, y = _blobs(rng, 20, 4, 2)
  with pytest.raises(ValueError, match="num_classes"):
    probe.linear_probe(x, y, x, y, x, y, num_classes=1)
  with pytest.raises(ValueError, match=r"y_train must lie in \[0, num_classes=2\)"):
    probe.linear_probe(x, y + 1, x, y, x, y, num_classes=2)
  with pytest.raises(ValueError, match="features_forget has 3 features"):
    probe.linear_probe(x, y, x, y, x[:, :3], y, num_classes=2)
  with pytest.raises(ValueError, match="features_train is empty"):
    probe.linear_probe(x[:0], y[:0], x, y, x, y, num_classes=2)
  with pytest.raises(ValueError, match="y_retain must have shape"):
    probe.linear_probe(x, y, x, y[:5], x, y, num_classes=2)
  with pytest.raises(ValueError, match=r"shape \(N, F\)"):
    probe.linear_probe(x[:, :, None], y, x, y, x, y, num_classes=2)
  with pytest.raises(TypeError, match="y_forget"):
    probe.linear_probe(x, y, x, y, x, y.astype(float), num_classes=2)
  with pytest.raises(ValueError, match="epochs"):
    probe.linear_probe(x, y, x, y, x, y, num_classes=2, epochs=0)
  with pytest.raises(ValueError, match="learning_rate"):
    probe.linear_probe(x, y, x, y, x, y, num_classes=2, learning_rate=0.0)
  with pytest.raises(ValueError, match="NaN"):
    probe.linear_probe(np.full_like(x, np.nan), y, x, y, x, y, num_classes=2)
