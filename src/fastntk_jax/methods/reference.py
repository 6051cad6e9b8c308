"""The reference points of every comparison, and Fast-NTK itself.

* ``full`` — no unlearning: ``w_D``;
* ``retrain`` — the gold standard: the fine-tuning recipe from ``w_0`` on
  ``D_r`` alone;
* ``retrain_other_seed`` — the same with another recipe seed (data order and
  augmentation; ``w_0`` is shared): its distance to ``retrain`` is the noise
  floor of every gap, what two equally valid retrained models differ by;
* ``fast_ntk`` — the one-shot NTK update of :func:`fastntk_jax.unlearn`.
"""

from __future__ import annotations

from fastntk_jax.core.unlearn import unlearn as ntk_unlearn
from fastntk_jax.methods import base
from fastntk_jax.training import train

__all__ = ["METHODS", "fast_ntk", "full", "retrain", "retrain_other_seed"]


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


def retrain_other_seed(problem, *, key, seed_offset):
  """Retrain with the recipe seed shifted by ``seed_offset`` (≠ 0)."""
  recipe = problem.recipe._replace(seed=int(problem.recipe.seed)
                                   + int(seed_offset))
  params, info = retrain(problem._replace(recipe=recipe), key=key)
  return params, dict(info, seed_offset=int(seed_offset))


def fast_ntk(problem, *, key, damping, solver, linearize_at, anchor, loss):
  """Fast-NTK (:func:`fastntk_jax.core.unlearn.unlearn`): ``linearize_at`` —
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


METHODS = {
  "full": base.MethodSpec(full, {}, {}),
  "retrain": base.MethodSpec(retrain, {}, {}),
  "retrain_other_seed": base.MethodSpec(
      retrain_other_seed, {"seed_offset": 1000},
      {"seed_offset": base.int_at_least(1)}),
    "fast_ntk": base.MethodSpec(
        fast_ntk, {"damping": 1.0, "solver": "auto", "linearize_at": "w_D",
                   "anchor": "w_0", "loss": "recipe"},
        {"damping": base.NONNEGATIVE,
         "solver": base.one_of("auto", "dual", "primal", "cg"),
         "linearize_at": base.one_of("w_D", "w_0"),
         "anchor": base.one_of("w_0", "w_D"),
         "loss": base.one_of("recipe", "mse", "ce")}),
}
