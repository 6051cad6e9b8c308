"""``unlearn``: Fast-NTK's one-shot forgetting update on PEFT parameters.

Two points define the linearised problem (:mod:`fastntk_jax.core.newton`):

* the **anchor** ``w_0`` (``anchor=``): the centre of the ridge term
  ``(λ/2)‖w − w_0‖²``, i.e. the PEFT parameters fine-tuning started from;
* the **linearisation point** (``linearize_at="w_D"``, the trained
  ``params``, or ``"w_0"``, the anchor): where ``J`` and ``f`` are taken.

``loss="mse"`` applies Eq. (1) of Fast-NTK (:mod:`fastntk_jax.core.update`)
with the linear model's residual at the anchor; ``loss="ce"`` solves the
linearised cross-entropy problem on ``D`` and on ``D_r`` by Newton's method
and applies the difference of the two solutions. Both are
``w_r = w_D + (x_{D_r} − x_D)`` with ``x_S`` the minimiser of
``Σ_{i∈S} ℓ_i + (λ/2)‖x‖²`` over the linearised model; for squared error
that is exactly Eq. (1).

The solver is an object with its own options
(:mod:`fastntk_jax.core.solvers`): :class:`~fastntk_jax.KernelSpace`,
:class:`~fastntk_jax.ParameterSpace`, :class:`~fastntk_jax.MatrixFree`, or
:class:`~fastntk_jax.Auto` (the default), whose choice the result keeps.
The keywords of version 0.1 (``rcond``, ``implementation``, ``solve_dtype``,
``cg_tol``, ``cg_max_steps``, ``newton_tol``, ``newton_max_steps``) still
work with a :class:`DeprecationWarning`; docs/migration.md maps each to its
solver option.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax.core import blocking
from fastntk_jax.core import kernels
from fastntk_jax.core import solvers
from fastntk_jax.core import validate
from fastntk_jax.core.solvers import DEFAULT_MEMORY_BUDGET
from fastntk_jax.core.solvers import RESIDUAL_FNS
from fastntk_jax.core.solvers import UnlearningError
from fastntk_jax.core.solvers import choose_solver

__all__ = [
  "DEFAULT_DAMPING",
  "DEFAULT_MEMORY_BUDGET",
  "LEGACY_SOLVER_OPTIONS",
  "RESIDUAL_FNS",
  "UnlearnResult",
  "UnlearningError",
  "choose_solver",
  "prepare_problem",
  "unlearn",
]

#: λ, chosen from the measurements in docs/defaults.md.
DEFAULT_DAMPING = 1.0

#: Version 0.1's keywords of :func:`unlearn` -> the solver option they became.
LEGACY_SOLVER_OPTIONS = {
  "rcond": "rcond", "implementation": "implementation",
  "precision": "solve_dtype", "cg_tol": "cg_tol",
  "cg_max_steps": "cg_max_steps", "newton_tol": "tol",
  "newton_max_steps": "max_steps",
}


class UnlearnResult(NamedTuple):
  """Result of :func:`unlearn` (a pytree).

  Attributes:
    params: ``w_r``, same tree structure and dtypes as ``params``.
    solver: ``"dual"``, ``"primal"``, ``"cg"`` or ``"sketch"``: the name of the solver that
      ran (:mod:`fastntk_jax.core.solvers`).
    damping: λ used.
    loss: ``"mse"`` or ``"ce"``.
    linearized_at: ``"w_D"`` or ``"w_0"``: where ``J`` and ``f`` were taken.
    anchored_at: ``"w_0"`` (an ``anchor`` was given) or ``"w_D"`` (none was:
      the ridge term is centred at ``params``).
    num_retain, num_forget: samples in ``D_r`` and ``D_f``.
    num_outputs: C.
    num_params: P, scalars in the PEFT pytree.
    delta_norm: ``‖w_r − w_D‖₂``.
    forget_residual_norm: ``‖V‖₂``, the linear retrained model's residual on
      ``D_f`` that the update removes (``loss="mse"``; NaN for ``"ce"``).
    relative_residual: the largest relative residual of the linear solves
      (``"mse"``) or the largest final relative gradient norm
      ``‖∇Φ_S‖/max(‖∇Φ_S(0)‖, λ‖x‖)`` of the two Newton solves (``"ce"``).
    cond: the largest condition number (estimate) of the systems solved
      (NaN where they are never formed: ``"cg"`` and ``"ce"``).
    rank: numerical rank of the last system (its size when λ > 0; P where it
      is not formed).
    seconds: wall time of the call, compilation included.
    cg_steps: conjugate-gradient steps over all solves (0 for direct ones).
    converged: every solve converged (False only with
      ``raise_on_failure=False``).
    solves: a :class:`fastntk_jax.core.newton.NewtonReport` per solve: for
      ``"ce"`` the Newton solves on ``D`` and on ``D_r``, in that order; for
      ``"mse"`` Eq. (1)'s two linear solves (one Newton step each).
    kept_jacobian: the Jacobian over ``D`` was held in memory (``"ce"``
      with ``"primal"``); otherwise each Newton step recomputed what it needs.
    status: ``"converged"`` or ``"failed"`` (``raise_on_failure=False``).
    iterations: Newton steps (or linear solves) over all solves.
    choice: the :class:`~fastntk_jax.core.solvers.Choice` of
      ``solver="auto"`` (cost estimates and reason); None for an explicit
      solver.
    solver_options: the solver object that ran, with all its options.
    approximation: for an approximate solver (``"sketch"``), a dict of what
      was approximated and its error estimates; None for the exact ones.
  """
  params: Any
  solver: str
  damping: float
  loss: str
  linearized_at: str
  anchored_at: str
  num_retain: int
  num_forget: int
  num_outputs: int
  num_params: int
  delta_norm: float
  forget_residual_norm: float
  relative_residual: float
  cond: float
  rank: int
  seconds: float
  cg_steps: int = 0
  converged: bool = True
  solves: tuple = ()
  kept_jacobian: bool = False
  status: str = "converged"
  iterations: int = 0
  choice: Any = None
  solver_options: Any = None
  approximation: Any = None

  def summary(self) -> dict[str, Any]:
    """Everything but ``params``, as JSON-ready values."""
    out = {k: v for k, v in self._asdict().items()
           if k not in ("params", "solves", "choice", "solver_options")}
    out["solves"] = [dict(r._asdict()) for r in self.solves]
    out["solver_options"] = None if self.solver_options is None else {
        "name": self.solver_options.name,
        **dataclasses.asdict(self.solver_options)}
    out["choice"] = None if self.choice is None else {
        "solver": self.choice.solver.name, "reason": self.choice.reason,
        "memory_budget": self.choice.memory_budget,
        "estimates": [dict(e._asdict()) for e in self.choice.estimates]}
    return out


def unlearn(apply_fn: Callable[[Any, Any], jax.Array], params, retain,
            forget, *, anchor=None, linearize_at: str = "w_D",
            damping: float = DEFAULT_DAMPING, loss: str = "mse",
            solver="auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
            block_size: int | None = None, mesh=None,
            raise_on_failure: bool = True, **legacy) -> UnlearnResult:
  r"""Forgets ``forget``: ``w_r = w_D + (x_{D_r} − x_D)`` (Fast-NTK).

  Computed over the pytree ``params`` only: pass the PEFT parameters and an
  ``apply_fn`` that closes over the frozen rest (:mod:`fastntk_jax.peft`)::

    res = unlearn(apply_fn, w_D, (x_r, y_r), (x_f, y_f), anchor=w_0,
                  loss="ce")
    res.params, res.status, res.solver, res.choice

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (N, C)``; a sample's logits
      depend on that sample alone (BatchNorm in inference mode).
    params: ``w_D``, the PEFT parameters after fine-tuning on ``D``.
    retain, forget: ``(x, y)`` pairs, ``D_r`` and ``D_f`` (non-empty);
      ``y`` integer labels in ``[0, C)``.
    anchor: ``w_0``, where fine-tuning started: the ridge's centre. Give it:
      None centres the ridge at ``params``, which forgets less
      (docs/defaults.md).
    linearize_at: ``"w_D"`` (``J``, ``f`` at ``params``) or ``"w_0"``.
    damping: λ ≥ 0 against the *sum* of per-sample losses (for ``"mse"``
      the constant on every kernel diagonal; 0 is the λ → 0⁺ limit,
      ``"mse"`` only).
    loss: the fine-tuning loss: ``"mse"`` (Eq. (1)) or ``"ce"``.
    solver: a solver object or name (``"auto"``, ``"dual"``, ``"primal"``,
      ``"cg"``, or the approximate ``"sketch"``;
      :mod:`fastntk_jax.core.solvers`).
    memory_budget: bytes dense matrices may take; a solver over it is
      refused before any work.
    block_size: samples per block of Jacobian work (None: automatic).
    mesh: a 1-D ``Mesh`` with axis ``"data"`` (None: all local devices).
    raise_on_failure: False returns a failed solve as ``status="failed"``
      instead of raising :class:`UnlearningError`.

  Returns:
    :class:`UnlearnResult`.

  Raises:
    TypeError, ValueError: bad input, before heavy work.
    UnlearningError: a factorisation failed or a solve did not converge.
  """
  t0 = time.perf_counter()
  prob, chosen, choice = prepare_problem(
      apply_fn, params, retain, forget, anchor=anchor,
      linearize_at=linearize_at, damping=damping, loss=loss, solver=solver,
      memory_budget=memory_budget, block_size=block_size, mesh=mesh,
      legacy=legacy)
  out = chosen.run(prob)
  converged = all(r.converged for r in out.reports)
  if not converged and raise_on_failure:
    _raise_not_converged(chosen.name, out.reports)
  new_params, delta_norm = _apply(params, out.delta)
  nan, infos = float("nan"), out.infos
  v = out.forget_residual_norm
  return UnlearnResult(
      params=new_params, solver=chosen.name, damping=prob.damping,
      loss=prob.loss, linearized_at=linearize_at,
      anchored_at="w_D" if anchor is None else "w_0",
      num_retain=prob.n_r, num_forget=prob.n_f, num_outputs=prob.shape.c,
      num_params=prob.shape.p, delta_norm=delta_norm,
      forget_residual_norm=nan if v is None else float(v),
      relative_residual=max(float(r.grad_norm) for r in out.reports),
      cond=max([float(i.cond) for i in infos] or [nan]),
      rank=int(infos[-1].rank) if infos else prob.shape.p,
      seconds=time.perf_counter() - t0,
      cg_steps=sum(r.cg_steps for r in out.reports), converged=converged,
      solves=tuple(out.reports), kept_jacobian=out.kept_jacobian,
      status="converged" if converged else "failed",
      iterations=sum(int(r.iterations) for r in out.reports), choice=choice,
      solver_options=chosen, approximation=out.approximation)


def _apply(params, delta):
  """``params + unravel(delta)`` in each leaf's dtype, and ``‖delta‖``."""
  if not bool(jnp.all(jnp.isfinite(delta))):
    raise UnlearningError(
        "the update is not finite although every solve reported success; "
        "check apply_fn for NaNs at the linearisation point.")
  flat_w, unravel = ravel_pytree(params)
  new_params = jax.tree_util.tree_map(
      lambda w, d: (w + d).astype(jnp.result_type(w)), params,
      unravel(delta.astype(flat_w.dtype)))
  jax.block_until_ready(new_params)
  return new_params, float(jnp.linalg.norm(delta))


