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

Two options make the recipe match what Fast-NTK solves
(:mod:`fastntk_jax.core.newton`): ``proximal=λ`` adds ``(λ/N)/2 ‖w − w_0‖²`` to the
mean loss over the ``N`` training samples, i.e. the objective
``(1/N)[Σ_i ℓ_i + (λ/2)‖w − w_0‖²]`` whose linearisation ``unlearn`` minimises
with ``damping=λ``; ``tangent=True`` trains the tangent model
``f(w_0) + J(w_0)(w − w_0)`` (:func:`fastntk_jax.core.tangent.tangent_model`)
instead of the network, which ``unlearn`` then forgets exactly.

:func:`pretrain` is the other recipe: all parameters of a Flax backbone, with
BatchNorm in training mode (batch statistics, running averages updated),
cross-entropy, random crop + flip, SGD with momentum and a cosine schedule. It
is resumable: its state after each epoch is a pytree the caller checkpoints.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastntk_jax.core.tangent import tangent_model

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "PretrainConfig",
    "PretrainState",
    "flip_and_crop",
    "finetune",
    "finetune_optimizer",
    "hflip",
    "init_pretrain_state",
    "learning_rate_schedule",
    "loss_fn",
    "pretrain",
    "proximal_term",
    "random_crop",
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
    crop_padding: when > 0 (and ``augment``), random crops of the image
      zero-padded by this many pixels on each side (4 is the CIFAR custom).
      The inputs are already normalised here, so the padding is the mean
      colour. 0 (default) keeps the recipe measured in docs/defaults.md.
    schedule: ``"constant"`` (default) or ``"cosine"`` (decay to 0 over all
      steps, after ``warmup_epochs`` of linear warm-up).
    warmup_epochs: linear warm-up length for ``"cosine"``.
    proximal: λ ≥ 0: adds ``(λ/N)/2 ‖w − w_0‖²`` to the mean loss (``N`` the
      number of training samples, ``w_0`` the initial parameters): the ridge
      term of the problem :func:`fastntk_jax.core.unlearn.unlearn` solves with
      ``damping=λ``. 0 (default) disables it. That problem has no
      augmentation and no weight decay (which pulls towards 0, not ``w_0``):
      with ``augment`` or ``weight_decay`` the recipe only approximates it.
    tangent: train the tangent model ``f(w_0, x) + J(w_0, x)(w − w_0)`` (one
      JVP per forward pass) instead of the network;
      :attr:`FinetuneResult.apply_fn` is then that model, which is what must
      be evaluated, deployed and unlearned.
  """
  loss: str = "mse"
  epochs: int = 30
  batch_size: int = 100
  learning_rate: float = 1e-2
  weight_decay: float = 0.0
  augment: bool = True
  seed: int = 0
  crop_padding: int = 0
  schedule: str = "constant"
  warmup_epochs: int = 0
  proximal: float = 0.0
  tangent: bool = False


class FinetuneResult(NamedTuple):
  """Attributes: ``params`` (trained), ``losses`` (mean objective per epoch,
  the proximal term included), ``seconds`` (wall time, compilation
  included), ``apply_fn`` (the model the parameters belong to: the given
  ``apply_fn``, or its tangent model when ``config.tangent``),
  ``epoch_seconds`` (each epoch's training time, without ``progress`` and
  ``until``; one entry per epoch run)."""
  params: Any
  losses: np.ndarray
  seconds: float
  apply_fn: Callable[[Any, Any], jax.Array] | None = None
  epoch_seconds: np.ndarray | None = None


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


def random_crop(key: jax.Array, x: jax.Array, padding: int) -> jax.Array:
  """Crops each image of ``x (N, H, W, C)`` at a random offset from its
  zero-padded copy (``padding`` pixels on each side); output shape = input."""
  if padding <= 0:
    return x
  n, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

  def one(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0),
                                 (h, w, img.shape[-1]))

  return jax.vmap(one)(padded, offsets)


def learning_rate_schedule(learning_rate: float, schedule: str,
                           total_steps: int, warmup_steps: int = 0):
  """An optax schedule: ``"constant"`` or ``"cosine"`` (with linear warm-up)."""
  if schedule == "constant":
    return optax.constant_schedule(learning_rate)
  if schedule == "cosine":
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
    if warmup_steps == 0:
      return optax.cosine_decay_schedule(learning_rate, total_steps)
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, total_steps)
  raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}.")


def flip_and_crop(key, xb, crop_padding: int):
  """Fine-tuning's augmentation: a random horizontal flip and a random crop
  after zero padding by ``crop_padding`` pixels."""
  k1, k2 = jax.random.split(key)
  return hflip(k1, random_crop(k2, xb, crop_padding))


def _check(x, y, config: FinetuneConfig):
  if config.schedule not in ("constant", "cosine"):
    raise ValueError("config.schedule must be 'constant' or 'cosine', got "
                     f"{config.schedule!r}.")
  if config.crop_padding < 0 or config.warmup_epochs < 0:
    raise ValueError("config.crop_padding and config.warmup_epochs must be >= 0.")
  if config.loss not in ("mse", "ce"):
    raise ValueError(f"config.loss must be 'mse' or 'ce', got {config.loss!r}.")
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} samples but y has {len(y)}.")
  if len(x) == 0:
    raise ValueError("x is empty: nothing to fine-tune on.")
  if config.epochs < 0 or config.batch_size < 1:
    raise ValueError("config: epochs must be >= 0 and batch_size >= 1.")
  prox = config.proximal
  if isinstance(prox, bool) or not isinstance(prox, (int, float)) or not (
      math.isfinite(prox) and prox >= 0):
    raise ValueError(f"config.proximal must be a finite number >= 0 (λ of "
                     f"the term (λ/N)/2‖w − w_0‖²), got {prox!r}.")
  if not isinstance(config.tangent, bool):
    raise ValueError(f"config.tangent must be True or False, got "
                     f"{config.tangent!r}.")
  if config.augment and np.ndim(x) != 4:
    raise ValueError("config.augment flips images (N, H, W, C); got x of shape "
                     f"{np.shape(x)}. Set augment=False for other inputs.")


def proximal_term(params, w_0) -> jax.Array:
  """``½‖w − w_0‖²`` over a pytree."""
  return 0.5 * sum(jnp.sum((a - b) ** 2) for a, b in zip(
      jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(w_0)))


@functools.lru_cache(maxsize=32)
def _step_fn(apply_fn, loss: str, tx: optax.GradientTransformation,
             augment: bool, crop_padding: int = 0):

  def step(params, opt_state, key, xb, yb, w_0, prox):
    if augment and crop_padding:
      xb = flip_and_crop(key, xb, crop_padding)
    elif augment:
      xb = hflip(key, xb)

    def objective(p):
      # prox = λ/N: (λ/N)/2 ‖w − w_0‖² beside the batch's mean loss.
      return loss_fn(apply_fn(p, xb), yb, loss) + prox * proximal_term(p, w_0)

    value, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return jax.jit(step)


@functools.lru_cache(maxsize=32)
def finetune_optimizer(learning_rate, weight_decay: float):
  """Fine-tuning's optimiser: Adam, or AdamW when ``weight_decay`` > 0."""
  if weight_decay:
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  return optax.adam(learning_rate)


