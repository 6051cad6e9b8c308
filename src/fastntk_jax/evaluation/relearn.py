"""Relearn time: how many epochs of fine-tuning on D_f bring D_f back.

The Fast-NTK paper (Li et al. 2023, https://arxiv.org/abs/2312.14923) measures
how deeply D_f was forgotten by fine-tuning the unlearned parameters on D_f
alone with the fine-tuning recipe and counting the epochs until the loss on
D_f falls below a threshold (0.05), capped at 100 epochs. A model that merely
hides D_f relearns it in an epoch or two; one that never saw it takes about
as long as learning it afresh.

The whole count runs inside one jitted ``jax.lax.while_loop`` (epochs) over a
``jax.lax.scan`` (steps), so a measurement costs one compilation (cached per
``apply_fn`` and recipe) plus the training itself, without a host round trip
per step.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastntk_jax.core import kernels
from fastntk_jax.training import train

__all__ = ["RelearnResult", "epoch_keys", "forget_loss", "relearn_time"]


class RelearnResult(NamedTuple):
  """Result of :func:`relearn_time`.

  Attributes:
    epochs: epochs run until the loss on D_f fell below the threshold; 0 when
      it already was; ``max_epochs`` when it never did.
    reached: whether the threshold was reached.
    losses: float ``(epochs + 1,)``: the loss on all of D_f (no augmentation)
      before training (index 0) and after each epoch.
    seconds: wall time, compilation included.
  """
  epochs: int
  reached: bool
  losses: np.ndarray
  seconds: float


def epoch_keys(seed: int, epoch: int) -> tuple[jax.Array, jax.Array]:
  """The ``(permutation_key, augmentation_key)`` of a 0-based epoch.

  Epoch ``e`` shuffles D_f with ``jax.random.permutation(permutation_key, n)``
  and augments its ``s``-th batch with
  ``jax.random.split(augmentation_key, steps)[s]``. Public so that a
  reference implementation can replay the same data order.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
  k_perm, k_aug = jax.random.split(key)
  return k_perm, k_aug


@functools.lru_cache(maxsize=32)
def _relearn_fn(apply_fn, loss: str, tx: optax.GradientTransformation,
                augment: bool, crop_padding: int, batch: int, max_epochs: int):
  """The jitted loop for one ``apply_fn`` and recipe (shapes trace on call)."""

  def full_loss(params, x, y):
    return train.loss_fn(apply_fn(params, x), y, loss)

  def step(params, opt_state, key, xb, yb):
    if augment and crop_padding:
      xb = train.flip_and_crop(key, xb, crop_padding)
    elif augment:
      xb = train.hflip(key, xb)
    grads = jax.grad(lambda p: train.loss_fn(apply_fn(p, xb), yb, loss))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def run(params, x, y, seed, threshold):
    n = x.shape[0]
    full, rest = divmod(n, batch)
    steps = full + (rest > 0)

    def epoch(params, opt_state, e):
      k_perm, k_aug = epoch_keys(seed, e)
      order = jax.random.permutation(k_perm, n)
      keys = jax.random.split(k_aug, steps)

      def body(carry, inputs):
        idx, key = inputs
        p, s = step(*carry, key, x[idx], y[idx])
        return (p, s), None

      (params, opt_state), _ = jax.lax.scan(
          body, (params, opt_state),
          (order[:full * batch].reshape(full, batch), keys[:full]))
      if rest:
        # The short last batch is a step of its own (its own static shape):
        # every sample is used every epoch, and the step equals the one
        # train.finetune takes on a short last batch.
        idx = order[full * batch:]
        params, opt_state = step(params, opt_state, keys[full], x[idx], y[idx])
      return params, opt_state

    def cond(state):
      e, _, _, buf = state
      # ~(loss < threshold) keeps a NaN loss training until max_epochs.
      return (e < max_epochs) & ~(buf[e] < threshold)

    def body(state):
      e, params, opt_state, buf = state
      params, opt_state = epoch(params, opt_state, e)
      return e + 1, params, opt_state, buf.at[e + 1].set(
          full_loss(params, x, y))

    loss0 = full_loss(params, x, y)
    threshold = threshold.astype(loss0.dtype)
    buf = jnp.full((max_epochs + 1,), jnp.nan, loss0.dtype).at[0].set(loss0)
    e, _, _, buf = jax.lax.while_loop(
        cond, body, (jnp.int32(0), params, tx.init(params), buf))
    return e, buf

  return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _loss_fn(apply_fn, loss: str):
  return jax.jit(lambda p, x, y: train.loss_fn(apply_fn(p, x), y, loss))


def forget_loss(apply_fn, params, x, y, loss: str) -> float:
  """The loss :func:`relearn_time` compares with its threshold: the mean
  ``loss`` (``"mse"`` or ``"ce"``) of ``params`` on all of ``(x, y)``, without
  augmentation, in one batch."""
  if loss not in ("mse", "ce"):
    raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}.")
  return float(_loss_fn(apply_fn, loss)(params, jnp.asarray(x),
                                        jnp.asarray(y, jnp.int32)))


