"""The registry of unlearning methods: one signature for all of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax.evaluation import timing
from fastntk_jax.methods import distill
from fastntk_jax.methods import gradient
from fastntk_jax.methods import reference
from fastntk_jax.methods import sfr_on
from fastntk_jax.methods.base import METHOD_NAMES
from fastntk_jax.methods.base import MethodResult
from fastntk_jax.methods.base import MethodSpec
from fastntk_jax.methods.base import UnlearningProblem
from fastntk_jax.methods.base import check_problem

__all__ = ["REGISTRY", "RELEASED_CODE", "defaults", "released_code",
           "run_method"]

_MERGED = {**reference.METHODS, **gradient.METHODS, **distill.METHODS,
           **sfr_on.METHODS}
#: ``name -> MethodSpec``, in :data:`METHOD_NAMES` order.
REGISTRY: dict[str, MethodSpec] = {name: _MERGED[name] for name in METHOD_NAMES}


_SFR = "K1nght/Unified-Unlearning-w-Remain-Geometry, Classification/unlearn/"
#: ``name -> the released code a row follows`` (docs/methods.md lists what
#: still differs, and why); rows without released code are absent.
RELEASED_CODE: dict[str, str] = {
    "random_label": _SFR + "random_label.py",
    "ga": _SFR + "gradient_ascent.py",
    "sfr_on": _SFR + "sfron.py",
    "salun": ("OPTML-Group/Unlearn-Saliency, Classification/generate_mask.py "
              "and unlearn/RL.py"),
    "bad_teacher": "vikram2000b/bad-teaching-unlearning, unlearn.py",
    "scrub": "meghdadk/SCRUB, large_scale_unlearning.ipynb",
}


def released_code(name: str) -> str | None:
  """The released code method ``name`` follows, or None (no released code:
  the references, Fast-NTK itself, Max Loss and FT)."""
  _spec(name)
  return RELEASED_CODE.get(name)


def _spec(name) -> MethodSpec:
  if not isinstance(name, str) or name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; choose one of {METHOD_NAMES}.")
  return REGISTRY[name]


def defaults(name: str) -> dict:
  """The hyperparameters of method ``name`` and their defaults (a copy)."""
  return dict(_spec(name).defaults)


def run_method(name: str, problem: UnlearningProblem, *, seed: int = 0,
               **hyperparameters) -> MethodResult:
  """Runs unlearning method ``name`` on ``problem``.

  Args:
    name: one of :data:`METHOD_NAMES`.
    problem: :class:`UnlearningProblem`.
    seed: data order, augmentation and random labels (``retrain`` uses the
      recipe's seed instead, to match how ``w_D`` was trained).
    **hyperparameters: overrides of :func:`defaults` ``(name)``.

  Returns:
    :class:`MethodResult`; ``info`` also records ``method``, ``seed`` and the
    ``hyperparameters`` used.

  Raises:
    ValueError, TypeError: unknown method or hyperparameter, bad value or
      malformed problem, before any work.
  """
  spec = _spec(name)
  unknown = sorted(set(hyperparameters) - set(spec.defaults))
  if unknown:
    raise ValueError(f"unknown hyperparameter {unknown[0]!r} for method "
                     f"{name!r}; valid ones: {sorted(spec.defaults)}.")
  hp = {**spec.defaults, **hyperparameters}
  for k, v in hp.items():
    spec.checks[k](k, v)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {seed!r}.")
  check_problem(problem)
  key = jax.random.PRNGKey(int(seed))
  with timing.measure() as m:
    params, info = spec.fn(problem, key=key, **hp)
    params = jax.tree_util.tree_map(
        lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)),
        params, problem.params)
    jax.block_until_ready(params)
  info = dict(info, method=name, seed=int(seed), hyperparameters=dict(hp))
  return MethodResult(params, m.seconds, m.compile_seconds, info)
