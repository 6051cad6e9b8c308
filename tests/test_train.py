import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.training import train


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


def test_until_stops_after_the_epoch_it_returns_true_and_keeps_its_params():
  apply_fn, w0, x, y = _problem()
  cfg = train.FinetuneConfig(epochs=6, batch_size=16, seed=1, augment=False)
  seen = []

  def until(epoch, params):
    seen.append((epoch, np.asarray(params["w"])))
    return epoch == 2

  stopped = train.finetune(apply_fn, w0, x, y, config=cfg, until=until)
  assert [e for e, _ in seen] == [0, 1, 2]
  assert len(stopped.losses) == len(stopped.epoch_seconds) == 3
  assert np.all(stopped.epoch_seconds > 0)
  # The same as three epochs of the same recipe, and what until saw last.
  three = train.finetune(apply_fn, w0, x, y, config=cfg._replace(epochs=3))
  np.testing.assert_array_equal(stopped.params["w"], three.params["w"])
  np.testing.assert_array_equal(stopped.params["w"], seen[-1][1])
  full = train.finetune(apply_fn, w0, x, y, config=cfg)
  assert len(full.epoch_seconds) == 6
  assert not np.allclose(full.params["w"], stopped.params["w"])


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


def test_random_crop_is_a_shifted_window():
  x = jnp.arange(2 * 6 * 6 * 1.0).reshape(2, 6, 6, 1) + 1
  out = np.asarray(train.random_crop(jax.random.PRNGKey(1), x, 2))
  assert out.shape == x.shape
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(2):
    hits = [(a, b) for a in range(5) for b in range(5)
            if np.array_equal(padded[i, a:a + 6, b:b + 6], out[i])]
    assert len(hits) == 1
  outs = {tuple(np.asarray(train.random_crop(jax.random.PRNGKey(k), x, 2))[0, :, :, 0].ravel())
          for k in range(8)}
  assert len(outs) > 2  # offsets vary with the key
  np.testing.assert_array_equal(train.random_crop(jax.random.PRNGKey(0), x, 0), x)


def test_cosine_schedule_and_crop_in_finetune():
  s = train.learning_rate_schedule(1.0, "cosine", 100, 10)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6
  assert float(s(100)) < 1e-6
  assert float(train.learning_rate_schedule(0.5, "constant", 10)(7)) == 0.5
  with pytest.raises(ValueError, match="schedule"):
    train.learning_rate_schedule(1.0, "step", 10)
  apply_fn, w0, x, y = _problem()
  cfg = train.FinetuneConfig(epochs=3, batch_size=16, crop_padding=1,
                             schedule="cosine", warmup_epochs=1)
  res = train.finetune(apply_fn, w0, x, y, config=cfg)
  assert np.all(np.isfinite(res.losses))
  base = train.finetune(apply_fn, w0, x, y, config=cfg._replace(crop_padding=0))
  assert not np.allclose(res.params["w"], base.params["w"])
  with pytest.raises(ValueError, match="schedule"):
    train.finetune(apply_fn, w0, x, y, config=cfg._replace(schedule="x"))


def _tiny_cnn():
  import flax.linen as nn

  class Tiny(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
      h = nn.Conv(4, (3, 3))(x)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
      h = nn.relu(h).mean(axis=(1, 2))
      return nn.Dense(self.num_classes, name="head")(h)

  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
  y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype(np.int32)
  m = Tiny()
  v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  return m, v, x, y


def test_pretrain_learns_and_updates_statistics():
  m, v, x, y = _tiny_cnn()
  prep = lambda b: b.astype(jnp.float32) / 255.0
  cfg = train.PretrainConfig(epochs=30, batch_size=10, learning_rate=0.05,
                             crop_padding=0, flip=False, warmup_epochs=0)
  infos = []
  st = train.pretrain(m, v, x, y, preprocess=prep, config=cfg,
                      on_epoch=lambda s, i: infos.append(i))
  assert st.epoch == 30 and len(infos) == 30
  assert infos[-1]["loss"] < 0.8 * infos[0]["loss"]
  assert not np.allclose(st.variables["batch_stats"]["BatchNorm_0"]["mean"],
                         v["batch_stats"]["BatchNorm_0"]["mean"])


def test_pretrain_resume_equals_uninterrupted(tmp_path):
  from fastntk_jax.io import checkpoint
  m, v, x, y = _tiny_cnn()
  prep = lambda b: b.astype(jnp.float32) / 255.0
  cfg = train.PretrainConfig(epochs=3, batch_size=10, learning_rate=0.05,
                             crop_padding=2)
  full = train.pretrain(m, v, x, y, preprocess=prep, config=cfg)

  def save_after_first(st, info):
    if info["epoch"] == 1:
      checkpoint.save(tmp_path / "p.ckpt", {"variables": st.variables,
                                            "opt_state": st.opt_state},
                      config={"epoch": st.epoch}, kind="backbone")
      raise KeyboardInterrupt  # the run dies after epoch 1

  with pytest.raises(KeyboardInterrupt):
    train.pretrain(m, v, x, y, preprocess=prep, config=cfg,
                   on_epoch=save_after_first)
  ck = checkpoint.load(tmp_path / "p.ckpt", expect_kind="backbone")
  fresh = train.init_pretrain_state(v, cfg, len(x))
  state = train.PretrainState(
      checkpoint.restore_like(fresh.variables, ck.trees["variables"]),
      checkpoint.restore_like(fresh.opt_state, ck.trees["opt_state"]),
      ck.config["epoch"])
  resumed = train.pretrain(m, v, x, y, preprocess=prep, config=cfg, state=state)
  assert resumed.epoch == 3
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      resumed.variables, full.variables)


def test_pretrain_bad_config():
  m, v, x, y = _tiny_cnn()
  with pytest.raises(ValueError, match="optimizer"):
    train.pretrain(m, v, x, y, preprocess=lambda b: b,
                   config=train.PretrainConfig(optimizer="lamb"))
  with pytest.raises(ValueError, match="batch_size"):
    train.pretrain(m, v, x, y, preprocess=lambda b: b,
                   config=train.PretrainConfig(batch_size=64))