def _validate(apply_fn, params, x, y, config, threshold, max_epochs):
  if not isinstance(config, train.FinetuneConfig):
    raise TypeError("config must be a train.FinetuneConfig, got "
                    f"{type(config).__name__}.")
  if config.loss not in ("mse", "ce"):
    raise ValueError(f"config.loss must be 'mse' or 'ce', got {config.loss!r}.")
  if int(config.batch_size) < 1 or int(config.crop_padding) < 0:
    raise ValueError(
        "config.batch_size must be >= 1 and config.crop_padding >= 0; got "
        f"{config.batch_size} and {config.crop_padding}.")
  if np.ndim(x) < 1 or np.shape(x)[0] == 0:
    raise ValueError("x_forget is empty: relearn time needs at least one "
                     "sample of D_f.")
  if np.shape(y) != np.shape(x)[:1]:
    raise ValueError(f"y_forget must have shape ({np.shape(x)[0]},) to match "
                     f"x_forget; got {np.shape(y)}.")
  if not np.issubdtype(np.asarray(y).dtype, np.integer):
    raise TypeError(f"y_forget must hold integer labels; got dtype "
                    f"{np.asarray(y).dtype}.")
  if config.augment and np.ndim(x) != 4:
    raise ValueError("config.augment flips images (N, H, W, C); got x_forget "
                     f"of shape {np.shape(x)}. Set augment=False for other "
                     "inputs.")
  if not (np.isfinite(threshold) and threshold > 0):
    raise ValueError(f"threshold must be a finite number > 0, got {threshold}.")
  if isinstance(max_epochs, bool) or int(max_epochs) != max_epochs or (
      max_epochs < 1):
    raise ValueError(f"max_epochs must be an integer >= 1, got {max_epochs}.")
  c = kernels.num_outputs(apply_fn, params, x)
  y = np.asarray(y)
  if y.min() < 0 or y.max() >= c:
    raise ValueError(f"y_forget must lie in [0, {c}) for a model with {c} "
                     f"outputs; got range [{y.min()}, {y.max()}].")


def relearn_time(apply_fn: Callable[[Any, Any], jax.Array], params, x_forget,
                 y_forget, *, config: train.FinetuneConfig,
                 threshold: float = 0.05, max_epochs: int = 100
                 ) -> RelearnResult:
  """Epochs of fine-tuning on D_f until its loss falls below ``threshold``.

  Starting from ``params`` (the unlearned PEFT parameters), each epoch runs
  the recipe of ``config`` over a fresh permutation of D_f: its optimizer
  (``train.finetune_optimizer(learning_rate, weight_decay)``, Adam or AdamW), its
  loss, batches of ``min(batch_size, |D_f|)`` with a short last batch when
  ``|D_f|`` is not a multiple (every sample is used every epoch), and its
  augmentation (``augment``, ``crop_padding``). After each epoch the loss
  ``train.loss_fn(apply_fn(params, x_forget), y_forget, config.loss)`` on all
  of D_f, without augmentation, is compared with ``threshold``.

  The learning rate is constant: ``config.schedule`` and ``config.epochs``
  are ignored, since a schedule needs the training horizon and the horizon is
  what is being measured (a cosine decay over ``max_epochs`` would make the
  count depend on the cap).

  Data order and augmentation come from ``config.seed`` through
  :func:`epoch_keys` (JAX random numbers, so the loop needs no host data).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (N, C)``.
    params: the starting PEFT parameters (after unlearning).
    x_forget: D_f's inputs ``(N_f, ...)``, as ``apply_fn`` takes them.
    y_forget: D_f's integer labels ``(N_f,)``.
    config: the fine-tuning recipe (:class:`fastntk_jax.training.train.FinetuneConfig`).
    threshold: the loss on D_f that counts as relearnt (the paper's 0.05).
    max_epochs: the cap; reported when the threshold is never reached.

  Returns:
    :class:`RelearnResult`.
  """
  _validate(apply_fn, params, x_forget, y_forget, config, threshold, max_epochs)
  t0 = time.perf_counter()
  x = jnp.asarray(x_forget)
  y = jnp.asarray(y_forget, jnp.int32)
  batch = int(min(int(config.batch_size), x.shape[0]))
  tx = train.finetune_optimizer(float(config.learning_rate), float(config.weight_decay))
  fn = _relearn_fn(apply_fn, config.loss, tx, bool(config.augment),
                   int(config.crop_padding), batch, int(max_epochs))
  e, buf = fn(params, x, y, jnp.int32(config.seed), jnp.float32(threshold))
  epochs = int(e)
  losses = np.asarray(buf)[:epochs + 1]
  # The same comparison, in the loss's precision, as the loop's stopping rule.
  reached = bool(losses[-1] < losses.dtype.type(threshold))
  return RelearnResult(epochs, reached, losses,
                       time.perf_counter() - t0)
