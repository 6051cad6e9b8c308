"""BatchNorm running statistics: re-estimating them on a chosen set.

Running statistics estimated on ``D`` carry information about ``D_f``: an
"unlearned" model whose BatchNorm layers still normalise with means and
variances that include the forgotten samples has not forgotten them. The
project's fine-tuning keeps BatchNorm in inference mode with the *pretrained*
statistics (the default, see :mod:`fastntk_jax.training.train`), so the statistics never
see ``D``. Models whose statistics were estimated on ``D`` can have them
re-estimated on ``D_r`` after unlearning with :func:`reestimate`.

This is a Flax edge module: it calls ``module.apply(..., train=True,
mutable=["batch_stats"])``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["reestimate"]


def reestimate(module, variables: Mapping[str, Any], x, *,
               preprocess: Callable | None = None, batch_size: int = 256,
               **apply_kwargs) -> dict:
  """Running statistics of every BatchNorm layer, re-estimated on ``x``.

  Each batch is normalised with its own statistics (as in training), and the
  per-layer batch means and variances are combined into the mean and the
  (biased) variance of all of ``x``: with one BatchNorm layer this is exactly
  the population statistics of its input. The BatchNorm momentum is found by
  probing, so any Flax model with ``batch_stats`` works.

  Args:
    module: a Flax module taking ``train=True``.
    variables: its variables, with ``batch_stats``.
    x: inputs ``(N, ...)`` (e.g. the images of ``D_r``).
    preprocess: optional map from a batch of ``x`` to the model's input.
    batch_size: samples per forward pass.
    **apply_kwargs: more keyword arguments for ``module.apply``.

  Returns:
    A new ``batch_stats`` tree (same structure, float32).
  """
  if "batch_stats" not in variables:
    raise ValueError("reestimate: the variables have no 'batch_stats' "
                     "collection (no BatchNorm layers); nothing to re-estimate.")
  if len(x) == 0:
    raise ValueError("reestimate: x is empty.")
  if batch_size < 2:
    raise ValueError("reestimate: batch_size must be >= 2.")
  stats = variables["batch_stats"]
  prep = preprocess if preprocess is not None else (lambda b: b)

  @jax.jit
  def run(bs, xb):
    v = dict(variables, batch_stats=bs)
    _, new = module.apply(v, prep(xb), train=True, mutable=["batch_stats"],
                          **apply_kwargs)
    return new["batch_stats"]

  zeros = jax.tree_util.tree_map(jnp.zeros_like, stats)
  ones = jax.tree_util.tree_map(jnp.ones_like, stats)
  first = jnp.asarray(x[:batch_size])
  # From running value r: new = m r + (1 - m) b. With r = 0 and r = 1 on the
  # same batch, the difference is the momentum m of each layer.
  momentum = jax.tree_util.tree_map(
      lambda a, b: float(np.mean(np.asarray(b) - np.asarray(a))),
      run(zeros, first), run(ones, first))
  bad = [m for m in jax.tree_util.tree_leaves(momentum) if not 0 <= m < 1]
  if bad:
    raise ValueError(f"reestimate: BatchNorm momentum probe gave {bad[0]}; "
                     "expected a value in [0, 1).")
  n_total = len(x)
  sums = None
  for s in range(0, n_total, batch_size):
    xb = jnp.asarray(x[s:s + batch_size])
    new = jax.tree_util.tree_map(np.asarray, run(zeros, xb))
    sums = _accumulate(sums, new, momentum, xb.shape[0])
  return _finish(sums, n_total)


def _accumulate(acc, new, momentum, n):
  if isinstance(new, Mapping) and set(new) >= {"mean", "var"} and not any(
      isinstance(v, Mapping) for v in new.values()):
    mean = np.asarray(new["mean"], np.float64) / (1.0 - momentum["mean"])
    var = np.asarray(new["var"], np.float64) / (1.0 - momentum["var"])
    if acc is None:
      acc = {"mean": np.zeros_like(mean), "sq": np.zeros_like(mean)}
    return {"mean": acc["mean"] + n * mean,
            "sq": acc["sq"] + n * (var + mean ** 2)}
  return {k: _accumulate(None if acc is None else acc[k], new[k], momentum[k],
                         n) for k in new}


def _finish(acc, n):
  if set(acc) == {"mean", "sq"} and not isinstance(acc["mean"], Mapping):
    mean = acc["mean"] / n
    var = np.maximum(acc["sq"] / n - mean ** 2, 0.0)
    return {"mean": mean.astype(np.float32), "var": var.astype(np.float32)}
  return {k: _finish(v, n) for k, v in acc.items()}