def finetune(apply_fn: Callable[[Any, Any], jax.Array], params, x, y, *,
             config: FinetuneConfig = FinetuneConfig(),
             progress: Callable[[int, float], None] | None = None,
             until: Callable[[int, Any], bool] | None = None
             ) -> FinetuneResult:
  """Fine-tunes ``params`` (the PEFT pytree) of ``apply_fn`` on ``(x, y)``.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (N, C)``.
    params: initial PEFT parameters ``w_0``.
    x: inputs ``(N, ...)`` as ``apply_fn`` takes them.
    y: integer labels ``(N,)``.
    config: :class:`FinetuneConfig`.
    progress: optional ``progress(epoch, mean_loss)`` called after each epoch.
    until: optional ``until(epoch, params) -> bool`` called after each epoch
      with the parameters so far; True ends training there (e.g. once a
      Retrain reaches a target accuracy). Its time is not in
      ``epoch_seconds``.

  Returns:
    :class:`FinetuneResult`.
  """
  _check(x, y, config)
  t0 = time.perf_counter()
  lr = float(config.learning_rate)
  if config.schedule != "constant":
    steps_per_epoch = -(-len(x) // config.batch_size)
    lr = learning_rate_schedule(lr, config.schedule,
                                config.epochs * steps_per_epoch,
                                config.warmup_epochs * steps_per_epoch)
  tx = finetune_optimizer(lr, float(config.weight_decay))
  if config.tangent:
    apply_fn = tangent_model(apply_fn, params)
  step = _step_fn(apply_fn, config.loss, tx, bool(config.augment),
                  int(config.crop_padding))
  opt_state = tx.init(params)
  w_0 = params
  x = jnp.asarray(x)
  y = jnp.asarray(y, jnp.int32)
  n = x.shape[0]
  prox = jnp.asarray(float(config.proximal) / n, jnp.float32)
  rng = np.random.default_rng(config.seed)
  key = jax.random.PRNGKey(config.seed)
  losses, epoch_seconds = [], []
  for epoch in range(config.epochs):
    t_epoch = time.perf_counter()
    order = rng.permutation(n)
    total = 0.0
    for s in range(0, n, config.batch_size):
      idx = order[s:s + config.batch_size]
      key, sub = jax.random.split(key)
      params, opt_state, value = step(params, opt_state, sub, x[idx], y[idx],
                                      w_0, prox)
      total += float(value) * len(idx)
    losses.append(total / n)
    jax.block_until_ready(params)
    epoch_seconds.append(time.perf_counter() - t_epoch)
    if progress is not None:
      progress(epoch, losses[-1])
    if until is not None and until(epoch, params):
      break
  jax.block_until_ready(params)
  return FinetuneResult(params, np.asarray(losses), time.perf_counter() - t0,
                        apply_fn, np.asarray(epoch_seconds))


class PretrainConfig(NamedTuple):
  """The backbone pre-training recipe (all parameters, BatchNorm in training mode).

  Attributes:
    epochs: passes over the data.
    batch_size: samples per step (the last, short batch of an epoch is dropped
      so every step has full batch statistics).
    learning_rate: peak learning rate.
    optimizer: ``"sgd"`` (momentum 0.9, Nesterov; default for CNNs) or
      ``"adamw"`` (the usual choice for ViTs).
    weight_decay: L2 for SGD (added to the gradient), decoupled for AdamW.
    warmup_epochs: linear warm-up before the cosine decay.
    crop_padding: random-crop padding in pixels (0 disables crops).
    flip: random horizontal flips.
    label_smoothing: for the cross-entropy loss.
    seed: initialisation is the caller's; this seeds data order and
      augmentation. Epoch ``e`` uses ``fold_in(seed, e)``, so a resumed run
      sees the same batches as an uninterrupted one.
  """
  epochs: int = 200
  batch_size: int = 128
  learning_rate: float = 0.1
  optimizer: str = "sgd"
  weight_decay: float = 5e-4
  warmup_epochs: int = 1
  crop_padding: int = 4
  flip: bool = True
  label_smoothing: float = 0.0
  seed: int = 0


class PretrainState(NamedTuple):
  """Everything a resumed :func:`pretrain` needs: ``variables`` (params and
  batch_stats), ``opt_state`` and ``epoch`` (epochs completed)."""
  variables: Any
  opt_state: Any
  epoch: int


def _pretrain_tx(config: PretrainConfig, steps_per_epoch: int):
  lr = learning_rate_schedule(config.learning_rate, "cosine",
                              config.epochs * steps_per_epoch,
                              config.warmup_epochs * steps_per_epoch)
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(lr, momentum=0.9, nesterov=True))
  if config.optimizer == "adamw":
    return optax.adamw(lr, weight_decay=config.weight_decay)
  raise ValueError(f"optimizer must be 'sgd' or 'adamw', got "
                   f"{config.optimizer!r}.")


