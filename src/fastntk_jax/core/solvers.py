"""The solvers :func:`fastntk_jax.unlearn` runs, as objects (lineax-style).

Every solver computes ``w_r − w_D = x_{D_r} − x_D`` for both losses; they
differ in the space the systems live in, and each carries its own options:

=====================  ==========  =========================================
solver                 ``name``    systems
=====================  ==========  =========================================
:class:`KernelSpace`   ``"dual"``  ``N·C × N·C`` kernels (the paper's form);
                                   IRLS on ``λI + LᵀΘL`` for ``"ce"``
:class:`ParameterSpace` ``"primal"`` ``P × P`` Grams; Newton with the
                                   Gauss-Newton matrix for ``"ce"``
:class:`MatrixFree`    ``"cg"``    none: conjugate gradients (Newton-CG for
                                   ``"ce"``), every product a pass over data
:class:`Sketched`      ``"sketch"`` ``P × P``, ``A_r`` from ``s < C`` random
                                   cotangents a sample (approximate, ``"mse"``)
:class:`Auto`          ``"auto"``  picks one of the three by cost
=====================  ==========  =========================================

Example::

  choice = Auto(memory_budget=2**30).select(ProblemShape(n, c, p))
  choice.solver, choice.estimates, choice.reason
  res = unlearn(apply_fn, w_D, retain, forget, anchor=w_0,
                solver=ParameterSpace(solve_dtype="float32"))

A solver's :meth:`~Solver.run` takes a validated :class:`Problem` (built by
:func:`fastntk_jax.unlearn`) and returns an :class:`Outcome`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax.core import cg
from fastntk_jax.core import kernels
from fastntk_jax.core import newton
from fastntk_jax.core import objective
from fastntk_jax.core import update
from fastntk_jax.core import validate
from fastntk_jax.core.newton import NewtonReport
from fastntk_jax.core.solve import psd_solve

__all__ = [
  "DEFAULT_MEMORY_BUDGET",
  "RESIDUAL_FNS",
  "SOLVE_DTYPES",
  "Auto",
  "Choice",
  "Estimate",
  "KernelSpace",
  "MatrixFree",
  "Outcome",
  "ParameterSpace",
  "Problem",
  "ProblemShape",
  "Sketched",
  "SketchedKernel",
  "Solver",
  "UnlearningError",
  "as_solver",
  "choose_solver",
]

#: Bytes the dense matrices of a solver may take before it is refused.
DEFAULT_MEMORY_BUDGET = 4 * 2**30
#: ``solve_dtype -> bytes per scalar`` (the names of :data:`fastntk_jax.core.validate.SOLVE_DTYPES`): the dtype of the ``P×P`` matrices and
#: of the solves (Jacobians stay in the model's dtype).
SOLVE_DTYPES = {"float64": 8, "float32": 4}


class UnlearningError(FloatingPointError):
  """A factorisation failed, a solve did not converge, or the update is not
  finite."""


def _mse_residual(logits: jax.Array, y: jax.Array) -> jax.Array:
  return logits - jax.nn.one_hot(y, logits.shape[1], dtype=logits.dtype)


#: ``loss -> r(logits, y)``, Eq. (1)'s residual ``f − onehot(y)`` at the
#: linearisation point (module-level, so that compiled passes are reused).
RESIDUAL_FNS = {"mse": _mse_residual}


class ProblemShape(NamedTuple):
  """What the cost model of a solver depends on.

  Attributes:
    n: samples in ``D = D_r ∪ D_f``.
    c: logits per sample.
    p: scalars in the PEFT pytree.
    itemsize: bytes per scalar of the model's parameters.
    loss: ``"mse"`` or ``"ce"``.
    damping: λ (λ = 0 makes the ``"mse"`` kernel solve keep eigenvectors).
  """
  n: int
  c: int
  p: int
  itemsize: int = 4
  loss: str = "mse"
  damping: float = 1.0


class Problem(NamedTuple):
  """A validated unlearning problem, as :func:`fastntk_jax.unlearn` builds it.

  Attributes:
    apply_fn: ``apply_fn(params, x) -> logits``.
    lin: the linearisation point (``w_D`` or ``w_0``).
    shift: ``ravel(w_0) − ravel(lin)`` in the solve dtype, or None when the
      anchor is the linearisation point.
    x_r, y_r, x_f, y_f: ``D_r`` and ``D_f``.
    damping: λ.
    loss: ``"mse"`` or ``"ce"``.
    linearize_at: ``"w_D"`` or ``"w_0"`` (for messages).
    shape: the :class:`ProblemShape`.
    memory_budget: bytes the dense matrices may take.
    block_size, mesh: how the Jacobian work is blocked and sharded.
  """
  apply_fn: Any
  lin: Any
  shift: jax.Array | None
  x_r: Any
  y_r: np.ndarray
  x_f: Any
  y_f: np.ndarray
  damping: float
  loss: str
  linearize_at: str
  shape: ProblemShape
  memory_budget: int
  block_size: int | None
  mesh: Any

  @property
  def n_r(self) -> int:
    return int(self.y_r.shape[0])

  @property
  def n_f(self) -> int:
    return int(self.y_f.shape[0])

  @property
  def blk(self) -> dict:
    return {"block_size": self.block_size, "mesh": self.mesh}


class Outcome(NamedTuple):
  """What a solver returns: the flat update and how the solves went.

  Attributes:
    delta: ``ravel(w_r − w_D)`` in the parameters' dtype.
    forget_residual_norm: ``‖V‖`` (``"mse"``), else None.
    reports: a :class:`~fastntk_jax.core.newton.NewtonReport` per solve.
    infos: the :class:`~fastntk_jax.core.solve.SolveInfo` of each dense
      factorisation (empty where none is formed).
    kept_jacobian: the Jacobian over ``D`` was held in memory.
    approximation: for an approximate solver, what it approximated and its
      error estimates (:class:`Sketched`); None for the exact ones.
  """
  delta: jax.Array
  forget_residual_norm: Any
  reports: tuple
  infos: tuple = ()
  kept_jacobian: bool = False
  approximation: dict | None = None


class Estimate(NamedTuple):
  """A solver's cost on a :class:`ProblemShape`.

  Attributes:
    solver: its ``name``.
    bytes: memory of its dense matrices (the dominant term).
    flops: leading-order flops beyond the Jacobian (per Newton step for
      ``"ce"``); NaN for the matrix-free solver, whose cost depends on the
      conditioning.
    fits: ``bytes <= memory_budget``.
  """
  solver: str
  bytes: int
  flops: float
  fits: bool


class Choice(NamedTuple):
  """What :meth:`Auto.select` chose, and why.

  Attributes:
    solver: the chosen :class:`Solver` (with :class:`Auto`'s ``solve_dtype``).
    estimates: an :class:`Estimate` per dense solver.
    memory_budget: the budget they were measured against.
    reason: one sentence.
  """
  solver: "Solver"
  estimates: tuple
  memory_budget: int
  reason: str


def _check_newton(tol, max_steps) -> None:
  validate.check_tolerance("tol", tol, allow_none=True)
  validate.check_positive_int_or_none("max_steps", max_steps)


def _check_rcond(rcond) -> None:
  if rcond is not None and not (math.isfinite(float(rcond)) and rcond >= 0):
    raise ValueError(f"rcond must be a finite float ≥ 0 or None, got {rcond}.")


def _check_logits(f0, linearize_at) -> None:
  if not bool(jnp.all(jnp.isfinite(f0))):
    raise ValueError(
        f"apply_fn returns NaN or infinite logits at the linearisation point "
        f"({linearize_at}); check the model and its inputs there.")


def _linear_report(info) -> NewtonReport:
  """A linear solve of Eq. (1) as one Newton step of the quadratic problem."""
  ok = bool(info.ok)
  return NewtonReport(ok, "converged" if ok else "factorisation_failed", 1,
                      float(info.relative_residual), float("nan"))


def _raise_if_failed(infos, damping: float, solver: str) -> None:
  for k, info in enumerate(infos):
    if not bool(info.ok):
      raise UnlearningError(
          f"{solver} solver: factorisation {k + 1} of {len(infos)} failed (the "
          f"damped matrix is not numerically positive definite at damping="
          f"{damping}, condition estimate {float(info.cond):.3g}). Increase "
          "damping, enable float64 with jax.config.update('jax_enable_x64', "
          "True), or use damping=0 for the pseudo-inverse limit.")


def _newton_opts(solver) -> dict:
  return {"tol": solver.tol,
          "max_iter": 100 if solver.max_steps is None else solver.max_steps,
          "solve_dtype": solver.solve_dtype}


def _all_data(prob: Problem):
  x = jnp.concatenate([jnp.asarray(prob.x_r), jnp.asarray(prob.x_f)])
  return x, np.concatenate([prob.y_r, prob.y_f])


def _residuals_at_anchor(prob: Problem):
  """Eq. (1)'s residuals of the linear model at the anchor, by JVP passes:
  ``r = f(w_lin) − Y + J d`` with ``d = w_0 − w_lin``."""
  apply_fn, lin, blk = prob.apply_fn, prob.lin, prob.blk
  f0_r = kernels.predict(apply_fn, lin, prob.x_r, mesh=prob.mesh)
  f0_f = kernels.predict(apply_fn, lin, prob.x_f, mesh=prob.mesh)
  _check_logits(jnp.concatenate([f0_r, f0_f]), prob.linearize_at)
  res_fn = RESIDUAL_FNS["mse"]
  r_r = res_fn(f0_r, jnp.asarray(prob.y_r))
  r_f = res_fn(f0_f, jnp.asarray(prob.y_f))
  if prob.shift is not None:
    _, unravel = ravel_pytree(lin)
    d = unravel(prob.shift.astype(ravel_pytree(lin)[0].dtype))
    r_r = r_r + kernels.jvp(apply_fn, lin, prob.x_r, d, **blk)
    r_f = r_f + kernels.jvp(apply_fn, lin, prob.x_f, d, **blk)
  return r_r, r_f


class Solver(abc.ABC):
  """A solver of the unlearning problem: its options, cost model and run.

  Subclasses are frozen dataclasses that implement :meth:`memory_bytes`,
  :meth:`flops` and :meth:`run`; ``name`` is what
  :attr:`fastntk_jax.UnlearnResult.solver` reports.
  """
  name: ClassVar[str] = ""
  solve_dtype: str = "float64"

  def check(self) -> None:
    """Validates the options (raises before any work)."""
    validate.check_solve_dtype(self.solve_dtype)

  @abc.abstractmethod
  def memory_bytes(self, shape: ProblemShape) -> int:
    """Memory of the solver's dense matrices (its dominant term)."""

  @abc.abstractmethod
  def flops(self, shape: ProblemShape) -> float:
    """Leading-order flops beyond the Jacobian rows, which every solver needs
    (per Newton step for ``"ce"``)."""

  def estimate(self, shape: ProblemShape, memory_budget: int) -> Estimate:
    need = self.memory_bytes(shape)
    return Estimate(self.name, need, self.flops(shape), need <= memory_budget)

  @abc.abstractmethod
  def run(self, prob: Problem) -> Outcome:
    """Solves ``prob``; see the class docstring for the method."""


@dataclasses.dataclass(frozen=True)
class KernelSpace(Solver):
  """Kernel space: the ``N·C × N·C`` empirical NTK (Fast-NTK's Eq. (1)).

  ``"mse"``: Cholesky solves of the damped kernel blocks (pseudo-inverses with
  cutoff ``rcond`` at λ = 0). ``"ce"``: IRLS on ``B = λI + LᵀΘL`` for ``D``,
  then for ``D_r`` warm-started from ``D``'s rows of ``β_D``.

  Attributes:
    rcond: relative eigenvalue cutoff for ``damping=0`` (None: automatic).
    implementation: neural-tangents NTK implementation when the Jacobians do
      not fit in memory: 1 (Jacobian contraction) or 2 (NTK-vector products).
    solve_dtype: ``"float64"`` or ``"float32"``, the dtype of the solves.
    tol: relative gradient norm at which the ``"ce"`` Newton solves stop
      (None: :func:`fastntk_jax.core.newton.default_tol`).
    max_steps: Newton steps per ``"ce"`` solve at most.
  """
  name: ClassVar[str] = "dual"
  rcond: float | None = None
  implementation: int = 1
  solve_dtype: str = "float64"
  tol: float | None = None
  max_steps: int = 100

  def check(self) -> None:
    super().check()
    _check_rcond(self.rcond)
    if isinstance(self.implementation, bool) or self.implementation not in (
        1, 2):
      raise ValueError(
          f"implementation must be 1 or 2, got {self.implementation!r}.")
    _check_newton(self.tol, self.max_steps)

  def memory_bytes(self, shape: ProblemShape) -> int:
    """``"mse"``: Θ on the host and on the device, a damped copy and its
    Cholesky factor (λ > 0; for λ = 0 also the re-assembled Θ and its
    eigenvectors), in the model's dtype. ``"ce"``: Θ, its copy in the solve
    dtype, the ``D_r`` block, ``LᵀΘL + λI`` and its factor."""
    nc = shape.n * shape.c
    if shape.loss == "ce":
      return nc ** 2 * (shape.itemsize + 5 * SOLVE_DTYPES[self.solve_dtype])
    return (4 if shape.damping > 0 else 6) * nc ** 2 * shape.itemsize

  def flops(self, shape: ProblemShape) -> float:
    """Kernel contraction ``(NC)²P``, Cholesky of the ``N·C`` system."""
    nc = shape.n * shape.c
    return nc ** 2 * shape.p + nc ** 3 / 3

  def run(self, prob: Problem) -> Outcome:
    if prob.loss == "ce":
      return self._run_ce(prob)
    apply_fn, lin, blk = prob.apply_fn, prob.lin, prob.blk
    n_r, n_f, c = prob.n_r, prob.n_f, prob.shape.c
    r_r, r_f = _residuals_at_anchor(prob)
    # One symmetric kernel over D = [D_r; D_f]: one compilation, upper blocks
    # only; then its three blocks.
    theta = kernels.ntk(apply_fn, lin, _all_data(prob)[0],
                        implementation=self.implementation, **blk)
    k = n_r * c
    th_rr, th_rf, th_ff = theta[:k, :k], theta[:k, k:], theta[k:, k:]
    del theta
    upd = update.kernel_space(th_rr, th_rf, th_ff, r_r.reshape(-1),
                              r_f.reshape(-1), prob.damping, self.rcond)
    _raise_if_failed(upd.infos, prob.damping, self.name)
    g_r = kernels.vjp(apply_fn, lin, prob.x_r, upd.coef_r.reshape(n_r, c),
                      **blk)
    g_f = kernels.vjp(apply_fn, lin, prob.x_f, upd.coef_f.reshape(n_f, c),
                      **blk)
    delta = ravel_pytree(g_r)[0] + ravel_pytree(g_f)[0]
    return Outcome(delta, jnp.linalg.norm(upd.v),
                   tuple(_linear_report(i) for i in upd.infos), upd.infos)

  def _run_ce(self, prob: Problem) -> Outcome:
    apply_fn, lin, blk = prob.apply_fn, prob.lin, prob.blk
    n_r, n_f, c = prob.n_r, prob.n_f, prob.shape.c
    x_all, y_all = _all_data(prob)
    f0 = kernels.predict(apply_fn, lin, x_all, mesh=prob.mesh)
    _check_logits(f0, prob.linearize_at)
    theta = kernels.ntk(apply_fn, lin, x_all,
                        implementation=self.implementation, **blk)
    b = f0
    if prob.shift is not None:
      _, unravel = ravel_pytree(lin)
      b = f0 + kernels.jvp(apply_fn, lin, x_all, unravel(
          prob.shift.astype(f0.dtype)), **blk)
    loss, opts = objective.cross_entropy, _newton_opts(self)
    beta_d, rep_d = newton.solve_dual(theta, b, y_all, loss, prob.damping,
                                      **opts)
    k = n_r * c
    beta_r, rep_r = newton.solve_dual(theta[:k, :k], b[:n_r], prob.y_r, loss,
                                      prob.damping, beta0=beta_d[:k], **opts)
    del theta
    flat_dtype = ravel_pytree(lin)[0].dtype
    coef_r = (beta_r - beta_d[:k]).astype(flat_dtype).reshape(n_r, c)
    coef_f = (-beta_d[k:]).astype(flat_dtype).reshape(n_f, c)
    delta = (ravel_pytree(kernels.vjp(apply_fn, lin, prob.x_r, coef_r,
                                      **blk))[0]
             + ravel_pytree(kernels.vjp(apply_fn, lin, prob.x_f, coef_f,
                                        **blk))[0])
    return Outcome(delta, None, (rep_d, rep_r))


@dataclasses.dataclass(frozen=True)
class ParameterSpace(Solver):
  """Parameter space: ``P × P`` Gram matrices (push-through of Eq. (1)).

  ``"mse"``: one pass per set gives the Grams ``JᵀJ``, ``Jᵀr`` and the logits;
  two Cholesky solves. ``"ce"``: Newton with the ``P×P`` Gauss-Newton matrix,
  the Jacobian over ``D`` kept in memory when it fits the budget beside the
  ``P×P`` matrices (else recomputed at every step).

  Attributes:
    rcond: relative eigenvalue cutoff for ``damping=0``.
    solve_dtype: ``"float64"`` or ``"float32"``: dtype of the ``P×P``
      matrices and of the solves.
    tol, max_steps: as :class:`KernelSpace` (``"ce"``).
    keep_jacobian: ``"ce"``: True keeps the Jacobian, False recomputes it
      per step, None decides by ``memory_budget``.
  """
  name: ClassVar[str] = "primal"
  rcond: float | None = None
  solve_dtype: str = "float64"
  tol: float | None = None
  max_steps: int = 100
  keep_jacobian: bool | None = None

  def check(self) -> None:
    super().check()
    _check_rcond(self.rcond)
    _check_newton(self.tol, self.max_steps)
    if self.keep_jacobian not in (None, True, False):
      raise ValueError("keep_jacobian must be True, False or None, got "
                       f"{self.keep_jacobian!r}.")

  def memory_bytes(self, shape: ProblemShape) -> int:
    """``A_r``, ``A_f``, their sum, a damped copy and its factor (five
    ``P×P`` matrices in the solve dtype; for ``"ce"`` the Jacobian, when
    kept, is counted by :meth:`jacobian_bytes`)."""
    return 5 * shape.p * shape.p * SOLVE_DTYPES[self.solve_dtype]

  def jacobian_bytes(self, shape: ProblemShape) -> int:
    """The kept Jacobian: computed in the model's dtype, stored in the solve
    dtype (both exist while it is converted)."""
    return shape.n * shape.c * shape.p * (shape.itemsize
                                          + SOLVE_DTYPES[self.solve_dtype])

  def flops(self, shape: ProblemShape) -> float:
    """Gram accumulation ``NCP²``, two ``P×P`` Cholesky factorisations."""
    return shape.n * shape.c * shape.p ** 2 + 2 * shape.p ** 3 / 3

  def keeps_jacobian(self, shape: ProblemShape, memory_budget: int) -> bool:
    """Whether a ``"ce"`` run holds the Jacobian over ``D`` in memory."""
    if shape.loss != "ce":
      return False
    if self.keep_jacobian is not None:
      return bool(self.keep_jacobian)
    return (self.memory_bytes(shape) + self.jacobian_bytes(shape)
            <= memory_budget)

  def run(self, prob: Problem) -> Outcome:
    if prob.loss == "ce":
      keep = self.keeps_jacobian(prob.shape, prob.memory_budget)
      return _run_ce_primal(self, prob, newton.solve_primal, keep)
    res_fn, sd = RESIDUAL_FNS["mse"], self.solve_dtype
    a_r, b_r, f0_r = kernels.gram(prob.apply_fn, prob.lin, prob.x_r, res_fn,
                                  y=prob.y_r, solve_dtype=sd,
                                  return_outputs=True, **prob.blk)
    upd, v, _ = _mse_primal(self, prob, a_r, b_r, f0_r)
    return Outcome(upd.delta.astype(ravel_pytree(prob.lin)[0].dtype), v,
                   tuple(_linear_report(i) for i in upd.infos), upd.infos)


def _mse_primal(solver, prob: Problem, a_r, b_r, f0_r, more_r=()):
  """Eq. (1) in parameter space from ``D_r``'s Grams (given) and ``D_f``'s
  (computed here, exactly); ``more_r``: other estimates of ``A_r`` solved
  with the same right-hand sides. Returns ``(update, ‖V‖, deltas)``, a
  delta per ``more_r``."""
  res_fn, sd = RESIDUAL_FNS["mse"], solver.solve_dtype
  a_f, b_f, f0_f = kernels.gram(prob.apply_fn, prob.lin, prob.x_f, res_fn,
                                y=prob.y_f, solve_dtype=sd,
                                return_outputs=True, **prob.blk)
  _check_logits(jnp.concatenate([f0_r, f0_f]), prob.linearize_at)
  r_f = res_fn(f0_f, jnp.asarray(prob.y_f)).reshape(-1)
  with kernels.dtype_scope(sd):
    rr_f = jnp.sum(jnp.asarray(r_f, a_f.dtype) ** 2)
    if prob.shift is not None:
      d = prob.shift.astype(a_f.dtype)
      rr_f = rr_f + 2 * d @ b_f + d @ (a_f @ d)
      b_f = b_f + a_f @ d
    shifted = lambda a: b_r if prob.shift is None else b_r + a @ d
    upd = update.parameter_space(a_r, a_f, shifted(a_r), b_f, prob.damping,
                                 solver.rcond)
    _raise_if_failed(upd.infos, prob.damping, solver.name)
    # ‖V‖, a diagnostic, from the Grams rather than another pass over D_f.
    v = update.forget_residual_norm(a_f, b_f, upd.x_retrain, rr_f)
    deltas = []
    for a in more_r:
      u = update.parameter_space(a, a_f, shifted(a), b_f, prob.damping,
                                 solver.rcond)
      _raise_if_failed(u.infos, prob.damping, solver.name)
      deltas.append(u.delta)
  return upd, v, deltas


@dataclasses.dataclass(frozen=True)
class MatrixFree(Solver):
  """Matrix-free: conjugate gradients on ``(A + λI) x = b``, every ``A v`` a
  linearised pass over the data; Newton-CG for ``"ce"``. ``O(P)`` memory;
  the step count depends on the conditioning.

  Attributes:
    cg_tol: relative residual at which CG stops (``"mse"``).
    cg_max_steps: CG iterations per solve at most (None: ``min(10·P, 1000)``).
    solve_dtype: dtype of the ``"ce"`` Newton iterates.
    tol, max_steps: as :class:`KernelSpace` (``"ce"``).
  """
  name: ClassVar[str] = "cg"
  cg_tol: float = 1e-5
  cg_max_steps: int | None = None
  solve_dtype: str = "float64"
  tol: float | None = None
  max_steps: int = 100

  def check(self) -> None:
    super().check()
    validate.check_tolerance("cg_tol", self.cg_tol)
    validate.check_positive_int_or_none("cg_max_steps", self.cg_max_steps)
    _check_newton(self.tol, self.max_steps)

  def memory_bytes(self, shape: ProblemShape) -> int:
    """Four ``P``-vectors plus the right-hand sides."""
    return 8 * shape.p * shape.itemsize

  def flops(self, shape: ProblemShape) -> float:
    return float("nan")

  def run(self, prob: Problem) -> Outcome:
    if prob.loss == "ce":
      solve = functools.partial(newton.solve_newton_cg,
                                cg_max_steps=self.cg_max_steps)
      return _run_ce_primal(self, prob, solve, False)
    apply_fn, lin, blk = prob.apply_fn, prob.lin, prob.blk
    r_r, r_f = _residuals_at_anchor(prob)
    # x_r = −(A_r + λI)⁻¹ J_rᵀ r_r and w_r − w_D = (A + λI)⁻¹ J_fᵀ V with
    # V = J_f x_r + r_f.
    mv_r = cg.gauss_newton_matvec(apply_fn, lin, prob.x_r, **blk)
    mv_f = cg.gauss_newton_matvec(apply_fn, lin, prob.x_f, **blk)
    _, unravel = ravel_pytree(lin)
    opts = {"damping": prob.damping, "tol": self.cg_tol,
            "max_steps": self.cg_max_steps}
    g_r = ravel_pytree(kernels.vjp(apply_fn, lin, prob.x_r, r_r, **blk))[0]
    x_ret, info_r = cg.cg_solve(mv_r, -g_r, **opts)
    v = kernels.jvp(apply_fn, lin, prob.x_f, unravel(x_ret), **blk) + r_f
    rhs = ravel_pytree(kernels.vjp(apply_fn, lin, prob.x_f, v, **blk))[0]
    delta, info = cg.cg_solve(lambda u: mv_r(u) + mv_f(u), rhs, **opts)
    reports = tuple(
        NewtonReport(i.ok, "converged" if i.ok else i.status, 1,
                     float(i.relative_residual), float("nan"), i.steps)
        for i in (info_r, info))
    return Outcome(delta, jnp.linalg.norm(v.reshape(-1)), reports)


@dataclasses.dataclass(frozen=True)
class Sketched(ParameterSpace):
  """Parameter space with a random-cotangent sketch of ``A_r`` (approximate).

  ``A_r = J_rᵀ J_r`` from ``cotangents = s`` reverse passes per retained
  sample instead of ``C`` (:func:`fastntk_jax.core.kernels.sketched_gram`,
  unbiased: ``E[Â_r] = A_r``); ``J_rᵀ r_r``, ``A_f`` and ``J_fᵀ r_f`` stay
  exact, and the two solves are those of :class:`ParameterSpace`. The
  paper's future work ("approximate computation of the NTK matrix"), never
  chosen by ``"auto"``. ``"mse"`` only.

  Error estimate (``UnlearnResult.approximation``): with ``s`` even the
  sketch is two independent halves; the update is also solved with each
  half, and ``split_half_error = ‖Δ₁ − Δ₂‖ / (2‖Δ‖)`` estimates the relative
  error of the update (the halves' errors are about √2 times the mean's
  each). ``check_residual=True`` adds one pass over ``D_r`` (a JVP and a
  VJP per sample) for the exact retain system's relative residual
  ``‖(A_r + λI) x̂_r + J_rᵀ r_r‖ / ‖J_rᵀ r_r‖``.

  Attributes:
    cotangents: ``s ≥ 1`` reverse passes per sample for the sketch.
    seed: the cotangents' random seed.
    check_residual: compute the exact retain residual (one more pass).
  """
  name: ClassVar[str] = "sketch"
  cotangents: int = 2
  seed: int = 0
  check_residual: bool = False

  def check(self) -> None:
    super().check()
    validate.check_int("cotangents", self.cotangents, 1,
                       " (reverse passes per sample)")
    if not isinstance(self.check_residual, bool):
      raise ValueError("check_residual must be True or False, got "
                       f"{self.check_residual!r}.")

  def memory_bytes(self, shape: ProblemShape) -> int:
    """:class:`ParameterSpace`'s five ``P×P`` matrices and the sketch's
    two halves."""
    return 7 * shape.p * shape.p * SOLVE_DTYPES[self.solve_dtype]

  def flops(self, shape: ProblemShape) -> float:
    return (shape.n * self.cotangents * shape.p ** 2
            + 2 * shape.p ** 3 / 3 * (3 if self.cotangents % 2 == 0 else 1))

  def run(self, prob: Problem) -> Outcome:
    if prob.loss != "mse":
      raise ValueError("solver=Sketched(...) handles loss='mse'; for "
                       "loss='ce' use solver='primal' (exact) or 'cg' "
                       "(matrix-free).")
    res_fn, sd = RESIDUAL_FNS["mse"], self.solve_dtype
    sk = kernels.sketched_gram(
        prob.apply_fn, prob.lin, prob.x_r, res_fn, y=prob.y_r,
        key=jax.random.PRNGKey(self.seed), cotangents=self.cotangents,
        solve_dtype=sd, return_outputs=True, **prob.blk)
    halves = tuple(sk.groups) if sk.groups.shape[0] == 2 else ()
    upd, v, deltas = _mse_primal(self, prob, sk.gram, sk.grad, sk.logits,
                                 halves)
    flat_dt = ravel_pytree(prob.lin)[0].dtype
    approx = {"method": "random-cotangent sketch of A_r",
              "cotangents": self.cotangents, "seed": self.seed,
              "split_half_error": None, "exact_retain_residual": None}
    with kernels.dtype_scope(sd):
      if halves:
        approx["split_half_error"] = float(
            jnp.linalg.norm(deltas[0] - deltas[1])
            / (2 * jnp.linalg.norm(upd.delta)))
    if self.check_residual:
      approx["exact_retain_residual"] = _exact_retain_residual(
          prob, upd.x_retrain, sk.grad)
    return Outcome(upd.delta.astype(flat_dt), v,
                   tuple(_linear_report(i) for i in upd.infos), upd.infos,
                   approximation=approx)


@dataclasses.dataclass(frozen=True)
class SketchedKernel(Solver):
  """A random-cotangent sketch in kernel space, for ``P`` whose ``P×P``
  does not fit (approximate).

  Each retained sample is seen through ``s = cotangents`` random output
  directions ``v_{ik} = z_{ik}/√s`` (Rademacher ``z``): ``N_r·s`` explicit
  rows ``S_r`` with ``v_{ik}ᵀ J_i``
  (:func:`fastntk_jax.core.kernels.sketched_jacobian`), unbiased for
  ``A_r`` (``E[S_rᵀS_r] = J_rᵀJ_r``); the forget set's Jacobian ``J_f``
  (``N_f·C`` rows) and its residuals stay exact. With ``T = [S_r; J_f]``,
  ``K = TTᵀ`` (``R×R``, ``R = N_r·s + N_f·C``; no ``P×P`` matrix)::

      x_r = −S_rᵀ (S_rS_rᵀ + λI)⁻¹ (ρ_r + S_r d)      (default)
      V   = J_f (x_r + d) + r_f
      Δ   = Tᵀ (K + λI)⁻¹ [0; V]                       (push-through)

  ``ρ_{ik} = v_{ik}ᵀ r_i`` are the retained residuals through the same
  directions, and ``d = w_0 − lin`` (0 when the anchor is the linearisation
  point): ``x_r`` is the linear retrain on the sketched outputs, which lies
  in the rows' span. That is the form for ``N·s ≪ P`` (ViT-Base prompts,
  ``P ≈ 10⁵``), where the exact gradient ``J_rᵀ r_r`` has most of its mass
  outside the sketch and :class:`Sketched`'s form would move the parameters
  by ``−J_rᵀ r_r / λ`` there. ``exact_gradient=True`` keeps that form
  instead (exact ``J_rᵀ r_r`` with one more reverse pass; ``x_r`` by the
  Woodbury identity): then the update equals :class:`Sketched`'s with the
  same ``seed`` and ``cotangents``, to rounding, which is what ``N ≫ P``
  wants. Never chosen by ``"auto"``; needs ``damping > 0`` and
  ``loss="mse"``. Memory: the rows (``R·P`` in the model's dtype) and
  ``R×R`` matrices in ``solve_dtype``.

  Attributes:
    cotangents: ``s ≥ 1`` reverse passes per retained sample.
    seed: the cotangents' random seed.
    exact_gradient: use the exact ``J_rᵀ r_r`` (:class:`Sketched`'s form).
    solve_dtype: dtype of the ``R×R`` kernel and of every product with the
      rows (the rows stay in the model's dtype and are cast block by block).
  """
  name: ClassVar[str] = "sketch_dual"
  cotangents: int = 1
  seed: int = 0
  exact_gradient: bool = False
  solve_dtype: str = "float64"

  #: Rows per block of the products with the rows.
  ROW_BLOCK: ClassVar[int] = 2048

  def check(self) -> None:
    super().check()
    validate.check_int("cotangents", self.cotangents, 1,
                       " (reverse passes per sample)")
    if not isinstance(self.exact_gradient, bool):
      raise ValueError("exact_gradient must be True or False, got "
                       f"{self.exact_gradient!r}.")

  def _bytes(self, rows: int, p: int, itemsize: int) -> int:
    """The rows, and the kernel, its damped copy and its factor."""
    return rows * p * itemsize + 3 * rows * rows * SOLVE_DTYPES[
        self.solve_dtype]

  def memory_bytes(self, shape: ProblemShape) -> int:
    """With every sample retained (``N·s`` rows): ``D_f``'s ``C`` rows a
    sample are added, and checked against the budget, by :meth:`run`."""
    return self._bytes(shape.n * self.cotangents, shape.p, shape.itemsize)

  def flops(self, shape: ProblemShape) -> float:
    r = shape.n * self.cotangents
    return r * r * shape.p + r ** 3 / 3

  def _check_problem(self, prob: Problem) -> None:
    if prob.loss != "mse":
      raise ValueError("solver=SketchedKernel(...) handles loss='mse'; for "
                       "loss='ce' use solver='primal', 'dual' or 'cg'.")
    if not prob.damping > 0:
      raise ValueError("solver=SketchedKernel(...) needs damping > 0 (its "
                       "solves use the Woodbury identity, which divides by "
                       "it); pass damping=... > 0.")
    p, itemsize = prob.shape.p, prob.shape.itemsize
    rows = prob.n_r * self.cotangents + prob.n_f * prob.shape.c
    need = self._bytes(rows, p, itemsize)
    if need > prob.memory_budget:
      raise ValueError(
          f"solver=SketchedKernel needs about {need / 2**30:.3g} GiB for "
          f"R = N_r·s + N_f·C = {rows} rows of P = {p} and R×R kernels, over "
          f"memory_budget={prob.memory_budget} bytes "
          f"({prob.memory_budget / 2**30:.3g} GiB). Raise memory_budget=... "
          "if the memory is there, or use fewer cotangents, a smaller "
          "forget set per call, or solver='cg' (matrix-free).")

  def run(self, prob: Problem) -> Outcome:
    self._check_problem(prob)
    p = prob.shape.p
    res_fn, sd = RESIDUAL_FNS["mse"], self.solve_dtype
    sk = kernels.sketched_jacobian(
        prob.apply_fn, prob.lin, prob.x_r, res_fn, y=prob.y_r,
        key=jax.random.PRNGKey(self.seed), cotangents=self.cotangents,
        solve_dtype=sd, return_outputs=True,
        exact_gradient=self.exact_gradient, **prob.blk)
    j_f = np.asarray(kernels.jacobian(prob.apply_fn, prob.lin, prob.x_f,
                                      **prob.blk)) if prob.n_f else (
        np.zeros((0, p), sk.rows.dtype))
    f0_f = kernels.predict(prob.apply_fn, prob.lin, prob.x_f, mesh=prob.mesh)
    _check_logits(jnp.concatenate([sk.logits, f0_f]), prob.linearize_at)
    r_f = res_fn(f0_f, jnp.asarray(prob.y_f)).reshape(-1)
    lam = float(prob.damping)
    with kernels.dtype_scope(sd):
      dt = np.dtype(sd)
      ops = _RowOps(self.ROW_BLOCK, dt)
      s_r, parts = sk.rows, (sk.rows, j_f)
      n_s = s_r.shape[0]
      k_all = ops.gram(parts)
      s_d = None if prob.shift is None else ops.matvec((s_r,), prob.shift)
      if self.exact_gradient:  # Woodbury: b_r is not in the rows' span
        b_r = sk.grad if s_d is None else sk.grad + ops.rmatvec((s_r,), s_d)
        z, info_r = psd_solve(k_all[:n_s, :n_s], ops.matvec((s_r,), b_r),
                              lam)
        x_r = -(b_r - ops.rmatvec((s_r,), z)) / lam
      else:  # push-through: the retrain on the sketched outputs
        rho = jnp.asarray(sk.residuals, dt)
        z, info_r = psd_solve(k_all[:n_s, :n_s],
                              rho if s_d is None else rho + s_d, lam)
        x_r = -ops.rmatvec((s_r,), z)
      u = x_r if prob.shift is None else x_r + prob.shift
      v = ops.matvec((j_f,), u) + jnp.asarray(r_f, dt)
      w, info = psd_solve(k_all, jnp.concatenate([jnp.zeros(n_s, dt), v]),
                          lam)
      delta = ops.rmatvec(parts, w)
      infos = (info_r, info)
      _raise_if_failed(infos, prob.damping, self.name)
      v_norm = jnp.linalg.norm(v)
    approx = {"method": "random-cotangent sketch of J_r, kernel space",
              "cotangents": self.cotangents, "seed": self.seed,
              "exact_gradient": self.exact_gradient,
              "rows": n_s + j_f.shape[0], "split_half_error": None,
              "exact_retain_residual": None}
    flat_dt = ravel_pytree(prob.lin)[0].dtype
    return Outcome(delta.astype(flat_dt), v_norm,
                   tuple(_linear_report(i) for i in infos), infos,
                   approximation=approx)


class _RowOps:
  """Products with row blocks kept in the model's dtype (host arrays), each
  block cast to ``dtype`` (float64 by default) for the product."""

  def __init__(self, block: int, dtype):
    self.block, self.dtype = int(block), np.dtype(dtype)
    hi = jax.lax.Precision.HIGHEST
    self._mv = jax.jit(lambda a, x: jnp.matmul(a.astype(x.dtype), x,
                                               precision=hi))
    self._rmv = jax.jit(lambda a, y: jnp.matmul(y, a.astype(y.dtype),
                                                precision=hi))
    self._mm = jax.jit(lambda a, b: jnp.matmul(
        a.astype(self.dtype), b.astype(self.dtype).T, precision=hi))

  def _chunks(self, parts):
    for part in parts:
      for s in range(0, part.shape[0], self.block):
        yield part[s:s + self.block]

  def matvec(self, parts, x) -> jax.Array:
    """``[A_1; A_2; …] x``."""
    x = jnp.asarray(x, self.dtype)
    out = [self._mv(a, x) for a in self._chunks(parts)]
    return jnp.concatenate(out) if out else jnp.zeros((0,), self.dtype)

  def rmatvec(self, parts, y) -> jax.Array:
    """``[A_1; A_2; …]ᵀ y``."""
    y = jnp.asarray(y, self.dtype)
    total, start = None, 0
    for a in self._chunks(parts):
      term = self._rmv(a, y[start:start + a.shape[0]])
      total = term if total is None else total + term
      start += a.shape[0]
    return total

  def gram(self, parts) -> jax.Array:
    """``T Tᵀ`` for ``T = [A_1; A_2; …]``, upper blocks computed, symmetric."""
    chunks = list(self._chunks(parts))
    sizes = [a.shape[0] for a in chunks]
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    k = np.zeros((offs[-1], offs[-1]), self.dtype)
    for i, a in enumerate(chunks):
      for j in range(i, len(chunks)):
        blk = np.asarray(self._mm(a, chunks[j]))
        k[offs[i]:offs[i + 1], offs[j]:offs[j + 1]] = blk
        if j != i:
          k[offs[j]:offs[j + 1], offs[i]:offs[i + 1]] = blk.T
    return jnp.asarray(k)


def _exact_retain_residual(prob: Problem, x_r, g_r) -> float:
  """``‖(A_r + λI) x_r + b_r‖ / ‖b_r‖`` with the exact ``A_r`` (one
  matrix-free pass over ``D_r``, two with an anchor) and ``b_r = J_rᵀ r_r``
  at the anchor; the products in the model's dtype."""
  mv = cg.gauss_newton_matvec(prob.apply_fn, prob.lin, prob.x_r, **prob.blk)
  m_dt = ravel_pytree(prob.lin)[0].dtype
  a_x = mv(x_r.astype(m_dt))
  a_d = None if prob.shift is None else mv(prob.shift.astype(m_dt))
  with kernels.dtype_scope(str(g_r.dtype)):
    b = g_r if a_d is None else g_r + jnp.asarray(a_d, g_r.dtype)
    res = jnp.asarray(a_x, g_r.dtype) + prob.damping * x_r + b
    return float(jnp.linalg.norm(res) / jnp.linalg.norm(b))


def _run_ce_primal(solver, prob: Problem, solve, keep: bool) -> Outcome:
  """The linearised cross-entropy retrain in parameter space: Newton on ``D``,
  then on ``D_r`` (``D_f`` weighted 0) warm-started from ``x_D``."""
  apply_fn, lin, blk = prob.apply_fn, prob.lin, prob.blk
  sd = solver.solve_dtype
  dt = validate.check_solve_dtype(sd)
  x_all, y_all = _all_data(prob)
  f0 = kernels.predict(apply_fn, lin, x_all, mesh=prob.mesh)
  _check_logits(f0, prob.linearize_at)
  if keep:
    jac = kernels.jacobian(apply_fn, lin, x_all, **blk)
    with kernels.dtype_scope(sd):
      op = newton.DenseJacobian(jac, prob.shape.c, ggn_dtype=dt)
    del jac
  else:
    op = newton.PassJacobian(apply_fn, lin, x_all, **blk)
  with kernels.dtype_scope(sd):
    b = f0.astype(dt)
    if prob.shift is not None:
      b = b + op.matvec(prob.shift)
    weights = jnp.concatenate([jnp.ones((prob.n_r,), dt),
                               jnp.zeros((prob.n_f,), dt)])
  loss, opts = objective.cross_entropy, _newton_opts(solver)
  x_d, rep_d = solve(op, b, y_all, loss, prob.damping, **opts)
  x_r, rep_r = solve(op, b, y_all, loss, prob.damping, weights=weights,
                     x0=x_d, **opts)
  with kernels.dtype_scope(sd):
    delta = (x_r - x_d).astype(ravel_pytree(lin)[0].dtype)
  return Outcome(delta, None, (rep_d, rep_r), (), keep)


@dataclasses.dataclass(frozen=True)
class Auto:
  """Chooses the cheapest dense solver that fits, else the matrix-free one.

  Of :class:`KernelSpace` and :class:`ParameterSpace` (with this
  ``solve_dtype``), those whose :meth:`~Solver.memory_bytes` fit
  ``memory_budget`` compete on :meth:`~Solver.flops` (ties go to the kernel
  space, the paper's form). When neither fits, :class:`MatrixFree`: its step
  count depends on the conditioning, so it is chosen only then. For
  ``"ce"`` the dense terms recur at every Newton step; the parameter-space
  solver then also keeps the Jacobian when it fits beside its matrices.

  Attributes:
    memory_budget: bytes the dense matrices may take (None: the budget
      :func:`fastntk_jax.unlearn` was given).
    solve_dtype: the chosen solver's ``solve_dtype``.
  """
  name: ClassVar[str] = "auto"
  memory_budget: int | None = None
  solve_dtype: str = "float64"

  def check(self) -> None:
    validate.check_solve_dtype(self.solve_dtype)
    if self.memory_budget is not None:
      validate.check_memory_budget(self.memory_budget)

  def select(self, shape: ProblemShape,
             memory_budget: int | None = None) -> Choice:
    """The :class:`Choice` for a problem of this shape."""
    budget = self.memory_budget
    if budget is None:
      budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    dense = (KernelSpace(solve_dtype=self.solve_dtype),
             ParameterSpace(solve_dtype=self.solve_dtype))
    est = tuple(s.estimate(shape, budget) for s in dense)
    fits = [(s, e) for s, e in zip(dense, est) if e.fits]
    if not fits:
      return Choice(MatrixFree(solve_dtype=self.solve_dtype), est, budget,
                    "no dense solver fits the memory budget")
    best, e = min(fits, key=lambda se: se[1].flops)
    other = "the other does not fit" if len(fits) == 1 else (
        "fewer flops than the other")
    return Choice(best, est, budget,
                  f"{best.name}: {e.bytes} bytes fit, {other}")


def as_solver(solver) -> Solver | Auto:
  """A :class:`Solver` or :class:`Auto` from an object or a name
  (``"auto"``, ``"dual"``, ``"primal"``, ``"cg"``), options checked."""
  if isinstance(solver, str):
    names = {"auto": Auto, "dual": KernelSpace, "primal": ParameterSpace,
             "cg": MatrixFree, "sketch": Sketched,
             "sketch_dual": SketchedKernel}
    if solver not in names:
      raise ValueError(f"solver must be one of {tuple(names)} or a solver "
                       f"object (fastntk_jax.KernelSpace(...) etc.), got "
                       f"{solver!r}.")
    solver = names[solver]()
  if not isinstance(solver, (Solver, Auto)):
    raise TypeError(
        f"solver must be a name or a solver object (fastntk_jax.Auto, "
        f"KernelSpace, ParameterSpace, MatrixFree), got "
        f"{type(solver).__name__}.")
  solver.check()
  return solver


def check_budget(solver: Solver, shape: ProblemShape, budget: int) -> None:
  """Refuses an explicitly chosen dense solver whose matrices exceed the
  budget, naming the alternatives."""
  if isinstance(solver, (MatrixFree, SketchedKernel)):
    # SketchedKernel checks its exact rows (N_f·C of them) when it runs,
    # before any pass over the data.
    return
  need = solver.memory_bytes(shape)
  if need <= budget:
    return
  other = (ParameterSpace if isinstance(solver, KernelSpace)
           else KernelSpace)(solve_dtype=solver.solve_dtype)
  other_need = other.memory_bytes(shape)
  form = "P×P" if other.name == "primal" else "N·C×N·C"
  hint = (f"solver={other.name!r} needs only {form} matrices, {other_need} "
          "bytes here, within the budget" if other_need <= budget
          else f"solver={other.name!r} ({form}) would need {other_need} "
          "bytes, over the budget too; use solver='cg' (matrix-free)")
  raise ValueError(
      f"solver={solver.name!r} needs about {need} bytes "
      f"({need / 2**30:.3g} GiB) of dense matrices for N={shape.n} samples, "
      f"C={shape.c}, P={shape.p}, over memory_budget={budget} bytes "
      f"({budget / 2**30:.3g} GiB). Raise memory_budget=... if the memory is "
      f"there; {hint}.")


def choose_solver(n: int, c: int, p: int, itemsize: int = 4,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET,
                  damping: float = 1.0, precision_itemsize: int = 8,
                  loss: str = "mse") -> str:
  """The name of the solver ``solver="auto"`` runs (:meth:`Auto.select`);
  ``precision_itemsize`` 8 or 4 is the solve dtype's size."""
  sd = "float64" if precision_itemsize == 8 else "float32"
  shape = ProblemShape(n, c, p, itemsize, loss, damping)
  return Auto(memory_budget, sd).select(shape).solver.name
