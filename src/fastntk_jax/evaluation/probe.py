"""Linear-probe risk analysis: is D_f still linearly readable from features?

Table III of the Fast-NTK paper (Li et al. 2023,
https://arxiv.org/abs/2312.14923) asks whether forgetting only the PEFT
parameters leaves D_f recoverable from the frozen backbone: a fresh linear
head is trained on the features of all training data D and its accuracy on
D_r and D_f is reported. If the backbone's features alone classify D_f as
well as D_r, an attacker with the backbone can rebuild what the unlearning
removed from the head.

This module is the head's training on plain arrays; computing the features
(which needs the Flax model) is the caller's business.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["ProbeResult", "linear_probe"]


class ProbeResult(NamedTuple):
  """Result of :func:`linear_probe`.

  Attributes:
    acc_retain: accuracy of the probe on D_r (NaN when D_r is empty).
    acc_forget: accuracy on D_f (NaN when D_f is empty).
    train_accuracy: accuracy on the training features.
    epochs: epochs trained.
    seconds: wall time, compilation included.
  """
  acc_retain: float
  acc_forget: float
  train_accuracy: float
  epochs: int
  seconds: float


@functools.lru_cache(maxsize=16)
def _train_fn(num_classes: int, epochs: int, batch: int, learning_rate: float,
              weight_decay: float):
  """Jitted training of a softmax-regression head (shapes trace on call)."""
  # Decoupled weight decay on the weights only: shrinking the biases would
  # only bias the probe towards uniform class priors.
  tx = optax.adamw(learning_rate, weight_decay=weight_decay,
                   mask={"w": True, "b": False})

  def loss(head, xb, yb):
    logits = xb @ head["w"] + head["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

  def step(carry, xb, yb):
    head, state = carry
    grads = jax.grad(loss)(head, xb, yb)
    updates, state = tx.update(grads, state, head)
    return optax.apply_updates(head, updates), state

  def run(x, y, seed):
    n, f = x.shape
    full, rest = divmod(n, batch)
    head = {"w": jnp.zeros((f, num_classes), x.dtype),
            "b": jnp.zeros((num_classes,), x.dtype)}

    def epoch(e, carry):
      order = jax.random.permutation(
          jax.random.fold_in(jax.random.PRNGKey(seed), e), n)

      def body(c, idx):
        return step(c, x[idx], y[idx]), None

      carry, _ = jax.lax.scan(body, carry,
                              order[:full * batch].reshape(full, batch))
      if rest:  # the short last batch, so every sample is seen every epoch
        idx = order[full * batch:]
        carry = step(carry, x[idx], y[idx])
      return carry

    head, _ = jax.lax.fori_loop(0, epochs, epoch, (head, tx.init(head)))
    return head

  return jax.jit(run)


def _features(name: str, x, y, dim: int | None, num_classes: int,
              allow_empty: bool):
  x = np.asarray(x)
  y = np.asarray(y)
  if x.ndim != 2:
    raise ValueError(f"features_{name} must have shape (N, F); got {x.shape}. "
                     "Flatten the features first.")
  if dim is not None and x.shape[1] != dim:
    raise ValueError(f"features_{name} has {x.shape[1]} features but "
                     f"features_train has {dim}; use the same backbone layer.")
  if y.shape != x.shape[:1]:
    raise ValueError(f"y_{name} must have shape ({x.shape[0]},) to match "
                     f"features_{name}; got {y.shape}.")
  if not allow_empty and x.shape[0] == 0:
    raise ValueError(f"features_{name} is empty: the probe needs samples.")
  if y.size and not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"y_{name} must hold integer labels; got dtype {y.dtype}.")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"y_{name} must lie in [0, num_classes={num_classes}); "
                     f"got range [{y.min()}, {y.max()}].")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"features_{name} contain NaN or inf.")
  return x.astype(np.float32), y.astype(np.int32)


def linear_probe(features_train, y_train, features_retain, y_retain,
                 features_forget, y_forget, *, num_classes: int,
                 epochs: int = 100, learning_rate: float = 1e-2,
                 weight_decay: float = 1e-4, batch_size: int = 256,
                 seed: int = 0) -> ProbeResult:
  """Trains a linear softmax head on frozen features; accuracy on D_r and D_f.

  Features are standardised with the training set's mean and standard
  deviation (constant features are left centred, not divided by zero); the
  head ``logits = x W + b`` starts at zero and is trained with cross-entropy
  and AdamW (decoupled weight decay on ``W``) for ``epochs`` passes over
  shuffled batches of ``min(batch_size, N)`` (a short last batch is used),
  all inside one jitted ``fori_loop``.

  Args:
    features_train: ``(N, F)`` features of all training data D.
    y_train: ``(N,)`` integer labels.
    features_retain: ``(N_r, F)`` features of D_r.
    y_retain: ``(N_r,)`` labels of D_r.
    features_forget: ``(N_f, F)`` features of D_f.
    y_forget: ``(N_f,)`` labels of D_f.
    num_classes: the number of classes ``K`` of the head.
    epochs: passes over the training features.
    learning_rate: Adam's step size.
    weight_decay: AdamW's decoupled decay of ``W``.
    batch_size: samples per step.
    seed: the data order.

  Returns:
    :class:`ProbeResult`.
  """
  if isinstance(num_classes, bool) or int(num_classes) != num_classes or (
      num_classes < 2):
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}.")
  num_classes = int(num_classes)
  if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1:
    raise ValueError(f"epochs must be an integer >= 1, got {epochs}.")
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if not (learning_rate > 0 and weight_decay >= 0):
    raise ValueError("learning_rate must be > 0 and weight_decay >= 0; got "
                     f"{learning_rate} and {weight_decay}.")
  x_tr, y_tr = _features("train", features_train, y_train, None, num_classes,
                         allow_empty=False)
  dim = x_tr.shape[1]
  x_r, y_r = _features("retain", features_retain, y_retain, dim, num_classes,
                       allow_empty=True)
  x_f, y_f = _features("forget", features_forget, y_forget, dim, num_classes,
                       allow_empty=True)

  t0 = time.perf_counter()
  mean = x_tr.mean(axis=0)
  std = x_tr.std(axis=0)
  std = np.where(std > 0, std, 1.0).astype(np.float32)
  standard = lambda a: (a - mean) / std  # noqa: E731

  batch = int(min(int(batch_size), len(x_tr)))
  fn = _train_fn(num_classes, int(epochs), batch, float(learning_rate),
                 float(weight_decay))
  head = fn(jnp.asarray(standard(x_tr)), jnp.asarray(y_tr), jnp.int32(seed))
  w, b = np.asarray(head["w"]), np.asarray(head["b"])

  def acc(x, y):
    if len(y) == 0:
      return float("nan")
    return float(np.mean(np.argmax(standard(x) @ w + b, axis=-1) == y))

  return ProbeResult(acc(x_r, y_r), acc(x_f, y_f), acc(x_tr, y_tr),
                     int(epochs), time.perf_counter() - t0)
