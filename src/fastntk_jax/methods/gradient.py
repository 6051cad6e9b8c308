"""The reference points, Fast-NTK, and the plain gradient baselines.

* ``full`` — no unlearning: ``w_D``.
* ``retrain`` — the recipe from ``w_0`` on ``D_r`` only (the gold standard).
* ``fast_ntk`` — the one-shot NTK update (:func:`fastntk_jax.core.unlearn.unlearn`).
* ``max_loss`` — gradient ascent on the recipe's loss over ``D_f`` with the
  recipe's optimiser (Fast-NTK's baseline, after Golatkar et al.).
* ``random_label`` — fine-tune on ``D_f`` relabelled with random wrong classes
  (optionally together with ``D_r``, as SalUn's RL).
* ``ft`` — continue fine-tuning on ``D_r`` (catastrophic forgetting).
* ``ga`` — gradient ascent on cross-entropy over ``D_f`` with SGD, as SalUn's
  and SFR-on's released code.
* ``salun`` — random labels, updating only the weights most salient for
  ``D_f`` (Fan et al., ICLR 2024).

Defaults were chosen by ``benchmarks/tune_baselines.py`` (docs/methods.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fastntk_jax.methods import base

__all__ = ["METHODS", "random_wrong_labels", "saliency_mask"]


def random_wrong_labels(rng: np.random.Generator, y,
                        num_classes: int) -> np.ndarray:
  """A label for each sample drawn uniformly from the OTHER classes.

  Args:
    rng: NumPy generator.
    y: true labels ``(N,)`` in ``[0, num_classes)``.
    num_classes: C ≥ 2.

  Returns:
    int32 labels ``(N,)``, never equal to ``y``.
  """
  y = np.asarray(y)
  shift = rng.integers(1, num_classes, size=y.shape)
  return ((y + shift) % num_classes).astype(np.int32)


@functools.lru_cache(maxsize=32)
def _summed_ce_grad_fn(apply_fn):
  def grad(params, x, y):
    return jax.grad(lambda p: jnp.sum(
        optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y)))(
            params)
  return jax.jit(grad)


def saliency_mask(apply_fn, params, x, y, *, ratio: float,
                  block_size: int = 256):
  """SalUn's weight saliency: the top ``ratio`` of ``|∇_w Σ_{D_f} CE|``.

  The threshold is global over the flattened pytree; exactly
  ``max(1, round(ratio · P))`` weights are selected (ties broken by position).

  Args:
    apply_fn: the model.
    params: ``w_D``, where the gradient is taken.
    x, y: ``D_f`` (inputs ``(N, ...)``, labels ``(N,)``).
    ratio: fraction in ``(0, 1]``.
    block_size: samples per gradient evaluation.

  Returns:
    A boolean pytree shaped like ``params`` (True = updated).
  """
  total = base.sum_over_blocks(_summed_ce_grad_fn(apply_fn), params, x, y,
                            block_size)
  flat = np.abs(np.asarray(ravel_pytree(total)[0]))
  k = max(1, int(round(ratio * flat.size)))
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-flat, kind="stable")[:k]] = True
  return base.mask_from_flat(params, keep)


def _split(data):
  x, y = data
  return base.as_float32(x), np.asarray(y, np.int32)


def _loop(problem, key, data, n, tx, objective, *, epochs, learning_rate,
          loss=None, mask=None):
  rng = base.host_rng(key)
  step = base.make_step(problem, objective, tx, loss)
  bs = base.batch_size(problem, n)
  params, _, _, losses = base.train_epochs(
      step, problem.params, tx.init(problem.params), key=key, rng=rng,
      data=data(rng) if callable(data) else data, epochs=epochs, batch=bs,
      learning_rate=learning_rate, mask=mask)
  return params, {"steps": epochs * -(-n // bs), "objective": losses}


def max_loss(problem, *, key, epochs, learning_rate):
  """Ascent on the recipe's loss over ``D_f``, recipe's optimiser.
  ``info["objective"]`` is minus that loss per epoch."""
  x, y = _split(problem.forget)
  return _loop(problem, key, {"x": x, "y": y}, len(y),
               base.recipe_optimizer(problem.recipe), base.ascend, epochs=epochs,
               learning_rate=learning_rate)


def _relabelled(problem, with_retain):
  x_f, y_f = _split(problem.forget)
  if with_retain:
    x_r, y_r = _split(problem.retain)
    x_all = np.concatenate([x_f, x_r])

  def data(rng):
    def epoch_data(epoch):
      del epoch  # fresh wrong labels every epoch
      y_new = random_wrong_labels(rng, y_f, problem.num_classes)
      if with_retain:
        return {"x": x_all, "y": np.concatenate([y_new, y_r])}
      return {"x": x_f, "y": y_new}
    return epoch_data

  return data, len(y_f) + (len(problem.retain[1]) if with_retain else 0)


def random_label(problem, *, key, epochs, learning_rate, with_retain):
  """Descent on ``D_f`` with random wrong labels (and ``D_r`` with its labels
  in the same shuffled batches when ``with_retain``), recipe's loss and
  optimiser."""
  data, n = _relabelled(problem, with_retain)
  return _loop(problem, key, data, n, base.recipe_optimizer(problem.recipe),
               base.descend, epochs=epochs, learning_rate=learning_rate)


def ft(problem, *, key, epochs, learning_rate):
  """Continued fine-tuning on ``D_r`` (recipe's loss and optimiser)."""
  x, y = _split(problem.retain)
  return _loop(problem, key, {"x": x, "y": y}, len(y),
               base.recipe_optimizer(problem.recipe), base.descend, epochs=epochs,
               learning_rate=learning_rate)


def ga(problem, *, key, epochs, learning_rate, momentum, weight_decay):
  """Ascent on cross-entropy over ``D_f`` with SGD (momentum, L2)."""
  x, y = _split(problem.forget)
  tx = base.optimizer("sgd", float(momentum), float(weight_decay))
  return _loop(problem, key, {"x": x, "y": y}, len(y), tx, base.ascend,
               epochs=epochs, learning_rate=learning_rate, loss="ce")


def salun(problem, *, key, mask_ratio, epochs, learning_rate, optimizer,
          momentum, weight_decay):
  """Random labels on ``D_f`` + true labels on ``D_r`` (cross-entropy),
  updating only the salient weights (:func:`saliency_mask`); the mask is
  applied to the final updates, so weight decay and momentum leave the other
  weights bit-identical."""
  x_f, y_f = _split(problem.forget)
  mask = saliency_mask(problem.apply_fn, problem.params, x_f, y_f,
                       ratio=float(mask_ratio))
  data, n = _relabelled(problem, True)
  tx = base.optimizer(optimizer, float(momentum), float(weight_decay))
  params, info = _loop(problem, key, data, n, tx, base.descend, epochs=epochs,
                       learning_rate=learning_rate, loss="ce", mask=mask)
  size = sum(int(jnp.sum(m)) for m in jax.tree_util.tree_leaves(mask))
  total = sum(int(np.size(m)) for m in jax.tree_util.tree_leaves(mask))
  return params, dict(info, mask_size=size, mask_fraction=size / total)


_EPOCHS, _LR = base.int_at_least(0), base.POSITIVE

METHODS = {
    "max_loss": base.MethodSpec(
        max_loss, {"epochs": 5, "learning_rate": 2e-3},
        {"epochs": _EPOCHS, "learning_rate": _LR}),
    "random_label": base.MethodSpec(
        random_label, {"epochs": 20, "learning_rate": 1e-3,
                       "with_retain": False},
        {"epochs": _EPOCHS, "learning_rate": _LR, "with_retain": base.boolean}),
    "ft": base.MethodSpec(
        ft, {"epochs": 20, "learning_rate": 1e-2},
        {"epochs": _EPOCHS, "learning_rate": _LR}),
    "ga": base.MethodSpec(
        ga, {"epochs": 20, "learning_rate": 1e-3, "momentum": 0.9,
             "weight_decay": 5e-4},
        {"epochs": _EPOCHS, "learning_rate": _LR, "momentum": base.MOMENTUM,
         "weight_decay": base.NONNEGATIVE}),
    "salun": base.MethodSpec(
        salun, {"mask_ratio": 0.5, "epochs": 10, "learning_rate": 3e-2,
                "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4},
        {"mask_ratio": base.float_in(0.0, 1.0, lo_open=True), "epochs": _EPOCHS,
         "learning_rate": _LR, "optimizer": base.OPTIMIZER,
         "momentum": base.MOMENTUM, "weight_decay": base.NONNEGATIVE}),
}
