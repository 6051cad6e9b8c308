"""The reference points, Fast-NTK, and the plain gradient baselines.

* ``full`` — no unlearning: ``w_D``.
* ``retrain`` — the recipe from ``w_0`` on ``D_r`` only (the gold standard).
* ``fast_ntk`` — the one-shot NTK update (:func:`fastntk_jax.core.unlearn.unlearn`).
* ``max_loss`` — gradient ascent on the recipe's loss over ``D_f`` with the
  recipe's optimiser (Fast-NTK's baseline, after Golatkar et al.).
* ``random_label`` — SFR-on's released RL (``Classification/unlearn/
  random_label.py``): fine-tune on ``D_r`` ∪ ``D_f`` relabelled once with
  random wrong classes, SGD with a per-epoch cosine schedule.
* ``ft`` — continue fine-tuning on ``D_r`` (catastrophic forgetting).
* ``ga`` — SFR-on's released GA (``unlearn/gradient_ascent.py``): ascent on
  cross-entropy over ``D_f`` with SGD, the gradient clipped to a global norm
  at every step.
* ``salun`` — SalUn's released RL with a saliency mask (Fan et al., ICLR 2024;
  ``Classification/unlearn/RL.py``, CIFAR-10 branch): per epoch a pass over
  ``D_f`` with labels drawn uniformly over all classes, then a pass over
  ``D_r``, updating only the weights most salient for ``D_f``.

The defaults of the methods that follow released code are that code's
CIFAR-10 settings (docs/methods.md lists them with their sources); the bench
configurations carry values tuned per protocol by ``fastntk tune`` on a
validation split (docs/tuning.md).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
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
  total = base.sum_over_blocks(base.ce_grad_fn(apply_fn, "sum"), params, x, y,
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
          loss=None, mask=None, batch=None, clip_norm=None,
          schedule="constant"):
  """Epochs of ``objective``; ``schedule="cosine"`` decays the rate per epoch
  as PyTorch's ``CosineAnnealingLR(T_max=epochs)`` stepped once an epoch."""
  rng = base.host_rng(key)
  step = base.make_step(problem, objective, tx, loss)
  bs = base.batch_size(problem, n, batch)
  params, state, losses = problem.params, tx.init(problem.params), []
  rates = ([learning_rate] * epochs if schedule == "constant" else
           [learning_rate * base.cosine(e, epochs) for e in range(epochs)])
  per_epoch = schedule != "constant"
  data = data(rng) if callable(data) else data
  for lr in (rates if per_epoch else [learning_rate]):
    params, state, key, ls = base.train_epochs(
        step, params, state, key=key, rng=rng, data=data,
        epochs=1 if per_epoch else epochs, batch=bs, learning_rate=lr,
        mask=mask, clip_norm=clip_norm)
    losses += ls
  return params, {"steps": epochs * -(-n // bs), "objective": losses}


def max_loss(problem, *, key, epochs, learning_rate):
  """Ascent on the recipe's loss over ``D_f``, recipe's optimiser.
  ``info["objective"]`` is minus that loss per epoch."""
  x, y = _split(problem.forget)
  return _loop(problem, key, {"x": x, "y": y}, len(y),
               base.recipe_optimizer(problem.recipe), base.ascend, epochs=epochs,
               learning_rate=learning_rate)


def _loss(problem, loss):
  return problem.recipe.loss if loss == "recipe" else loss


def random_label(problem, *, key, epochs, learning_rate, with_retain, relabel,
                 loss, optimizer, momentum, weight_decay, schedule,
                 batch_size):
  """Descent on ``D_f`` with random wrong labels (drawn once, or afresh every
  epoch with ``relabel="every_epoch"``), together with ``D_r`` and its labels
  in the same shuffled batches when ``with_retain``."""
  x_f, y_f = _split(problem.forget)
  x_r, y_r = _split(problem.retain)
  n = len(y_f) + (len(y_r) if with_retain else 0)
  x_all = np.concatenate([x_f, x_r]) if with_retain else x_f

  def relabelled(rng):
    fixed = random_wrong_labels(rng, y_f, problem.num_classes)

    def epoch_data(epoch):
      del epoch
      y_new = (fixed if relabel == "once" else
               random_wrong_labels(rng, y_f, problem.num_classes))
      return {"x": x_all, "y": (np.concatenate([y_new, y_r]) if with_retain
                                else y_new)}
    return epoch_data

  tx = base.optimizer(optimizer, float(momentum), float(weight_decay))
  return _loop(problem, key, relabelled, n, tx, base.descend, epochs=epochs,
               learning_rate=learning_rate, loss=_loss(problem, loss),
               batch=batch_size, schedule=schedule)


def ft(problem, *, key, epochs, learning_rate):
  """Continued fine-tuning on ``D_r`` (recipe's loss and optimiser)."""
  x, y = _split(problem.retain)
  return _loop(problem, key, {"x": x, "y": y}, len(y),
               base.recipe_optimizer(problem.recipe), base.descend, epochs=epochs,
               learning_rate=learning_rate)


def ga(problem, *, key, epochs, learning_rate, momentum, weight_decay,
       clip_norm, loss, batch_size):
  """Ascent on cross-entropy over ``D_f`` with SGD (momentum, L2), the
  gradient clipped to global norm ``clip_norm`` at every step."""
  x, y = _split(problem.forget)
  tx = base.optimizer("sgd", float(momentum), float(weight_decay))
  return _loop(problem, key, {"x": x, "y": y}, len(y), tx, base.ascend,
               epochs=epochs, learning_rate=learning_rate,
               loss=_loss(problem, loss), batch=batch_size,
               clip_norm=clip_norm)


def salun(problem, *, key, mask_ratio, epochs, learning_rate, optimizer,
          momentum, weight_decay, loss, batch_size):
  """SalUn's RL: per epoch, a pass over ``D_f`` with labels drawn uniformly
  over ALL classes (the true one included, afresh each epoch), then a pass
  over ``D_r``; both update only the salient weights
  (:func:`saliency_mask`). The mask is applied to the final updates, so
  weight decay and momentum leave the other weights bit-identical (the
  released code's latest version resets them to ``w_D`` after each step,
  which has the same effect)."""
  x_f, y_f = _split(problem.forget)
  x_r, y_r = _split(problem.retain)
  mask = saliency_mask(problem.apply_fn, problem.params, x_f, y_f,
                       ratio=float(mask_ratio))
  tx = base.optimizer(optimizer, float(momentum), float(weight_decay))
  rng = base.host_rng(key)
  step = base.make_step(problem, base.descend, tx, _loss(problem, loss))
  params, state, losses = problem.params, tx.init(problem.params), []
  retain = {"x": x_r, "y": y_r}
  for _ in range(epochs):
    forget = {"x": x_f, "y": rng.integers(0, problem.num_classes,
                                          len(y_f)).astype(np.int32)}
    for d in (forget, retain):
      params, state, key, ls = base.train_epochs(
          step, params, state, key=key, rng=rng, data=d, epochs=1,
          batch=base.batch_size(problem, len(d["y"]), batch_size),
          learning_rate=learning_rate, mask=mask)
      losses += ls
  size = sum(int(jnp.sum(m)) for m in jax.tree_util.tree_leaves(mask))
  total = sum(int(np.size(m)) for m in jax.tree_util.tree_leaves(mask))
  return params, {"objective": losses, "mask_size": size,
                  "mask_fraction": size / total}


_EPOCHS, _LR = base.int_at_least(0), base.POSITIVE
_BATCH = base.optional(base.int_at_least(1))
_LOSS = base.one_of("ce", "recipe")

METHODS = {
    "max_loss": base.MethodSpec(
        max_loss, {"epochs": 5, "learning_rate": 2e-3},
        {"epochs": _EPOCHS, "learning_rate": _LR}),
    # SFR-on's random_label.py (CIFAR-10): SGD 0.9 / 5e-4, lr 0.003, 10
    # epochs, cosine over epochs, batch 128, D_r + D_f relabelled once.
    "random_label": base.MethodSpec(
        random_label, {"epochs": 10, "learning_rate": 3e-3,
                       "with_retain": True, "relabel": "once", "loss": "ce",
                       "optimizer": "sgd", "momentum": 0.9,
                       "weight_decay": 5e-4, "schedule": "cosine",
                       "batch_size": 128},
        {"epochs": _EPOCHS, "learning_rate": _LR, "with_retain": base.boolean,
         "relabel": base.one_of("once", "every_epoch"), "loss": _LOSS,
         "optimizer": base.OPTIMIZER, "momentum": base.MOMENTUM,
         "weight_decay": base.NONNEGATIVE,
         "schedule": base.one_of("cosine", "constant"), "batch_size": _BATCH}),
    "ft": base.MethodSpec(
        ft, {"epochs": 20, "learning_rate": 1e-2},
        {"epochs": _EPOCHS, "learning_rate": _LR}),
    # SFR-on's gradient_ascent.py (CIFAR-10): SGD 0.9 / 5e-4, lr 1e-4, 9
    # epochs, clip_grad_norm 0.1 every step, batch 128.
    "ga": base.MethodSpec(
        ga, {"epochs": 9, "learning_rate": 1e-4, "momentum": 0.9,
             "weight_decay": 5e-4, "clip_norm": 0.1, "loss": "ce",
             "batch_size": 128},
        {"epochs": _EPOCHS, "learning_rate": _LR, "momentum": base.MOMENTUM,
         "weight_decay": base.NONNEGATIVE,
         "clip_norm": base.optional(base.POSITIVE), "loss": _LOSS,
         "batch_size": _BATCH}),
    # SalUn's README (CIFAR-10): RL, 10 epochs, lr 0.013, mask with_0.5;
    # impl.py: SGD 0.9 / 5e-4, batch 256, a constant rate over 10 epochs.
    "salun": base.MethodSpec(
        salun, {"mask_ratio": 0.5, "epochs": 10, "learning_rate": 1.3e-2,
                "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                "loss": "ce", "batch_size": 256},
        {"mask_ratio": base.float_in(0.0, 1.0, lo_open=True), "epochs": _EPOCHS,
         "learning_rate": _LR, "optimizer": base.OPTIMIZER,
         "momentum": base.MOMENTUM, "weight_decay": base.NONNEGATIVE,
         "loss": _LOSS, "batch_size": _BATCH}),
}
