import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax import train


def _problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 4, 4, 3)).astype(np.float32)
  y = (x[:, 0, 0, 0] > 0).astype(np.int32) + 2 * (x[:, 0, 1, 1] > 0)
  apply_fn = lambda p, x: x.reshape(x.shape[0], -1) @ p["w"] + p["b"]
  w0 = {"w": jnp.zeros((48, 4)), "b": jnp.zeros(4)}
  return apply_fn, w0, x, y


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_finetune_fits(loss):
  apply_fn, w0, x, y = _problem()
  cfg = train.FinetuneConfig(loss=loss, epochs=40, batch_size=16,
                             learning_rate=3e-2, augment=False)
  res = train.finetune(apply_fn, w0, x, y, config=cfg)
  assert res.losses[-1] < 0.5 * res.losses[0]
  acc = float(jnp.mean(jnp.argmax(apply_fn(res.params, x), -1) == y))
  assert acc > 0.9


def test_finetune_is_deterministic_per_seed():
  apply_fn, w0, x, y = _problem()
  cfg = train.FinetuneConfig(epochs=2, batch_size=16, seed=3)
  a = train.finetune(apply_fn, w0, x, y, config=cfg).params["w"]
  b = train.finetune(apply_fn, w0, x, y, config=cfg).params["w"]
  c = train.finetune(apply_fn, w0, x, y, config=cfg._replace(seed=4)).params["w"]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_losses():
  logits = jnp.asarray([[2.0, 0.0], [0.0, 0.0]])
  y = jnp.asarray([0, 1])
  np.testing.assert_allclose(train.loss_fn(logits, y, "mse"), 0.5 * (1 + 0 + 0 + 1) / 2)
  np.testing.assert_allclose(
      train.loss_fn(logits, y, "ce"),
      np.mean([np.log(1 + np.exp(-2.0)), np.log(2.0)]), rtol=1e-6)


def test_hflip_flips_half():
  x = jnp.arange(2 * 1 * 3 * 1.0).reshape(2, 1, 3, 1).repeat(100, 0)
  out = train.hflip(jax.random.PRNGKey(0), x)
  flipped = np.asarray(jnp.all(out == x[:, :, ::-1], axis=(1, 2, 3)))
  assert 0.3 < flipped.mean() < 0.7


def test_bad_config():
  apply_fn, w0, x, y = _problem()
  with pytest.raises(ValueError, match="loss"):
    train.finetune(apply_fn, w0, x, y, config=train.FinetuneConfig(loss="l1"))
  with pytest.raises(ValueError, match="samples"):
    train.finetune(apply_fn, w0, x, y[:-1])
  with pytest.raises(ValueError, match="augment"):
    train.finetune(apply_fn, w0, x.reshape(64, -1), y)
