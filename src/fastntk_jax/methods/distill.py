"""Teacher–student unlearning: Bad Teacher and SCRUB.

* ``bad_teacher`` (Chundawat et al., AAAI 2023,
  https://arxiv.org/abs/2205.08096): the student (from ``w_D``) matches the
  competent teacher ``w_D`` on ``D_r`` samples and an incompetent teacher (by
  default a randomly initialised network of the same architecture, as the
  released ``unlearn.py``) on ``D_f`` samples, by ``KL(teacher ‖ student)`` at
  temperature T over mixed batches of ``D_f`` and a random
  ``retain_fraction`` of ``D_r``.
* ``scrub`` (Kurmanji et al., NeurIPS 2023, https://arxiv.org/abs/2302.09880):
  the student moves away from the teacher ``w_D`` on ``D_f`` ("max" passes,
  the first ``max_steps`` epochs) and stays close to it and to the labels on
  ``D_r`` ("min" passes): ``α·T²·KL_T + γ·CE``.

KL is per sample and averaged over the batch. SCRUB multiplies it by T² as
its released ``DistillKL`` does; Bad Teacher does not (its released loss has
no T² either).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastntk_jax.core import kernels
from fastntk_jax.methods import base

__all__ = ["METHODS", "kl_divergence"]


def kl_divergence(teacher_logits, student_logits, temperature=1.0,
                  teacher_probs=None):
  """Per-sample ``KL(softmax(t/T) ‖ softmax(s/T))``.

  Args:
    teacher_logits: ``(N, C)`` (ignored when ``teacher_probs`` is given).
    student_logits: ``(N, C)``.
    temperature: T > 0.
    teacher_probs: optional teacher distribution ``(N, C)`` instead of logits.

  Returns:
    ``(N,)`` divergences (nats).
  """
  log_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  if teacher_probs is None:
    log_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    p_t = jnp.exp(log_t)
  else:
    p_t = teacher_probs
    log_t = jnp.log(jnp.where(p_t > 0, p_t, 1.0))  # 0·log 0 = 0
  return jnp.sum(p_t * (log_t - log_s), axis=-1)


def _bad_teacher_objective(apply_fn, params, batch, consts, loss):
  del loss
  x, t = batch["x"], consts["temperature"]
  competent = jax.nn.softmax(
      jax.lax.stop_gradient(apply_fn(consts["competent"], x)) / t, axis=-1)
  if "bad_logits" not in batch:  # the uniform distribution
    bad = jnp.full_like(competent, 1.0 / competent.shape[-1])
  else:
    bad = jax.nn.softmax(batch["bad_logits"] / t, axis=-1)
  teacher = jnp.where(batch["is_forget"][:, None], bad, competent)
  kl = kl_divergence(None, apply_fn(params, x), t, teacher_probs=teacher)
  return jnp.mean(kl), ()


def _incompetent_logits(problem, incompetent, x):
  """The incompetent teacher's logits on ``x`` (None: uniform)."""
  if incompetent == "uniform":
    return None
  if incompetent == "init":
    return np.asarray(kernels.predict(problem.apply_fn, problem.init_params, x))
  if problem.random_init is None:
    raise ValueError(
        "bad_teacher: incompetent='random_init' needs problem.random_init, "
        "the (apply_fn, params) of a randomly initialised network of the same "
        "architecture (the bench builds it with zoo); pass it, or choose "
        "incompetent='init' (w_0) or 'uniform'.")
  fn, params = problem.random_init
  return np.asarray(kernels.predict(fn, params, x))


def bad_teacher(problem, *, key, epochs, learning_rate, temperature,
                retain_fraction, incompetent, optimizer, momentum,
                weight_decay, batch_size):
  """Bad-Teacher distillation; the incompetent teacher is a randomly
  initialised network (``"random_init"``, ``problem.random_init``), ``w_0``
  (the backbone with the new, untrained head) or the uniform distribution.
  Its outputs do not change during training, so they are computed once
  (augmentation aside: the released code feeds both teachers the same
  augmented batch; here the incompetent teacher sees the unaugmented image,
  since it is a fixed random function whose output carries no information
  about the sample either way)."""
  if incompetent == "random_init" and problem.random_init is None:
    _incompetent_logits(problem, incompetent, None)  # raises, before work
  rng = base.host_rng(key)
  x_f = base.as_float32(problem.forget[0])
  x_r = base.as_float32(problem.retain[0])
  n_r = len(x_r)
  k = min(n_r, max(1, int(round(retain_fraction * n_r))))
  pick = np.sort(rng.choice(n_r, size=k, replace=False))
  y_all = np.concatenate([np.asarray(problem.forget[1], np.int32),
                          np.asarray(problem.retain[1], np.int32)[pick]])
  data = {"x": np.concatenate([x_f, x_r[pick]]), "y": y_all,
          "is_forget": np.arange(len(y_all)) < len(x_f)}
  bad = _incompetent_logits(problem, incompetent, data["x"])
  if bad is not None:
    data["bad_logits"] = bad.astype(np.float32)
  consts = {"competent": problem.params, "temperature": np.float32(temperature)}
  tx = base.optimizer(optimizer, float(momentum), float(weight_decay))
  step = base.make_step(problem, _bad_teacher_objective, tx)
  bs = base.batch_size(problem, len(y_all), batch_size)
  params, _, _, losses = base.train_epochs(
      step, problem.params, tx.init(problem.params), key=key, rng=rng,
      data=data, epochs=epochs, batch=bs, learning_rate=learning_rate,
      consts=consts)
  return params, {"retain_used": int(k), "steps": epochs * -(-len(y_all) // bs),
                  "objective": losses}


def _scrub_max(apply_fn, params, batch, consts, loss):
  del loss
  t = consts["temperature"]
  teacher = jax.lax.stop_gradient(apply_fn(consts["teacher"], batch["x"]))
  kl = kl_divergence(teacher, apply_fn(params, batch["x"]), t)
  return -jnp.mean(kl) * t * t, ()


def _scrub_min(apply_fn, params, batch, consts, loss):
  del loss
  t = consts["temperature"]
  teacher = jax.lax.stop_gradient(apply_fn(consts["teacher"], batch["x"]))
  logits = apply_fn(params, batch["x"])
  kl = jnp.mean(kl_divergence(teacher, logits, t)) * t * t
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["y"]))
  return consts["alpha"] * kl + consts["gamma"] * ce, ()


