"""The reference points, Fast-NTK, and the plain gradient baselines.

* ``full`` — no unlearning: ``w_D``.
* ``retrain`` — the recipe from ``w_0`` on ``D_r`` only (the gold standard).
* ``fast_ntk`` — the one-shot NTK update (:func:`fastntk_jax.unlearn.unlearn`).
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

from fastntk_jax import train
from fastntk_jax.unlearn import unlearn as ntk_unlearn
from fastntk_jax.methods import _common as C

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
  total = C.sum_over_blocks(_summed_ce_grad_fn(apply_fn), params, x, y,
                            block_size)
  flat = np.abs(np.asarray(ravel_pytree(total)[0]))
  k = max(1, int(round(ratio * flat.size)))
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-flat, kind="stable")[:k]] = True
  return C.mask_from_flat(params, keep)


def _split(data):
  x, y = data
  return C.as_float32(x), np.asarray(y, np.int32)


def full(problem, *, key):
  """No unlearning: ``w_D``."""
  del key
  return problem.params, {}


def retrain(problem, *, key):
  """The recipe from ``w_0`` on ``D_r`` (its own seed, like ``w_D``'s)."""
  del key
  res = train.finetune(problem.apply_fn, problem.init_params, *problem.retain,
                       config=problem.recipe)
  return res.params, {"epochs": int(problem.recipe.epochs),
                      "recipe_seed": int(problem.recipe.seed),
                      "losses": [float(v) for v in res.losses]}


def fast_ntk(problem, *, key, damping, solver, linearize_at, anchor, loss):
  """Fast-NTK (:func:`fastntk_jax.unlearn.unlearn`): ``linearize_at`` —
  ``"w_D"`` (J and f at the fine-tuned parameters) or ``"w_0"``; ``anchor``
  — ``"w_0"`` (the ridge term centred at the parameters fine-tuning started
  from) or ``"w_D"`` (no anchor given); ``loss`` — ``"recipe"`` (the
  fine-tuning loss), ``"mse"`` or ``"ce"``."""
  del key
  res = ntk_unlearn(
      problem.apply_fn, problem.params, problem.retain, problem.forget,
      anchor=problem.init_params if anchor == "w_0" else None,
      linearize_at=linearize_at, damping=float(damping),
      loss=problem.recipe.loss if loss == "recipe" else loss, solver=solver)
  return res.params, {"solver": res.solver, "damping": res.damping,
                      "cond": res.cond, "delta_norm": res.delta_norm,
                      "linearized_at": res.linearized_at,
                      "anchored_at": res.anchored_at,
                      "relative_residual": res.relative_residual,
                      "newton_steps": [r.iterations for r in res.solves],
                      "converged": res.converged}


def _loop(problem, key, data, n, tx, objective, *, epochs, learning_rate,
          loss=None, mask=None):
  rng = C.host_rng(key)
  step = C.make_step(problem, objective, tx, loss)
  bs = C.batch_size(problem, n)
  params, _, _, losses = C.train_epochs(
      step, problem.params, tx.init(problem.params), key=key, rng=rng,
      data=data(rng) if callable(data) else data, epochs=epochs, batch=bs,
      learning_rate=learning_rate, mask=mask)
  return params, {"steps": epochs * -(-n // bs), "objective": losses}


def max_loss(problem, *, key, epochs, learning_rate):
  """Ascent on the recipe's loss over ``D_f``, recipe's optimiser.
  ``info["objective"]`` is minus that loss per epoch."""
  x, y = _split(problem.forget)
  return _loop(problem, key, {"x": x, "y": y}, len(y),
               C.recipe_optimizer(problem.recipe), C.ascend, epochs=epochs,
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
  return _loop(problem, key, data, n, C.recipe_optimizer(problem.recipe),
               C.descend, epochs=epochs, learning_rate=learning_rate)


def ft(problem, *, key, epochs, learning_rate):
  """Continued fine-tuning on ``D_r`` (recipe's loss and optimiser)."""
  x, y = _split(problem.retain)
  return _loop(problem, key, {"x": x, "y": y}, len(y),
               C.recipe_optimizer(problem.recipe), C.descend, epochs=epochs,
               learning_rate=learning_rate)


def ga(problem, *, key, epochs, learning_rate, momentum, weight_decay):
  """Ascent on cross-entropy over ``D_f`` with SGD (momentum, L2)."""
  x, y = _split(problem.forget)
  tx = C.optimizer("sgd", float(momentum), float(weight_decay))
  return _loop(problem, key, {"x": x, "y": y}, len(y), tx, C.ascend,
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
  tx = C.optimizer(optimizer, float(momentum), float(weight_decay))
  params, info = _loop(problem, key, data, n, tx, C.descend, epochs=epochs,
                       learning_rate=learning_rate, loss="ce", mask=mask)
  size = sum(int(jnp.sum(m)) for m in jax.tree_util.tree_leaves(mask))
  total = sum(int(np.size(m)) for m in jax.tree_util.tree_leaves(mask))
  return params, dict(info, mask_size=size, mask_fraction=size / total)


_EPOCHS, _LR = C.int_at_least(0), C.POSITIVE

METHODS = {
    "full": C.MethodSpec(full, {}, {}),
    "retrain": C.MethodSpec(retrain, {}, {}),
    "fast_ntk": C.MethodSpec(
        fast_ntk, {"damping": 1.0, "solver": "auto", "linearize_at": "w_D",
                   "anchor": "w_0", "loss": "recipe"},
        {"damping": C.NONNEGATIVE,
         "solver": C.one_of("auto", "dual", "primal", "cg"),
         "linearize_at": C.one_of("w_D", "w_0"),
         "anchor": C.one_of("w_0", "w_D"),
         "loss": C.one_of("recipe", "mse", "ce")}),
    "max_loss": C.MethodSpec(
        max_loss, {"epochs": 5, "learning_rate": 2e-3},
        {"epochs": _EPOCHS, "learning_rate": _LR}),
    "random_label": C.MethodSpec(
        random_label, {"epochs": 20, "learning_rate": 1e-3,
                       "with_retain": False},
        {"epochs": _EPOCHS, "learning_rate": _LR, "with_retain": C.boolean}),
    "ft": C.MethodSpec(
        ft, {"epochs": 20, "learning_rate": 1e-2},
        {"epochs": _EPOCHS, "learning_rate": _LR}),
    "ga": C.MethodSpec(
        ga, {"epochs": 20, "learning_rate": 1e-3, "momentum": 0.9,
             "weight_decay": 5e-4},
        {"epochs": _EPOCHS, "learning_rate": _LR, "momentum": C.MOMENTUM,
         "weight_decay": C.NONNEGATIVE}),
    "salun": C.MethodSpec(
        salun, {"mask_ratio": 0.5, "epochs": 10, "learning_rate": 3e-2,
                "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4},
        {"mask_ratio": C.float_in(0.0, 1.0, lo_open=True), "epochs": _EPOCHS,
         "learning_rate": _LR, "optimizer": C.OPTIMIZER,
         "momentum": C.MOMENTUM, "weight_decay": C.NONNEGATIVE}),
}
