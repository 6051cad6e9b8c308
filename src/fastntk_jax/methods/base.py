"""The frame every unlearning method shares: problem, result, spec, helpers.

A method is a function ``fn(problem, *, key, **hyperparameters) -> (params,
info)`` described by a :class:`MethodSpec`;
:func:`fastntk_jax.methods.registry.run_method` validates the name and the
hyperparameters before any work, runs it under
:func:`fastntk_jax.evaluation.timing.measure` and returns a
:class:`MethodResult`. The gradient methods share one jitted step
(:func:`step_fn`, cached per ``apply_fn`` so several seeds or learning rates
compile once), one optimiser factory (:func:`optimizer`, whose last
transformation scales by the learning rate and zeroes updates outside a mask)
and one host-side batch loop (:func:`train_epochs`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastntk_jax.training import train

__all__ = [
  "METHOD_NAMES", "MOMENTUM", "MethodResult", "MethodSpec", "NONNEGATIVE",
  "OPTIMIZER", "POSITIVE", "UnlearningProblem", "as_float32", "ascend",
  "batch_size", "boolean", "ce_grad_fn", "check_problem", "cosine",
  "descend", "float_in", "host_rng",
  "int_at_least", "make_step", "mask_from_flat", "one_of", "optimizer",
  "optional", "recipe_optimizer", "step_fn", "sum_over_blocks",
  "train_epochs",
]

METHOD_NAMES = ("full", "retrain", "retrain_other_seed",
                "fast_ntk", "max_loss", "random_label", "ft",
                "ga", "salun", "bad_teacher", "scrub", "sfr_on")


class UnlearningProblem(NamedTuple):
  """One unlearning request.

  Attributes:
    apply_fn: ``apply_fn(params, x) -> logits (N, C)``.
    init_params: ``w_0``, the PEFT parameters before fine-tuning (pretrained
      backbone + new head).
    params: ``w_D``, after fine-tuning on ``D = D_r ∪ D_f`` with ``recipe``.
    retain: ``(x_r, y_r)``: normalised float inputs ``(N_r, H, W, 3)`` and
      integer labels ``(N_r,)``.
    forget: ``(x_f, y_f)``, the same for ``D_f``.
    recipe: the :class:`~fastntk_jax.training.train.FinetuneConfig` that produced
      ``w_D`` (loss, optimiser, batch size, augmentation).
    num_classes: C.
    random_init: optional ``(apply_fn, params)`` of a randomly initialised
      network of the same architecture and head (Bad Teacher's incompetent
      teacher, as its released code builds one); the bench supplies it.
  """
  apply_fn: Callable
  init_params: Any
  params: Any
  retain: tuple
  forget: tuple
  recipe: train.FinetuneConfig
  num_classes: int
  random_init: tuple | None = None


class MethodResult(NamedTuple):
  """``params`` (unlearned; tree and dtypes of ``problem.params``), ``seconds``
  (wall time, preparation and compilation included), ``compile_seconds`` (its
  tracing/compiling part), ``info`` (JSON-ready diagnostics)."""
  params: Any
  seconds: float
  compile_seconds: float
  info: dict


class MethodSpec(NamedTuple):
  """A registered method: its function, default hyperparameters and one
  validator ``check(name, value)`` per hyperparameter."""
  fn: Callable
  defaults: dict
  checks: dict


# ---- hyperparameter validators ---------------------------------------------

def int_at_least(lo: int) -> Callable[[str, Any], None]:
  def check(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
      raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}.")
  return check


def float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str, Any], None]:
  def check(name, v):
    ok = (not isinstance(v, bool) and isinstance(v, (int, float, np.number))
          and math.isfinite(float(v)))
    if ok:
      v = float(v)
      ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
      lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
      raise ValueError(f"{name} must be a number in {lb}{lo}, {hi}{rb}, got "
                       f"{v!r}.")
  return check


def one_of(*options) -> Callable[[str, Any], None]:
  def check(name, v):
    if not isinstance(v, str) or v not in options:
      raise ValueError(f"{name} must be one of {options}, got {v!r}.")
  return check


def optional(inner: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
  def check(name, v):
    if v is None:
      return
    try:
      inner(name, v)
    except ValueError as e:
      raise ValueError(f"{e} None (off) is also accepted.") from None
  return check


def boolean(name, v) -> None:
  if not isinstance(v, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {v!r}.")


POSITIVE = float_in(0.0, lo_open=True)
NONNEGATIVE = float_in(0.0)
MOMENTUM = float_in(0.0, 1.0, hi_open=True)
OPTIMIZER = one_of("sgd", "adam")


# ---- optimiser ---------------------------------------------------------------

def _scale_and_mask() -> optax.GradientTransformationExtraArgs:
  """The last link of every chain: ``u ← −learning_rate · u``, then zero
  outside ``mask`` (a boolean pytree, or None for no mask).

  Masking the *final* updates keeps weights outside the mask bit-identical
  even though weight decay and momentum (or Adam's moments) would move them;
  masking only the gradients would not. The learning rate is an argument, not
  a constant, so schedules and learning-rate sweeps reuse one compilation.
  """
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, learning_rate, mask=None,
                **extra_args):
    del params, extra_args
    updates = jax.tree_util.tree_map(lambda u: -learning_rate * u, updates)
    if mask is not None:
      updates = jax.tree_util.tree_map(
          lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, mask)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@functools.lru_cache(maxsize=None)
def optimizer(name: str, momentum: float = 0.9,
              weight_decay: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """``"adam"``: AdamW as in the fine-tuning recipe (decoupled decay;
  ``train.finetune_optimizer``'s update for a constant rate); ``"sgd"``: PyTorch's SGD
  (L2 decay added to the gradient, heavy-ball momentum), as the baselines'
  released code uses. Cached, so equal settings give the same object and the
  jitted step is reused. ``tx.update(g, s, p, learning_rate=..., mask=...)``.
  """
  if name == "adam":
    parts = [optax.scale_by_adam()]
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay))
  elif name == "sgd":
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if momentum:
      parts.append(optax.trace(decay=momentum))
  else:
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}.")
  return optax.chain(*parts, _scale_and_mask())


def recipe_optimizer(recipe: train.FinetuneConfig):
  """The recipe's optimiser (Adam, or AdamW when it has weight decay)."""
  return optimizer("adam", 0.0, float(recipe.weight_decay))


# ---- the jitted step ---------------------------------------------------------

def _clip(grads, max_norm):
  norm = optax.tree.norm(grads)
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), grads)