def scrub(problem, *, key, epochs, max_steps, learning_rate, alpha, gamma,
          temperature, optimizer, momentum, weight_decay, forget_batch_size,
          retain_batch_size):
  """SCRUB: per epoch, a max pass over ``D_f`` (while ``epoch < max_steps``),
  then a min pass over ``D_r``; one optimiser state for both."""
  rng = base.host_rng(key)
  forget = {"x": base.as_float32(problem.forget[0]),
            "y": np.asarray(problem.forget[1], np.int32)}
  retain = {"x": base.as_float32(problem.retain[0]),
            "y": np.asarray(problem.retain[1], np.int32)}
  consts = {"teacher": problem.params, "temperature": np.float32(temperature),
            "alpha": np.float32(alpha), "gamma": np.float32(gamma)}
  tx = base.optimizer(optimizer, float(momentum), float(weight_decay))
  step_max = base.make_step(problem, _scrub_max, tx)
  step_min = base.make_step(problem, _scrub_min, tx)
  params, state = problem.params, tx.init(problem.params)
  max_losses, min_losses = [], []
  for epoch in range(epochs):
    if epoch < max_steps:
      params, state, key, lm = base.train_epochs(
          step_max, params, state, key=key, rng=rng, data=forget, epochs=1,
          batch=base.batch_size(problem, len(forget["y"]), forget_batch_size),
          learning_rate=learning_rate, consts=consts)
      max_losses += lm
    params, state, key, ln = base.train_epochs(
        step_min, params, state, key=key, rng=rng, data=retain, epochs=1,
        batch=base.batch_size(problem, len(retain["y"]), retain_batch_size),
        learning_rate=learning_rate, consts=consts)
    min_losses += ln
  return params, {"max_objective": max_losses, "min_objective": min_losses,
                  "max_passes": int(min(epochs, max_steps))}


_OPT = {"optimizer": base.OPTIMIZER, "momentum": base.MOMENTUM,
        "weight_decay": base.NONNEGATIVE}
_BATCH = base.optional(base.int_at_least(1))

METHODS = {
    # bad-teaching-unlearning's notebook: Adam 1e-4, 1 epoch, batch 256,
    # T = 1, 30 % of D_r, a randomly initialised incompetent teacher.
    "bad_teacher": base.MethodSpec(
        bad_teacher,
        {"epochs": 1, "learning_rate": 1e-4, "temperature": 1.0,
         "retain_fraction": 0.3, "incompetent": "random_init",
         "optimizer": "adam", "momentum": 0.9, "weight_decay": 0.0,
         "batch_size": 256},
        {"epochs": base.int_at_least(0), "learning_rate": base.POSITIVE,
         "temperature": base.POSITIVE,
         "retain_fraction": base.float_in(0.0, 1.0, lo_open=True),
         "incompetent": base.one_of("random_init", "init", "uniform"),
         "batch_size": _BATCH, **_OPT}),
    # SCRUB's large_scale_unlearning.ipynb (CIFAR-10): SGD 0.9 / 5e-4, lr
    # 5e-4 (constant over 3 epochs), msteps 2, kd_T 4, alpha 0.001, gamma
    # 0.99, beta 0, forget batches of 512 and retain batches of 256.
    "scrub": base.MethodSpec(
        scrub,
        {"epochs": 3, "max_steps": 2, "learning_rate": 5e-4, "alpha": 0.001,
         "gamma": 0.99, "temperature": 4.0, "optimizer": "sgd",
         "momentum": 0.9, "weight_decay": 5e-4, "forget_batch_size": 512,
         "retain_batch_size": 256},
        {"epochs": base.int_at_least(0), "max_steps": base.int_at_least(0),
         "learning_rate": base.POSITIVE, "alpha": base.NONNEGATIVE,
         "gamma": base.NONNEGATIVE, "temperature": base.POSITIVE,
         "forget_batch_size": _BATCH, "retain_batch_size": _BATCH, **_OPT}),
}
