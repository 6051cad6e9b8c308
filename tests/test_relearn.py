"""Tests for fastntk_jax.evaluation.relearn against a slow, eager reference loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.evaluation import relearn

from fastntk_jax.training import train


def _linear(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _zeros(f, c):
  return {"w": jnp.zeros((f, c), jnp.float32),
          "b": jnp.zeros((c,), jnp.float32)}


def _reference(apply_fn, params, x, y, config, threshold, max_epochs):
  """The rule written out step by step in Python, one eager step at a time.

  Data order: epoch e shuffles with jax.random.permutation(k_perm, n) where
  (k_perm, k_aug) = split(fold_in(PRNGKey(seed), e)); batch s is augmented
  with split(k_aug, steps)[s]. The last batch is short when n % batch != 0.
  """
  x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
  n = x.shape[0]
  batch = min(config.batch_size, n)
  steps = -(-n // batch)
  tx = train.finetune_optimizer(config.learning_rate, config.weight_decay)
  state = tx.init(params)

  def loss_on(p, xb, yb):
    return train.loss_fn(apply_fn(p, xb), yb, config.loss)

  losses = [float(loss_on(params, x, y))]
  while not losses[-1] < threshold and len(losses) - 1 < max_epochs:
    e = len(losses) - 1
    k_perm, k_aug = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(config.seed), e))
    order = np.asarray(jax.random.permutation(k_perm, n))
    keys = jax.random.split(k_aug, steps)
    for s in range(steps):
      idx = order[s * batch:(s + 1) * batch]
      xb = x[idx]
      if config.augment:
        k_flip, k_crop = jax.random.split(keys[s])
        xb = train.hflip(k_flip, train.random_crop(k_crop, xb,
                                                   config.crop_padding))
      grads = jax.grad(loss_on)(params, xb, y[idx])
      updates, state = tx.update(grads, state, params)
      params = jax.tree_util.tree_map(jnp.add, params, updates)
    losses.append(float(loss_on(params, x, y)))
  return len(losses) - 1, np.array(losses)


def _blobs(rng, n, f, c):
  centres = 3.0 * rng.normal(size=(c, f))
  y = rng.integers(0, c, n)
  return (centres[y] + rng.normal(size=(n, f))).astype(np.float32), y


@pytest.mark.parametrize("loss, lr, batch", [("ce", 0.02, 5), ("mse", 0.03, 8)])
def test_matches_reference_loop_on_separable_data(loss, lr, batch):
  rng = np.random.default_rng(0)
  x, y = _blobs(rng, 23, 6, 3)  # 23 samples: a short last batch every epoch
  cfg = train.FinetuneConfig(loss=loss, batch_size=batch, learning_rate=lr,
                             augment=False, seed=3)
  r = relearn.relearn_time(_linear, _zeros(6, 3), x, y, config=cfg)
  epochs, losses = _reference(_linear, _zeros(6, 3), x, y, cfg, 0.05, 100)
  assert 3 <= epochs < 100 and r.reached  # a real, multi-epoch count
  assert r.epochs == epochs
  assert r.losses.shape == (epochs + 1,)
  np.testing.assert_allclose(r.losses, losses, rtol=1e-5, atol=1e-6)
  assert r.losses[-1] < 0.05 <= r.losses[-2]
  assert r.seconds > 0


# ~16 s; the reference loop itself is checked by
# test_matches_reference_loop_on_separable_data.
@pytest.mark.slow
def test_matches_reference_with_image_augmentation_and_weight_decay():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, 4, 4, 2)).astype(np.float32)
  y = rng.integers(0, 3, 10)
  cfg = train.FinetuneConfig(loss="ce", batch_size=4, learning_rate=0.05,
                             weight_decay=1e-3, augment=True, crop_padding=1,
                             seed=7)
  kw = dict(config=cfg, threshold=0.2, max_epochs=40)
  r = relearn.relearn_time(_linear, _zeros(32, 3), x, y, **kw)
  epochs, losses = _reference(_linear, _zeros(32, 3), x, y, cfg, 0.2, 40)
  assert r.epochs == epochs and r.epochs >= 3
  np.testing.assert_allclose(r.losses, losses, rtol=1e-5, atol=1e-6)
  # Another seed reorders and re-augments: the curve changes.
  other = relearn.relearn_time(_linear, _zeros(32, 3), x, y,
                               config=cfg._replace(seed=8), threshold=0.2,
                               max_epochs=40)
  assert not np.allclose(other.losses[1:3], r.losses[1:3])


def test_already_below_threshold_counts_zero_epochs():
  x = np.eye(3, dtype=np.float32)
  y = np.arange(3)
  params = {"w": 20.0 * jnp.eye(3), "b": jnp.zeros(3)}
  cfg = train.FinetuneConfig(loss="ce", augment=False)
  r = relearn.relearn_time(_linear, params, x, y, config=cfg)
  expected = float(train.loss_fn(_linear(params, x), jnp.asarray(y), "ce"))
  assert r.epochs == 0 and r.reached
  assert r.losses.shape == (1,) and r.losses[0] == pytest.approx(expected)
  assert expected < 1e-6


def test_impossible_target_runs_to_the_cap():
  rng = np.random.default_rng(2)
  x, y = _blobs(rng, 9, 4, 3)
  cfg = train.FinetuneConfig(loss="mse", learning_rate=0.0, augment=False)
  r = relearn.relearn_time(_linear, _zeros(4, 3), x, y, config=cfg,
                           threshold=1e-6, max_epochs=7)
  assert r.epochs == 7 and not r.reached
  assert r.losses.shape == (8,)
  np.testing.assert_allclose(r.losses, 0.5, rtol=1e-6)  # ½‖0 − onehot‖² = ½


def test_schedule_is_ignored_and_jit_is_reused():
  rng = np.random.default_rng(3)
  x, y = _blobs(rng, 12, 5, 2)
  cfg = train.FinetuneConfig(loss="ce", batch_size=5, learning_rate=0.1,
                             augment=False)
  a = relearn.relearn_time(_linear, _zeros(5, 2), x, y, config=cfg)
  hits = relearn._relearn_fn.cache_info().hits
  fn = relearn._relearn_fn(_linear, "ce", train.finetune_optimizer(0.1, 0.0), False,
                           0, 5, 100)
  compiled = fn._cache_size()
  # Cosine schedule and another epoch budget: same constant-rate run.
  b = relearn.relearn_time(_linear, _zeros(5, 2), x, y,
                           config=cfg._replace(schedule="cosine", epochs=3))
  assert a.epochs == b.epochs
  np.testing.assert_array_equal(a.losses, b.losses)
  # A new seed or threshold reuses the compiled loop (they are traced).
  relearn.relearn_time(_linear, _zeros(5, 2), x, y, config=cfg._replace(seed=5),
                       threshold=0.1)
  assert relearn._relearn_fn.cache_info().hits >= hits + 3
  assert fn._cache_size() == compiled


def test_epoch_keys_are_the_documented_ones():
  k_perm, k_aug = relearn.epoch_keys(4, 2)
  want = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(4), 2))
  np.testing.assert_array_equal(jax.random.key_data(k_perm),
                                jax.random.key_data(want[0]))
  np.testing.assert_array_equal(jax.random.key_data(k_aug),
                                jax.random.key_data(want[1]))


def test_validation_errors():
  x = np.zeros((4, 3), np.float32)
  y = np.zeros(4, int)
  p = _zeros(3, 2)
  cfg = train.FinetuneConfig(augment=False)
  with pytest.raises(ValueError, match="x_forget is empty"):
    relearn.relearn_time(_linear, p, x[:0], y[:0], config=cfg)
  with pytest.raises(ValueError, match="threshold"):
    relearn.relearn_time(_linear, p, x, y, config=cfg, threshold=0.0)
  with pytest.raises(ValueError, match="max_epochs"):
    relearn.relearn_time(_linear, p, x, y, config=cfg, max_epochs=0)
  with pytest.raises(ValueError, match="y_forget"):
    relearn.relearn_time(_linear, p, x, y[:3], config=cfg)
  with pytest.raises(ValueError, match=r"y_forget must lie in \[0, 2\)"):
    relearn.relearn_time(_linear, p, x, y + 2, config=cfg)
  with pytest.raises(ValueError, match="augment"):
    relearn.relearn_time(_linear, p, x, y, config=train.FinetuneConfig())
  with pytest.raises(ValueError, match="config.loss"):
    relearn.relearn_time(_linear, p, x, y, config=cfg._replace(loss="hinge"))
  with pytest.raises(TypeError, match="FinetuneConfig"):
    relearn.relearn_time(_linear, p, x, y, config={"loss": "ce"})


def test_nan_loss_is_never_relearnt():
  # An infinite step size sends the parameters to inf: the loss becomes NaN,
  # which must not count as "below the threshold" nor stop the count early.
  rng = np.random.default_rng(4)
  x, y = _blobs(rng, 6, 3, 2)
  cfg = train.FinetuneConfig(loss="mse", learning_rate=float("inf"),
                             augment=False)
  r = relearn.relearn_time(_linear, _zeros(3, 2), x, y, config=cfg,
                           max_epochs=4)
  assert np.isnan(r.losses[-1])
  assert r.epochs == 4 and not r.reached and r.losses.shape == (5,)


# ~13 s; relearn time on the real PEFT ResNet is also computed by the bench
# runner's end-to-end test (tests/test_bench.py).
@pytest.mark.slow
def test_smoke_on_the_pretrained_resnet():
  # The real PEFT model (BN scale/shift + head, images with flips and crops):
  # the loop traces through Flax, starts from the model's true loss on D_f and
  # learns within an epoch.
  from fastntk_jax import data, models
  from fastntk_jax.core import kernels
  from fastntk_jax.models import zoo
  from fastntk_jax.data import splits
  model = zoo.resnet_bn_head(20, seed=0)
  xtr, ytr, _, _ = data.load_embedded_cifar10()
  _, (xf, yf) = splits.class_split(models.normalize_cifar(xtr), ytr, [0])
  xf, yf = xf[:24], yf[:24]
  cfg = train.FinetuneConfig(loss="mse", batch_size=16, crop_padding=2)
  r = relearn.relearn_time(model.apply_fn, model.init_params, xf, yf,
                           config=cfg, max_epochs=2)
  start = float(train.loss_fn(kernels.predict(model.apply_fn, model.init_params,
                                              xf), jnp.asarray(yf), "mse"))
  assert r.losses[0] == pytest.approx(start, rel=1e-4)
  assert r.losses.shape == (r.epochs + 1,) and 1 <= r.epochs <= 2
  assert r.reached == (r.losses[-1] < 0.05) and np.all(np.isfinite(r.losses))
  assert r.reached or r.epochs == 2
  assert r.losses[1] < r.losses[0]


def test_forget_loss_is_the_loop_s_loss_and_calibrates_full_to_zero():
  # The calibrated threshold (experiments.evaluate.relearn_threshold) is
  # w_D's own D_f loss: relearning from w_D itself takes 0 epochs, while a
  # model further from D_f needs more.
  from fastntk_jax.experiments import evaluate
  rng = np.random.default_rng(5)
  x = rng.normal(size=(12, 6)).astype(np.float32)
  y = rng.integers(0, 3, 12).astype(np.int32)
  cfg = train.FinetuneConfig(loss="ce", batch_size=4, learning_rate=0.05,
                             augment=False, seed=0)
  w_d = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
         "b": jnp.zeros(3, jnp.float32)}
  loss = relearn.forget_loss(_linear, w_d, x, y, "ce")
  r0 = relearn.relearn_time(_linear, w_d, x, y, config=cfg, threshold=1e9)
  assert loss == pytest.approx(float(r0.losses[0]), rel=1e-6)
  thr = evaluate.relearn_threshold(_linear, w_d, (x, y), cfg,
                                   {"relearn_threshold": "full"})
  assert thr == pytest.approx(loss * (1 + 1e-4))
  assert relearn.relearn_time(_linear, w_d, x, y, config=cfg,
                              threshold=thr).epochs == 0
  far = jax.tree_util.tree_map(lambda a: -3.0 * a, w_d)
  assert relearn.relearn_time(_linear, far, x, y, config=cfg,
                              threshold=thr).epochs > 0
  assert evaluate.relearn_threshold(_linear, w_d, (x, y), cfg,
                                    {"relearn_threshold": 0.05}) == 0.05
  with pytest.raises(ValueError, match="'mse' or 'ce'"):
    relearn.forget_loss(_linear, w_d, x, y, "hinge")
