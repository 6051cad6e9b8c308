"""PEFT fine-tuning with optax: the recipe that produces ``w_D`` (and Retrain).

The model is seen as ``apply_fn(params, x) -> logits``, the same function the
unlearning update linearises, so fine-tuning, retraining and Fast-NTK act on
the same parameters and the same function (BatchNorm in inference mode with
the backbone's running statistics).

Losses:

* ``"mse"`` — ``½‖f(x) − onehot(y)‖²`` per sample: the loss the linearised
  theory of Eq. (1) assumes. Models meant to be unlearned with Fast-NTK should
  be fine-tuned with it (see docs/defaults.md for the measurements).
* ``"ce"`` — softmax cross-entropy.

"Retrain" in the papers is this same recipe, from ``w_0``, on ``D_r`` only.
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

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "hflip",
    "loss_fn",
]


class FinetuneConfig(NamedTuple):
  """The fine-tuning recipe.

  Attributes:
    loss: ``"mse"`` (one-hot targets; default) or ``"ce"``.
    epochs: passes over the data.
    batch_size: samples per step (the last, short batch of an epoch is used).
    learning_rate: Adam's step size.
    weight_decay: decoupled weight decay (AdamW) towards zero; 0 disables it.
    augment: horizontal flips of image batches ``(N, H, W, C)`` with
      probability ½.
    seed: data order and augmentation.
  """
  loss: str = "mse"
  epochs: int = 30
  batch_size: int = 100
  learning_rate: float = 1e-2
  weight_decay: float = 0.0
  augment: bool = True
  seed: int = 0


class FinetuneResult(NamedTuple):
  """Attributes: ``params`` (trained), ``losses`` (mean loss per epoch),
  ``seconds`` (wall time, compilation included)."""
  params: Any
  losses: np.ndarray
  seconds: float


def loss_fn(logits: jax.Array, y: jax.Array, loss: str) -> jax.Array:
  """Mean per-sample loss of ``logits (N, C)`` against integer ``y (N,)``."""
  if loss == "mse":
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
    return 0.5 * jnp.mean(jnp.sum((logits - onehot) ** 2, axis=-1))
  if loss == "ce":
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}.")


def hflip(key: jax.Array, x: jax.Array) -> jax.Array:
  """Flips each image of ``x (N, H, W, C)`` left-right with probability ½."""
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
  return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def _check(x, y, config: FinetuneConfig):
  if config.loss not in ("mse", "ce"):
    raise ValueError(f"config.loss must be 'mse' or 'ce', got {config.loss!r}.")
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} samples but y has {len(y)}.")
  if len(x) == 0:
    raise ValueError("x is empty: nothing to fine-tune on.")
  if config.epochs < 0 or config.batch_size < 1:
    raise ValueError("config: epochs must be >= 0 and batch_size >= 1.")
  if config.augment and np.ndim(x) != 4:
    raise ValueError("config.augment flips images (N, H, W, C); got x of shape "
                     f"{np.shape(x)}. Set augment=False for other inputs.")


@functools.lru_cache(maxsize=32)
def _step_fn(apply_fn, loss: str, tx: optax.GradientTransformation,
             augment: bool):

  def step(params, opt_state, key, xb, yb):
    if augment:
      xb = hflip(key, xb)
    value, grads = jax.value_and_grad(
        lambda p: loss_fn(apply_fn(p, xb), yb, loss))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return jax.jit(step)


@functools.lru_cache(maxsize=32)
def _optimizer(learning_rate: float, weight_decay: float):
  if weight_decay:
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  return optax.adam(learning_rate)


def finetune(apply_fn: Callable[[Any, Any], jax.Array], params, x, y, *,
             config: FinetuneConfig = FinetuneConfig(),
             progress: Callable[[int, float], None] | None = None
             ) -> FinetuneResult:
  """Fine-tunes ``params`` (the PEFT pytree) of ``apply_fn`` on ``(x, y)``.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (N, C)``.
    params: initial PEFT parameters ``w_0``.
    x: inputs ``(N, ...)`` as ``apply_fn`` takes them.
    y: integer labels ``(N,)``.
    config: :class:`FinetuneConfig`.
    progress: optional ``progress(epoch, mean_loss)`` called after each epoch.

  Returns:
    :class:`FinetuneResult`.
  """
  _check(x, y, config)
  t0 = time.perf_counter()
  tx = _optimizer(float(config.learning_rate), float(config.weight_decay))
  step = _step_fn(apply_fn, config.loss, tx, bool(config.augment))
  opt_state = tx.init(params)
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  n = x.shape[0]
  rng = np.random.default_rng(config.seed)
  key = jax.random.PRNGKey(config.seed)
  losses = []
  for epoch in range(config.epochs):
    order = rng.permutation(n)
    total = 0.0
    for s in range(0, n, config.batch_size):
      idx = order[s:s + config.batch_size]
      key, sub = jax.random.split(key)
      params, opt_state, value = step(params, opt_state, sub, x[idx], y[idx])
      total += float(value) * len(idx)
    losses.append(total / n)
    if progress is not None:
      progress(epoch, losses[-1])
  jax.block_until_ready(params)
  return FinetuneResult(params, np.asarray(losses), time.perf_counter() - t0)