def _legacy_solver(solver, legacy: dict):
  """Version 0.1's solver keywords, moved onto the solver object."""
  old = {k: legacy.pop(k) for k in list(legacy) if k in LEGACY_SOLVER_OPTIONS}
  if not old:
    return solvers.as_solver(solver), {}
  opts = {LEGACY_SOLVER_OPTIONS[k]: v for k, v in old.items()}
  warnings.warn(
      f"unlearn({', '.join(f'{k}=...' for k in sorted(old))}) is deprecated: "
      "these are options of the solver object now, e.g. "
      "solver=fastntk_jax.ParameterSpace(solve_dtype='float32') "
      "(docs/migration.md).", DeprecationWarning, stacklevel=3)
  solver = solvers.as_solver(solver)
  return solvers.as_solver(_with_options(solver, opts)), opts


def _with_options(solver, opts: dict):
  """``solver`` with those of ``opts`` that it has (the rest do not apply)."""
  names = {f.name for f in dataclasses.fields(solver)}
  return dataclasses.replace(
      solver, **{k: v for k, v in opts.items() if k in names})


def _check_data(retain, forget):
  x_r, y_r = validate.check_split("retain", retain)
  x_f, y_f = validate.check_split("forget", forget)
  if y_f.shape[0] == 0:
    raise ValueError("forget: the forget set is empty; there is nothing to "
                     "unlearn. Pass at least one (x, y) sample.")
  if y_r.shape[0] == 0:
    raise ValueError("retain: the retain set is empty; the update needs D_r. "
                     "To forget everything, reset to the anchor w_0 instead.")
  if np.shape(x_r)[1:] != np.shape(x_f)[1:]:
    raise ValueError(
        f"forget: inputs have per-sample shape {np.shape(x_f)[1:]} but retain "
        f"inputs have {np.shape(x_r)[1:]}; both must match the model input.")
  if x_r.dtype != x_f.dtype:  # e.g. raw uint8 images beside normalised ones
    raise TypeError(f"forget: x dtype {x_f.dtype} differs from retain's "
                    f"{x_r.dtype}; prepare both sets the same way.")
  return x_r, y_r, x_f, y_f