def _check_pretrain(x, y, config: PretrainConfig):
  if config.optimizer not in ("sgd", "adamw"):
    raise ValueError(f"config.optimizer must be 'sgd' or 'adamw', got "
                     f"{config.optimizer!r}.")
  if config.epochs < 1 or config.batch_size < 2:
    raise ValueError("config: epochs must be >= 1 and batch_size >= 2 "
                     "(BatchNorm needs a batch).")
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} samples but y has {len(y)}.")
  if len(x) < config.batch_size:
    raise ValueError(f"{len(x)} samples is fewer than one batch of "
                     f"{config.batch_size}; lower config.batch_size.")
  if np.ndim(x) != 4:
    raise ValueError(f"x must be images (N, H, W, C), got shape {np.shape(x)}.")


def init_pretrain_state(variables, config: PretrainConfig,
                        num_samples: int) -> PretrainState:
  """The state before epoch 0: ``variables`` and a fresh optimiser state."""
  tx = _pretrain_tx(config, num_samples // config.batch_size)
  return PretrainState(variables, tx.init(variables["params"]), 0)


def _pretrain_step_fn(module, preprocess, config: PretrainConfig, tx,
                      has_stats: bool):
  """The jitted pre-training step (augment, forward in training mode,
  label-smoothed cross-entropy, optimiser update); donates its state."""
  smoothing = float(config.label_smoothing)

  def step(variables, opt_state, key, xb, yb):
    k1, k2 = jax.random.split(key)
    if config.crop_padding:
      xb = random_crop(k1, xb, config.crop_padding)
    if config.flip:
      xb = hflip(k2, xb)
    xb = preprocess(xb)

    def objective(params):
      v = dict(variables, params=params)
      if has_stats:
        logits, new = module.apply(v, xb, train=True, mutable=["batch_stats"])
      else:
        logits, new = module.apply(v, xb, train=True), {}
      labels = optax.smooth_labels(
          jax.nn.one_hot(yb, logits.shape[-1]), smoothing)
      loss = jnp.mean(optax.softmax_cross_entropy(logits, labels))
      return loss, (logits, new)

    (loss, (logits, new)), grads = jax.value_and_grad(
        objective, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    out = dict(variables, params=params)
    if has_stats:
      out["batch_stats"] = new["batch_stats"]
    correct = jnp.sum(jnp.argmax(logits, -1) == yb)
    return out, opt_state, loss, correct

  return jax.jit(step, donate_argnums=(0, 1))


def pretrain(module, variables, x, y, *, preprocess: Callable,
             config: PretrainConfig = PretrainConfig(),
             state: PretrainState | None = None,
             on_epoch: Callable[[PretrainState, dict], None] | None = None
             ) -> PretrainState:
  """Trains every parameter of a Flax ``module`` with cross-entropy.

  Args:
    module: a Flax module called as ``module.apply(variables, x, train=...)``
      (BatchNorm variables in ``batch_stats``, if any).
    variables: its initial variables (ignored when ``state`` is given).
    x: uint8 (or float) images ``(N, H, W, C)``; kept on the host and moved
      a batch at a time.
    y: integer labels ``(N,)``.
    preprocess: maps a batch of ``x`` to the model's input (e.g.
      ``normalize_cifar``); runs inside ``jit`` after augmentation.
    config: :class:`PretrainConfig`.
    state: resume from this :class:`PretrainState` (e.g. a checkpoint).
    on_epoch: ``on_epoch(state, info)`` after every epoch; ``info`` has
      ``epoch``, ``loss``, ``train_accuracy``, ``seconds``. Save checkpoints here.

  Returns:
    The final :class:`PretrainState`.
  """
  _check_pretrain(x, y, config)
  n = len(x)
  steps = n // config.batch_size
  tx = _pretrain_tx(config, steps)
  if state is None:
    state = init_pretrain_state(variables, config, n)
  step = _pretrain_step_fn(module, preprocess, config, tx,
                           "batch_stats" in state.variables)
  base = jax.random.PRNGKey(config.seed)
  # Copies: the step donates its inputs, which must not be the caller's arrays.
  variables = jax.tree_util.tree_map(jnp.array, state.variables)
  opt_state = jax.tree_util.tree_map(jnp.array, state.opt_state)
  for epoch in range(int(state.epoch), config.epochs):
    t0 = time.perf_counter()
    order = np.random.default_rng([config.seed, epoch]).permutation(n)
    key = jax.random.fold_in(base, epoch)
    total, correct = jnp.zeros(()), jnp.zeros((), jnp.int32)
    for s in range(steps):
      idx = np.sort(order[s * config.batch_size:(s + 1) * config.batch_size])
      key, sub = jax.random.split(key)
      variables, opt_state, loss, c = step(
          variables, opt_state, sub, jnp.asarray(x[idx]),
          jnp.asarray(y[idx], jnp.int32))
      total = total + loss
      correct = correct + c
    state = PretrainState(variables, opt_state, epoch + 1)
    if on_epoch is not None:
      on_epoch(state, {"epoch": epoch + 1, "loss": float(total) / steps,
                       "train_accuracy": int(correct) / (steps * config.batch_size),
                       "seconds": time.perf_counter() - t0})
  return state
