"""SFR-on: saliency forgetting in the remain-preserving manifold, online.

Huang et al., "Unified Gradient-Based Machine Unlearning with Remain Geometry
Enhancement", NeurIPS 2024, https://arxiv.org/abs/2409.19732; the loop follows
the released code (github.com/K1nght/Unified-Unlearning-w-Remain-Geometry,
``Classification/unlearn/sfron.py``):

for t = 0 … T−1:

1. if ``t % k == 0``: a forget ASCENT step on a ``D_f`` batch with loss
   ``−α_t · (1/B) Σ_i w_i CE_i``, ``w_i ∝ CE_i^(−λ)`` normalised to sum to B
   (no gradient through ``w``; :func:`adaptive_weights`),
   ``α_t = α·½(1 + cos(π t / T))``; the gradient is masked to the weights
   whose Fisher ratio ``(F_f + ε) / (F_r + ε) ≥ γ`` (:func:`fisher_mask`),
   then clipped to global norm ``clip_norm``. ``F`` is, as released, the mean
   over batches of the squared *batch-mean* cross-entropy gradient
   (:func:`batch_fisher_diagonal`, batches of ``fisher_batch_size``);
   ``fisher="per_sample"`` uses the mean of squared per-sample gradients
   (:func:`fisher_diagonal`) instead;
2. a retain DESCENT step on cross-entropy over a ``D_r`` batch;
3. optionally, every ``s`` steps, the fast–slow weights
   (:func:`slow_update`): ``slow ← slow + β(fast − slow)``; ``fast ← slow``.

Both steps share one optimiser (SGD with momentum and L2 by default) whose
rate follows a cosine decay over the T steps. The mask is also applied to the
forget step's final update, so weight decay and momentum of that step do not
move the weights outside it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastntk_jax.methods import base

__all__ = ["METHODS", "adaptive_weights", "batch_fisher_diagonal",
           "fisher_diagonal", "fisher_mask", "slow_update"]

#: Added to both Fishers in the ratio, as released (keeps ``0/0`` finite).
FISHER_EPS = 1e-15


def adaptive_weights(losses: jax.Array, temperature) -> jax.Array:
  """SFR-on's per-sample forget weights ``w_i ∝ 1 / loss_i^λ``.

  Args:
    losses: per-sample losses ``(B,)``, ≥ 0.
    temperature: λ ≥ 0 (0: uniform weights).

  Returns:
    ``(B,)`` weights summing to B, without gradient: samples still fitted
    (low loss) weigh more; forgotten ones (high loss) less.
  """
  losses = jax.lax.stop_gradient(losses)
  coef = 1.0 / (jnp.power(losses, temperature) + 1e-15)
  return coef / jnp.sum(coef) * losses.shape[0]


@functools.lru_cache(maxsize=32)
def _sq_grads_fn(apply_fn):
  def one(params, x, y):
    return jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        apply_fn(p, x[None]), y[None])[0])(params)

  def block(params, x, y):
    g = jax.vmap(one, in_axes=(None, 0, 0))(params, x, y)
    return jax.tree_util.tree_map(lambda v: jnp.sum(v * v, axis=0), g)

  return jax.jit(block)


def fisher_diagonal(apply_fn, params, x, y, *, block_size: int = 64):
  """Empirical Fisher diagonal: the mean of squared per-sample CE gradients.

  Args:
    apply_fn: the model.
    params: where the gradients are taken (``w_D``).
    x, y: inputs ``(N, ...)`` and labels ``(N,)``.
    block_size: samples per vmapped block.

  Returns:
    A pytree shaped like ``params``: ``(1/N) Σ_i (∇ CE_i)²``.
  """
  total = base.sum_over_blocks(_sq_grads_fn(apply_fn), params, x, y, block_size)
  return jax.tree_util.tree_map(lambda v: v / len(y), total)


def batch_fisher_diagonal(apply_fn, params, x, y, *, batch_size: int = 128,
                          rng: np.random.Generator | None = None):
  """SFR-on's released Fisher: ``(1/B) Σ_b (∇ mean_{i∈b} CE_i)²`` over the
  ``B = ⌈N / batch_size⌉`` batches of one pass (shuffled by ``rng`` when
  given, else in order; the last batch may be short).

  Squaring the batch mean rather than each sample's gradient shrinks the
  value by about the batch size where per-sample gradients disagree; the
  mask compares ``F_f`` with ``F_r``, so this changes which weights pass.

  Args:
    apply_fn: the model.
    params: where the gradients are taken (``w_D``).
    x, y: inputs ``(N, ...)`` and labels ``(N,)``.
    batch_size: samples per batch (the release's 128).
    rng: optional NumPy generator for the batch composition.

  Returns:
    A pytree shaped like ``params``.
  """
  x, y = base.as_float32(x), np.asarray(y, np.int32)
  order = np.arange(len(y)) if rng is None else rng.permutation(len(y))
  fn, total, count = base.ce_grad_fn(apply_fn, "mean"), None, 0
  for s in range(0, len(y), batch_size):
    idx = order[s:s + batch_size]
    g = jax.tree_util.tree_map(jnp.square, fn(params, x[idx], y[idx]))
    total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
    count += 1
  return jax.tree_util.tree_map(lambda v: v / count, total)


def fisher_mask(fisher_forget, fisher_retain, threshold: float,
                eps: float = FISHER_EPS):
  """Boolean pytree: ``(fisher_forget + eps) / (fisher_retain + eps) ≥
  threshold``, as the released code."""
  return jax.tree_util.tree_map(
      lambda f, r: (f + eps) / (r + eps) >= threshold, fisher_forget,
      fisher_retain)


def slow_update(slow, fast, rate):
  """One fast–slow synchronisation: ``slow + rate·(fast − slow)``.

  Returns the new slow weights; the caller restarts the fast weights from
  them. ``rate = 1`` keeps the fast weights exactly (no averaging; the
  formula would round ``s + (f − s)`` away from ``f``).
  """
  if float(rate) == 1.0:
    return fast
  return jax.tree_util.tree_map(lambda s, f: s + rate * (f - s), slow, fast)


def _forget_objective(apply_fn, params, batch, consts, loss):
  del loss
  ce = optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(params, batch["x"]), batch["y"])
  w = adaptive_weights(ce, consts["temperature"])
  return -consts["alpha"] * jnp.mean(w * ce), jnp.mean(ce)


def _cycle(rng, data, batch):
  n = len(data["y"])
  while True:
    order = rng.permutation(n)
    for s in range(0, n, batch):
      idx = order[s:s + batch]
      yield {k: v[idx] for k, v in data.items()}


def _fishers(problem, forget, retain, fisher, fisher_batch_size, rng):
  if fisher == "per_sample":
    return tuple(fisher_diagonal(problem.apply_fn, problem.params, d["x"],
                                 d["y"]) for d in (forget, retain))
  return tuple(batch_fisher_diagonal(problem.apply_fn, problem.params, d["x"],
                                     d["y"], batch_size=fisher_batch_size,
                                     rng=rng) for d in (forget, retain))


def sfr_on(problem, *, key, steps, forget_every, learning_rate, alpha,
           temperature, fisher_threshold, clip_norm, optimizer, momentum,
           weight_decay, schedule, slow_every, slow_rate, fisher,
           fisher_batch_size, batch_size):
  """SFR-on (see the module docstring for the loop)."""
  rng = base.host_rng(key)
  forget = {"x": base.as_float32(problem.forget[0]),
            "y": np.asarray(problem.forget[1], np.int32)}
  retain = {"x": base.as_float32(problem.retain[0]),
            "y": np.asarray(problem.retain[1], np.int32)}
  f_f, f_r = _fishers(problem, forget, retain, fisher, int(fisher_batch_size),
                      rng)
  mask = fisher_mask(f_f, f_r, float(fisher_threshold))
  tx = base.optimizer(optimizer, float(momentum), float(weight_decay))
  step_f = base.make_step(problem, _forget_objective, tx, "ce")
  step_r = base.make_step(problem, base.descend, tx, "ce")
  it_f = _cycle(rng, forget, base.batch_size(problem, len(forget["y"]),
                                             batch_size))
  it_r = _cycle(rng, retain, base.batch_size(problem, len(retain["y"]),
                                             batch_size))
  clip = None if clip_norm is None else np.float32(clip_norm)
  params = slow = problem.params
  state = tx.init(params)
  forget_ce, retain_ce = [], []
  for t in range(steps):
    decay = base.cosine(t, steps)
    lr = np.float32(learning_rate * (decay if schedule == "cosine" else 1.0))
    if t % forget_every == 0:
      key, sub = jax.random.split(key)
      consts = {"alpha": np.float32(alpha * decay),
                "temperature": np.float32(temperature)}
      params, state, _, ce = step_f(params, state, sub, next(it_f), consts, lr,
                                    mask, clip)
      forget_ce.append(ce)
    key, sub = jax.random.split(key)
    params, state, value, _ = step_r(params, state, sub, next(it_r), None, lr,
                                     None, None)
    retain_ce.append(value)
    if slow_every and (t + 1) % slow_every == 0:
      slow = slow_update(slow, params, np.float32(slow_rate))
      params = slow
  size = sum(int(jnp.sum(m)) for m in jax.tree_util.tree_leaves(mask))
  total = sum(int(np.size(m)) for m in jax.tree_util.tree_leaves(mask))
  return params, {"mask_size": size, "mask_fraction": size / total,
                  "forget_steps": len(forget_ce),
                  "forget_ce": [float(v) for v in forget_ce],
                  "retain_ce": [float(v) for v in retain_ce]}


METHODS = {
    "sfr_on": base.MethodSpec(
        sfr_on,
        # The released sfron.py, CIFAR-10 10 % block.
        {"steps": 1500, "forget_every": 5, "learning_rate": 1e-2,
         "alpha": 25.0, "temperature": 0.5, "fisher_threshold": 1.0,
         "clip_norm": 7.0, "optimizer": "sgd", "momentum": 0.9,
         "weight_decay": 5e-4, "schedule": "cosine", "slow_every": None,
         "slow_rate": 0.5, "fisher": "batch_mean", "fisher_batch_size": 128,
         "batch_size": 128},
        {"steps": base.int_at_least(0), "forget_every": base.int_at_least(1),
         "learning_rate": base.POSITIVE, "alpha": base.NONNEGATIVE,
         "temperature": base.NONNEGATIVE, "fisher_threshold": base.NONNEGATIVE,
         "clip_norm": base.optional(base.POSITIVE), "optimizer": base.OPTIMIZER,
         "momentum": base.MOMENTUM, "weight_decay": base.NONNEGATIVE,
         "schedule": base.one_of("cosine", "constant"),
         "slow_every": base.optional(base.int_at_least(1)),
         "slow_rate": base.float_in(0.0, 1.0, lo_open=True),
         "fisher": base.one_of("batch_mean", "per_sample"),
         "fisher_batch_size": base.int_at_least(1),
         "batch_size": base.optional(base.int_at_least(1))}),
}