def prepare_problem(apply_fn, params, retain, forget, *, anchor=None,
                    linearize_at="w_D", damping=DEFAULT_DAMPING, loss="mse",
                    solver="auto", memory_budget=DEFAULT_MEMORY_BUDGET,
                    block_size=None, mesh=None, legacy=None):
  """Every check of :func:`unlearn`, before any heavy work, and the solver.

  Returns:
    ``(problem, solver, choice)``: the :class:`~fastntk_jax.core.solvers.
    Problem`, the solver that will run, and :class:`Auto`'s
    :class:`~fastntk_jax.core.solvers.Choice` (None for an explicit one).
  """
  legacy = dict(legacy or {})
  if not callable(apply_fn):
    raise TypeError("apply_fn must be callable as apply_fn(params, x).")
  solver, opts = _legacy_solver(solver, legacy)
  lin, anc = validate.check_points(params, anchor, linearize_at, legacy)
  x_r, y_r, x_f, y_f = _check_data(retain, forget)
  loss = validate.check_loss(loss)
  damping = validate.check_damping(damping, positive=loss == "ce")
  validate.check_positive_int_or_none("block_size", block_size)
  validate.check_memory_budget(memory_budget)
  mesh = blocking.resolve_mesh(mesh)
  c = kernels.num_outputs(apply_fn, params, x_r)
  validate.check_labels("retain", y_r, c)
  validate.check_labels("forget", y_f, c)
  flat_w, _ = ravel_pytree(params)
  shape = solvers.ProblemShape(
      int(y_r.shape[0] + y_f.shape[0]), c, int(flat_w.shape[0]),
      jnp.dtype(flat_w.dtype).itemsize, loss, damping)
  choice = None
  if isinstance(solver, solvers.Auto):
    choice = solver.select(shape, memory_budget)
    solver = solvers.as_solver(_with_options(choice.solver, opts))
    memory_budget = choice.memory_budget
  else:
    solvers.check_budget(solver, shape, memory_budget)
  shift = None
  if anc is not lin:
    sd = solver.solve_dtype
    dt = validate.check_solve_dtype(sd)
    with kernels.dtype_scope(sd):
      shift = (ravel_pytree(anc)[0].astype(dt)
               - ravel_pytree(lin)[0].astype(dt))
  prob = solvers.Problem(apply_fn, lin, shift, x_r, y_r, x_f, y_f, damping,
                         loss, linearize_at, shape, memory_budget, block_size,
                         mesh)
  return prob, solver, choice


def _raise_not_converged(solver: str, reports) -> None:
  for k, r in enumerate(reports):
    if not r.converged:
      raise UnlearningError(
          f"{solver} solver: solve {k + 1} of {len(reports)} stopped with "
          f"status {r.status!r} after {r.iterations} step(s) at relative "
          f"gradient/residual norm {r.grad_norm:.3g}. Raise the solver's "
          "max_steps (or cg_max_steps), raise damping (better conditioned), "
          "loosen its tol/cg_tol, or pass raise_on_failure=False to inspect "
          "the last iterate.")