@functools.lru_cache(maxsize=128)
def step_fn(apply_fn, objective, loss: str, tx, augment: bool,
            crop_padding: int = 0):
  """A jitted optimiser step on ``objective``.

  Args:
    apply_fn: the model.
    objective: ``objective(apply_fn, params, batch, consts, loss) -> (value,
      aux)``, the scalar to MINIMISE (a module-level function, so the cache
      key is stable).
    loss: ``"mse"`` or ``"ce"``, passed to ``objective``.
    tx: from :func:`optimizer`.
    augment, crop_padding: the recipe's augmentation of ``batch["x"]``
      (applied before the objective, so teachers see the same images).

  Returns:
    ``step(params, opt_state, key, batch, consts, learning_rate, mask,
    clip_norm) -> (params, opt_state, value, aux)``. ``mask`` (boolean pytree
    or None) zeroes the gradient and the final update outside it;
    ``clip_norm`` (None: off) clips the global gradient norm after masking.
  """

  def step(params, opt_state, key, batch, consts, learning_rate, mask,
           clip_norm):
    if augment:
      x = batch["x"]
      x = (train.flip_and_crop(key, x, crop_padding) if crop_padding
           else train.hflip(key, x))
      batch = dict(batch, x=x)
    (value, aux), grads = jax.value_and_grad(
        lambda p: objective(apply_fn, p, batch, consts, loss),
        has_aux=True)(params)
    if mask is not None:  # the gradient too, so no optimiser state sees it
      grads = jax.tree_util.tree_map(
          lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, mask)
    if clip_norm is not None:
      grads = _clip(grads, clip_norm)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   learning_rate=learning_rate, mask=mask)
    return optax.apply_updates(params, updates), opt_state, value, aux

  return jax.jit(step)


@functools.lru_cache(maxsize=64)
def ce_grad_fn(apply_fn, reduction: str):
  """Jitted ``grad(params, x, y)`` of the cross-entropy over a batch,
  ``reduction`` ``"sum"`` or ``"mean"`` over its samples (cached per
  ``apply_fn``)."""
  reduce = {"sum": jnp.sum, "mean": jnp.mean}[reduction]

  def grad(params, x, y):
    return jax.grad(lambda p: reduce(
        optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y)))(
            params)
  return jax.jit(grad)


def make_step(problem: UnlearningProblem, objective, tx, loss: str | None = None):
  """:func:`step_fn` with the recipe's augmentation and (default) loss."""
  r = problem.recipe
  return step_fn(problem.apply_fn, objective, loss or r.loss, tx,
                 bool(r.augment), int(r.crop_padding) * bool(r.augment))


def descend(apply_fn, params, batch, consts, loss):
  """The mean ``loss`` on ``batch`` (to minimise)."""
  del consts
  return train.loss_fn(apply_fn(params, batch["x"]), batch["y"], loss), ()


def ascend(apply_fn, params, batch, consts, loss):
  """Minus the mean ``loss`` on ``batch``: gradient ascent."""
  value, aux = descend(apply_fn, params, batch, consts, loss)
  return -value, aux


# ---- data ----------------------------------------------------------------

