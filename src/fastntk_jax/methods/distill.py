"""Teacher–student unlearning: Bad Teacher and SCRUB.

* ``bad_teacher`` (Chundawat et al., AAAI 2023,
  https://arxiv.org/abs/2205.08096): the student (from ``w_D``) matches the
  competent teacher ``w_D`` on ``D_r`` samples and an incompetent teacher on
  ``D_f`` samples, by ``KL(teacher ‖ student)`` at temperature T over mixed
  batches of ``D_f`` and a random ``retain_fraction`` of ``D_r``.
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
  if consts["incompetent"] is None:  # the uniform distribution
    bad = jnp.full_like(competent, 1.0 / competent.shape[-1])
  else:
    bad = jax.nn.softmax(
        jax.lax.stop_gradient(apply_fn(consts["incompetent"], x)) / t, axis=-1)
  teacher = jnp.where(batch["is_forget"][:, None], bad, competent)
  kl = kl_divergence(None, apply_fn(params, x), t, teacher_probs=teacher)
  return jnp.mean(kl), ()


def bad_teacher(problem, *, key, epochs, learning_rate, temperature,
                retain_fraction, incompetent, optimizer, momentum,
                weight_decay):
  """Bad-Teacher distillation; the incompetent teacher is ``w_0`` (the
  backbone with the new, untrained head) or the uniform distribution."""
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
  consts = {"competent": problem.params, "temperature": np.float32(temperature),
            "incompetent": (problem.init_params if incompetent == "init"
                            else None)}
  tx = base.optimizer(optimizer, float(momentum), float(weight_decay))
  step = base.make_step(problem, _bad_teacher_objective, tx)
  bs = base.batch_size(problem, len(y_all))
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
          temperature, optimizer, momentum, weight_decay):
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
          batch=base.batch_size(problem, len(forget["y"])),
          learning_rate=learning_rate, consts=consts)
      max_losses += lm
    params, state, key, ln = base.train_epochs(
        step_min, params, state, key=key, rng=rng, data=retain, epochs=1,
        batch=base.batch_size(problem, len(retain["y"])),
        learning_rate=learning_rate, consts=consts)
    min_losses += ln
  return params, {"max_objective": max_losses, "min_objective": min_losses,
                  "max_passes": int(min(epochs, max_steps))}


_OPT = {"optimizer": base.OPTIMIZER, "momentum": base.MOMENTUM,
        "weight_decay": base.NONNEGATIVE}

METHODS = {
    "bad_teacher": base.MethodSpec(
        bad_teacher,
        {"epochs": 10, "learning_rate": 1e-2, "temperature": 1.0,
         "retain_fraction": 0.3, "incompetent": "init", "optimizer": "adam",
         "momentum": 0.9, "weight_decay": 0.0},
        {"epochs": base.int_at_least(0), "learning_rate": base.POSITIVE,
         "temperature": base.POSITIVE,
         "retain_fraction": base.float_in(0.0, 1.0, lo_open=True),
         "incompetent": base.one_of("init", "uniform"), **_OPT}),
    "scrub": base.MethodSpec(
        scrub,
        {"epochs": 10, "max_steps": 3, "learning_rate": 1e-2, "alpha": 0.001,
         "gamma": 0.99, "temperature": 4.0, "optimizer": "adam",
         "momentum": 0.9, "weight_decay": 5e-4},
        {"epochs": base.int_at_least(0), "max_steps": base.int_at_least(0),
         "learning_rate": base.POSITIVE, "alpha": base.NONNEGATIVE,
         "gamma": base.NONNEGATIVE, "temperature": base.POSITIVE, **_OPT}),
}
