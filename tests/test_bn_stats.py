import flax.linen as nn
import jax
import numpy as np
import pytest

from fastntk_jax.training import bn_stats


class _OneBN(nn.Module):
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(3)(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(h)
    return nn.Dense(2)(h)


@pytest.mark.parametrize("momentum,batch_size", [(0.9, 4), (0.99, 3), (0.0, 10)])
def test_single_layer_gives_population_statistics(momentum, batch_size):
  m = _OneBN(momentum)
  x = (np.random.default_rng(0).normal(size=(10, 4)) * 3 + 1).astype(np.float32)
  v = m.init(jax.random.PRNGKey(0), x)
  st = bn_stats.reestimate(m, v, x, batch_size=batch_size)
  d = v["params"]["Dense_0"]
  h = x @ np.asarray(d["kernel"]) + np.asarray(d["bias"])
  np.testing.assert_allclose(st["BatchNorm_0"]["mean"], h.mean(0), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(st["BatchNorm_0"]["var"], h.var(0), rtol=1e-4)
  # and the result differs from the (initial) statistics it replaces
  assert not np.allclose(st["BatchNorm_0"]["var"],
                         v["batch_stats"]["BatchNorm_0"]["var"])


def test_reestimate_on_retain_differs_from_all():
  m = _OneBN()
  rng = np.random.default_rng(1)
  x_r = rng.normal(size=(20, 4)).astype(np.float32)
  x_f = (rng.normal(size=(5, 4)) + 5).astype(np.float32)
  v = m.init(jax.random.PRNGKey(0), x_r)
  all_ = bn_stats.reestimate(m, v, np.concatenate([x_r, x_f]), batch_size=8)
  ret = bn_stats.reestimate(m, v, x_r, batch_size=8)
  assert np.max(np.abs(all_["BatchNorm_0"]["mean"] - ret["BatchNorm_0"]["mean"])) > 0.1


def test_bad_inputs():
  class NoBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(2)(x)

  x = np.zeros((4, 3), np.float32)
  v = NoBN().init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="batch_stats"):
    bn_stats.reestimate(NoBN(), v, x)
  m = _OneBN()
  v = m.init(jax.random.PRNGKey(0), np.zeros((4, 4), np.float32))
  with pytest.raises(ValueError, match="empty"):
    bn_stats.reestimate(m, v, np.zeros((0, 4), np.float32))