def host_rng(key) -> np.random.Generator:
  """A NumPy generator seeded from a JAX key (data order, relabelling)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.random.default_rng([int(v) for v in np.asarray(key).ravel()])


def batch_size(problem: UnlearningProblem, n: int,
               override: int | None = None) -> int:
  """``override`` (a method's own batch size) or the recipe's, capped by the
  set size ``n``."""
  b = problem.recipe.batch_size if override is None else override
  return int(max(1, min(int(b), n)))


def cosine(t: int, total: int) -> float:
  """``½(1 + cos(π t / total))``: PyTorch's ``CosineAnnealingLR`` factor
  (to 0) at step or epoch ``t`` of ``total``."""
  return 0.5 * (1.0 + math.cos(math.pi * t / max(total, 1)))


def as_float32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def train_epochs(step, params, opt_state, *, key, rng, data, epochs: int,
                 batch: int, learning_rate: float, consts=None, mask=None,
                 clip_norm=None):
  """Epochs of shuffled mini-batches (the last, short batch is used).

  Args:
    step: from :func:`step_fn`.
    params, opt_state: the starting point.
    key: JAX key; split once per step for augmentation.
    rng: NumPy generator for the data order.
    data: dict of per-sample NumPy arrays (``"x"``, ``"y"``, …) or a callable
      ``data(epoch) -> dict`` (e.g. labels resampled every epoch).
    epochs, batch, learning_rate: loop settings.
    consts, mask, clip_norm: passed to ``step``.

  Returns:
    ``(params, opt_state, key, losses)``, losses = mean objective per epoch.
  """
  lr = np.float32(learning_rate)
  clip = None if clip_norm is None else np.float32(clip_norm)
  losses = []
  for epoch in range(epochs):
    d = data(epoch) if callable(data) else data
    n = len(d["y"])
    order = rng.permutation(n)
    total = jnp.zeros((), jnp.float32)
    for s in range(0, n, batch):
      idx = order[s:s + batch]
      key, sub = jax.random.split(key)
      params, opt_state, value, _ = step(
          params, opt_state, sub, {k: v[idx] for k, v in d.items()}, consts,
          lr, mask, clip)
      total = total + value * len(idx)
    losses.append(float(total) / n)
  return params, opt_state, key, losses


def mask_from_flat(tree, flat: np.ndarray):
  """A boolean pytree shaped like ``tree`` from a flat boolean vector (in
  ``jax.flatten_util.ravel_pytree`` order)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  out, start = [], 0
  for leaf in leaves:
    size = int(np.size(leaf))
    out.append(jnp.asarray(flat[start:start + size].reshape(np.shape(leaf))))
    start += size
  return jax.tree_util.tree_unflatten(treedef, out)


def sum_over_blocks(fn, params, x, y, block_size: int):
  """``Σ_blocks fn(params, x_b, y_b)`` for a pytree-valued ``fn``, with
  ``x`` cast to float32 and ``y`` to int32 (bounded memory per call)."""
  x, y = as_float32(x), np.asarray(y, np.int32)
  total = None
  for s in range(0, len(y), block_size):
    g = fn(params, x[s:s + block_size], y[s:s + block_size])
    total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
  return total


def _check_pair(name: str, data, num_classes: int) -> None:
  if not isinstance(data, (tuple, list)) or len(data) != 2:
    raise TypeError(f"problem.{name} must be a pair (x, y), got "
                    f"{type(data).__name__}.")
  x, y = data
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"problem.{name}: y must be a 1-D integer label array, "
                     f"got shape {y.shape} dtype {y.dtype}.")
  if np.shape(x)[:1] != y.shape:
    raise ValueError(f"problem.{name}: x has {np.shape(x)[:1]} samples but y "
                     f"has {y.shape[0]}; they must match.")
  if y.size == 0:
    raise ValueError(f"problem.{name} is empty; every method needs at least "
                     "one sample in D_r and in D_f.")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"problem.{name}: labels must lie in [0, num_classes="
                     f"{num_classes}), got [{y.min()}, {y.max()}].")


def check_problem(problem) -> None:
  """Cheap structural checks of an :class:`UnlearningProblem` (no model
  evaluation)."""
  if not isinstance(problem, UnlearningProblem):
    raise TypeError("problem must be an UnlearningProblem, got "
                    f"{type(problem).__name__}.")
  if not callable(problem.apply_fn):
    raise TypeError("problem.apply_fn must be callable as apply_fn(params, x).")
  if not isinstance(problem.recipe, train.FinetuneConfig):
    raise TypeError("problem.recipe must be a train.FinetuneConfig, got "
                    f"{type(problem.recipe).__name__}.")
  c = problem.num_classes
  if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 2:
    raise ValueError(f"problem.num_classes must be an integer >= 2, got {c!r}.")
  _check_pair("retain", problem.retain, c)
  _check_pair("forget", problem.forget, c)
  ri = problem.random_init
  if ri is not None and (not isinstance(ri, (tuple, list)) or len(ri) != 2
                         or not callable(ri[0])):
    raise TypeError("problem.random_init must be None or a pair (apply_fn, "
                    "params) of a randomly initialised network.")
  tree = jax.tree_util.tree_structure
  if tree(problem.params) != tree(problem.init_params):
    raise ValueError("problem.init_params must have the tree structure of "
                     "problem.params (w_0 and w_D of the same pytree).")
