"""``unlearn``: Fast-NTK's one-shot forgetting update on PEFT parameters.

Two points define the linearised problem (:mod:`fastntk_jax.newton`):

* the **anchor** ``w_0`` (``anchor=``): the centre of the ridge term
  ``(λ/2)‖w − w_0‖²``, i.e. the PEFT parameters fine-tuning started from;
* the **linearisation point** (``linearize_at="w_D"``, the trained
  ``params``, or ``"w_0"``, the anchor): where ``J`` and ``f`` are taken.

``loss="mse"`` applies Eq. (1) of Fast-NTK (:mod:`fastntk_jax.update`) with the
linear model's residual at the anchor; ``loss="ce"`` solves the linearised
cross-entropy problem on ``D`` and on ``D_r`` by Newton's method and applies
the difference of the two solutions. Both are ``w_r = w_D + (x_{D_r} − x_D)``
with ``x_S`` the minimiser of ``Σ_{i∈S} ℓ_i + (λ/2)‖x‖²`` over the linearised
model; for squared error that is exactly Eq. (1).
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
from jax.flatten_util import ravel_pytree

from fastntk_jax import cg
from fastntk_jax import kernels
from fastntk_jax import newton
from fastntk_jax import objective
from fastntk_jax import update
from fastntk_jax import validate
from fastntk_jax.newton import NewtonReport
from fastntk_jax.solve import SolveInfo

__all__ = [
    "DEFAULT_DAMPING",
    "DEFAULT_MEMORY_BUDGET",
    "RESIDUAL_FNS",
    "UnlearnResult",
    "UnlearningError",
    "choose_solver",
    "unlearn",
]

#: λ, chosen from the measurements in docs/defaults.md.
DEFAULT_DAMPING = 1.0
#: Bytes the dense matrices of a solver may take before it is refused.
DEFAULT_MEMORY_BUDGET = 4 * 2**30

_SOLVERS = ("auto", "dual", "primal", "cg")
_PRECISIONS = {"float64": 8, "float32": 4}


class UnlearningError(FloatingPointError):
  """A factorisation failed, a solve did not converge, or the update is not
  finite."""


class UnlearnResult(NamedTuple):
  """Result of :func:`unlearn` (a pytree).

  Attributes:
    params: ``w_r``, same tree structure and dtypes as ``params``.
    solver: ``"dual"``, ``"primal"`` or ``"cg"``: the solver that ran.
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
    solves: a :class:`fastntk_jax.newton.NewtonReport` per solve: for
      ``"ce"`` the Newton solves on ``D`` and on ``D_r``, in that order; for
      ``"mse"`` Eq. (1)'s two linear solves (one Newton step each).
    kept_jacobian: the Jacobian over ``D`` was held in memory (``"ce"``
      with ``"primal"``); otherwise each Newton step recomputed what it needs.
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


def _dense_bytes(solver: str, n: int, c: int, p: int, itemsize: int,
                 damping: float = 1.0, precision_itemsize: int = 8,
                 loss: str = "mse") -> int:
  """Memory of a solver's dense matrices (its dominant term).

  ``"mse"``: dual — Θ on the host and on the device, a damped copy and its
  Cholesky factor (λ > 0); for λ = 0 also the re-assembled Θ and its
  eigenvectors, all in the model's dtype (``itemsize``); primal — ``A_r``,
  ``A_f``, their sum, a damped copy and its factor, in
  ``precision_itemsize``. ``"ce"``: dual — Θ, its copy in the solve
  precision, the ``D_r`` block, ``LᵀΘL + λI`` and its factor; primal — five
  ``P×P`` matrices (the Jacobian, when kept, is counted by
  :func:`_jacobian_bytes`). CG: four ``P``-vectors plus the right-hand sides.
  """
  if solver == "dual":
    if loss == "ce":
      return (n * c) ** 2 * (itemsize + 5 * precision_itemsize)
    return (4 if damping > 0 else 6) * (n * c) ** 2 * itemsize
  if solver == "primal":
    return 5 * p * p * precision_itemsize
  return 8 * p * itemsize


def _jacobian_bytes(n: int, c: int, p: int, itemsize: int,
                    precision_itemsize: int) -> int:
  """The kept Jacobian of the cross-entropy primal: computed in the model's
  dtype, stored in the solve precision (both exist while it is converted)."""
  return n * c * p * (itemsize + precision_itemsize)


def _flops(solver: str, n: int, c: int, p: int) -> float:
  """Leading-order flop counts of the dense solvers (beyond the Jacobian);
  per Newton step for the cross-entropy solves."""
  if solver == "dual":
    # kernel contraction N²C²P, Cholesky of the N·C system
    return (n * c) ** 2 * p + (n * c) ** 3 / 3
  # Gram accumulation N·C·P², two P×P Cholesky factorisations
  return n * c * p * p + 2 * p ** 3 / 3


def choose_solver(n: int, c: int, p: int, itemsize: int = 4,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET,
                  damping: float = 1.0, precision_itemsize: int = 8,
                  loss: str = "mse") -> str:
  """The solver ``solver="auto"`` runs: the cheapest dense one that fits.

  Cost model (leading terms beyond the Jacobian rows, which every solver
  needs): dual ``(NC)²P + (NC)³/3`` flops, primal ``NCP² + 2P³/3``, with N
  samples, C logits, P PEFT parameters; for ``loss="ce"`` the same terms
  recur at every Newton step (the dual refactors an ``N·C`` system, the
  primal re-forms ``JᵀHJ``). Memory: :func:`_dense_bytes`, plus for the
  cross-entropy primal the Jacobian ``N·C·P`` (model dtype while it is
  computed, then in the solve precision) when it fits beside the
  ``P×P`` matrices (else every Newton step recomputes it: still preferred to
  CG, whose every product is a pass over the data). Of those that fit
  ``memory_budget`` the one with fewer flops wins (ties go to the dual, the
  paper's form). When neither fits, ``"cg"``: matrix-free conjugate
  gradients (Newton-CG for ``"ce"``), ``O(P)`` memory, each product one
  linearised pass over the data; its step count depends on the conditioning,
  so it is chosen only when no dense form fits.
  """
  need = {s: _dense_bytes(s, n, c, p, itemsize, damping, precision_itemsize,
                          loss) for s in ("dual", "primal")}
  fits = [s for s in ("dual", "primal") if need[s] <= memory_budget]
  if not fits:
    return "cg"
  return min(fits, key=lambda s: _flops(s, n, c, p))


def _mse_residual(logits: jax.Array, y: jax.Array) -> jax.Array:
  return logits - jax.nn.one_hot(y, logits.shape[1], dtype=logits.dtype)


#: ``loss -> r(logits, y)``, Eq. (1)'s residual ``f − onehot(y)`` at the
#: linearisation point (module-level, so that compiled passes are reused).
RESIDUAL_FNS = {"mse": _mse_residual}


def _check_logits(f0, linearize_at) -> None:
  if not bool(jnp.all(jnp.isfinite(f0))):
    raise ValueError(
        f"apply_fn returns NaN or infinite logits at the linearisation point "
        f"({linearize_at}); check the model and its inputs there.")


def unlearn(apply_fn: Callable[[Any, Any], jax.Array], params, retain,
            forget, *, anchor=None, linearize_at: str = "w_D",
            damping: float = DEFAULT_DAMPING, loss: str = "mse",
            solver: str = "auto", rcond: float | None = None,
            implementation: int = 1, block_size: int | None = None,
            memory_budget: int = DEFAULT_MEMORY_BUDGET,
            precision: str = "float64", cg_tol: float = 1e-5,
            cg_max_steps: int | None = None,
            newton_tol: float | None = None, newton_max_steps: int = 100,
            raise_on_failure: bool = True, mesh=None,
            **legacy) -> UnlearnResult:
  r"""Forgets ``forget``: ``w_r = w_D + (x_{D_r} − x_D)`` (Fast-NTK).

  ``x_S`` minimises the linearised model's loss on ``S`` plus
  ``(λ/2)‖w − w_0‖²`` (:mod:`fastntk_jax.newton`); for ``loss="mse"`` this is
  Eq. (1), ``w_r = w_D + P J_fᵀ M V`` (:mod:`fastntk_jax.update`). It is
  computed over the pytree ``params`` only — pass the PEFT parameters and an
  ``apply_fn`` that closes over the frozen rest
  (:func:`fastntk_jax.peft.make_apply_fn`).

  Example::

    apply_fn, peft, frozen = make_apply_fn(model, variables, predicate)
    res = unlearn(apply_fn, peft, (x_r, y_r), (x_f, y_f),
                  anchor=peft_before_finetuning, loss="ce", damping=1.0)
    variables = merge(res.params, frozen)

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (N, C)``; each sample's output
      must depend on that sample alone (BatchNorm in inference mode).
    params: ``w_D``, the PEFT parameters after fine-tuning on ``D``.
    retain: ``(x, y)``, ``D_r``; ``y`` integer labels in ``[0, C)``.
    forget: ``(x, y)``, ``D_f``; non-empty, inputs shaped like ``retain``'s.
    anchor: ``w_0``, the PEFT parameters fine-tuning started from: the centre
      of the ridge term. Give it whenever you have it. None centres the ridge
      at ``params`` (the linear model is then "trained" from ``w_D``), which
      forgets less: on the defaults sweep (ResNet-20 BatchNorm + head, 5
      seeds, λ = 1) cross-entropy models keep 59 % of ``D_f`` (0 % with the
      anchor) and MSE models 9 % (2.4 %); docs/defaults.md.
    linearize_at: ``"w_D"`` (default: ``J`` and ``f`` at ``params``) or
      ``"w_0"`` (at ``anchor``).
    damping: λ ≥ 0, weighting ``½‖w − w_0‖²`` against the *sum* of per-sample
      losses (the same λ means the same for both losses and any N; for
      ``"mse"`` it is the constant added to every kernel diagonal). 0 means
      the ``λ → 0⁺`` limit (pseudo-inverses with cutoff ``rcond``; ``"mse"``
      only — the cross-entropy problem needs λ > 0).
    loss: the fine-tuning loss of the model: ``"mse"`` (squared error to
      one-hot targets, Eq. (1)) or ``"ce"`` (softmax cross-entropy: the
      linearised cross-entropy problem, solved by Newton's method).
    solver: ``"dual"`` (kernel space, ``N·C`` systems, the paper's),
      ``"primal"`` (parameter space, ``P×P`` systems), ``"cg"`` (matrix-free:
      conjugate gradients, Newton-CG for ``"ce"``, with Jacobian–vector
      products, for when neither dense form fits) or ``"auto"`` (by
      :func:`choose_solver`).
    rcond: relative eigenvalue cutoff for ``damping=0``.
    implementation: neural-tangents NTK implementation for the dual kernel
      when its Jacobians do not fit in memory (:func:`fastntk_jax.kernels.ntk`
      otherwise contracts Jacobians computed once): 1 (Jacobian contraction)
      or 2 (NTK-vector products).
    block_size: samples per block of Jacobian work (None: automatic).
    memory_budget: bytes the dense matrices may take; a solver over it is
      refused before any work starts.
    precision: ``"float64"`` or ``"float32"``: dtype of the ``P×P`` matrices
      and of the solves; Jacobians stay in the model's dtype.
    cg_tol: relative residual at which ``"cg"`` stops (``"mse"``).
    cg_max_steps: iteration cap per CG solve (None: ``min(10·P, 1000)``).
    newton_tol: relative gradient norm ``‖∇Φ_S‖/max(‖∇Φ_S(0)‖, λ‖x‖)`` at which the
      ``"ce"`` Newton solves stop (None: 1e-9 when the solve's products are
      float64 — kept Jacobian or kernel, ``precision="float64"`` — else
      1e-5, e.g. model passes of a float32 model:
      :func:`fastntk_jax.newton.default_tol`).
    newton_max_steps: Newton steps per solve at most (``"ce"``).
    raise_on_failure: a solve that does not converge raises
      :class:`UnlearningError` (default); False returns the last iterate with
      ``converged=False`` and the reports in ``solves``.
    mesh: a 1-D :class:`jax.sharding.Mesh` with axis ``"data"`` to shard the
      Jacobian and kernel work over; None uses every local device
      (:func:`fastntk_jax.kernels.default_mesh`). Checked before any work.

  Returns:
    :class:`UnlearnResult`.

  Raises:
    TypeError, ValueError: bad input, before heavy work.
    UnlearningError: a factorisation failed (e.g. λ too small for float32) or
      a solve did not converge.

  References:
    Li et al., Fast-NTK, https://arxiv.org/abs/2312.14923, Eq. (1);
    Golatkar et al., ECCV 2020, https://arxiv.org/abs/2003.02960.
  """
  t0 = time.perf_counter()
  prob = _validate(apply_fn, params, retain, forget, anchor, linearize_at,
                   damping, loss, solver, implementation, rcond, block_size,
                   precision, cg_tol, cg_max_steps, newton_tol,
                   newton_max_steps, memory_budget, mesh, legacy)
  if prob.loss == "mse":
    out = _mse_update(prob, rcond, implementation, cg_tol, cg_max_steps)
  else:
    out = _ce_update(prob, implementation, newton_tol, newton_max_steps,
                     cg_max_steps)
  delta, v_norm, reports, infos, kept = out
  converged = all(r.converged for r in reports)
  if not converged and raise_on_failure:
    _raise_not_converged(prob.solver, reports)
  if not bool(jnp.all(jnp.isfinite(delta))):
    raise UnlearningError(
        "the update is not finite although every solve reported success; "
        "check apply_fn for NaNs at the linearisation point.")
  flat_w, unravel = ravel_pytree(params)
  new_params = jax.tree_util.tree_map(
      lambda w, d: (w + d).astype(jnp.result_type(w)), params,
      unravel(delta.astype(flat_w.dtype)))
  jax.block_until_ready(new_params)
  nan = float("nan")
  return UnlearnResult(
      params=new_params, solver=prob.solver, damping=prob.damping,
      loss=prob.loss, linearized_at=linearize_at,
      anchored_at="w_D" if anchor is None else "w_0",
      num_retain=prob.n_r, num_forget=prob.n_f, num_outputs=prob.c,
      num_params=prob.p, delta_norm=float(jnp.linalg.norm(delta)),
      forget_residual_norm=nan if v_norm is None else float(v_norm),
      relative_residual=max(float(r.grad_norm) for r in reports),
      cond=max([float(i.cond) for i in infos] or [nan]),
      rank=int(infos[-1].rank) if infos else prob.p,
      seconds=time.perf_counter() - t0,
      cg_steps=sum(r.cg_steps for r in reports), converged=converged,
      solves=tuple(reports), kept_jacobian=kept)


class _Problem(NamedTuple):
  """What :func:`unlearn` checked, and what it derived from it."""
  apply_fn: Any
  lin: Any
  shift: jax.Array | None  # ravel(w_0) − ravel(lin), None when they coincide
  x_r: Any
  y_r: np.ndarray
  x_f: Any
  y_f: np.ndarray
  damping: float
  loss: str
  solver: str
  precision: str
  n_r: int
  n_f: int
  c: int
  p: int
  keep_jacobian: bool
  linearize_at: str
  blk: dict


def _validate(apply_fn, params, retain, forget, anchor, linearize_at, damping,
              loss, solver, implementation, rcond, block_size, precision,
              cg_tol, cg_max_steps, newton_tol, newton_max_steps,
              memory_budget, mesh, legacy) -> _Problem:
  """Every check of :func:`unlearn`, before any heavy work."""
  if not callable(apply_fn):
    raise TypeError("apply_fn must be callable as apply_fn(params, x).")
  lin, anc = validate.check_points(params, anchor, linearize_at, legacy)
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
  loss = validate.check_loss(loss)
  damping = validate.check_damping(damping, positive=loss == "ce")
  if solver not in _SOLVERS:
    raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}.")
  if isinstance(implementation, bool) or implementation not in (1, 2):
    raise ValueError(f"implementation must be 1 or 2, got {implementation!r}.")
  if rcond is not None and not (math.isfinite(float(rcond)) and rcond >= 0):
    raise ValueError(f"rcond must be a finite float ≥ 0 or None, got {rcond}.")
  validate.check_positive_int_or_none("block_size", block_size)
  mesh = kernels._resolve_mesh(mesh)
  if precision not in _PRECISIONS:
    raise ValueError(f"precision must be one of {tuple(_PRECISIONS)}, got "
                     f"{precision!r}.")
  validate.check_tolerance("cg_tol", cg_tol)
  validate.check_positive_int_or_none("cg_max_steps", cg_max_steps)
  validate.check_tolerance("newton_tol", newton_tol, allow_none=True)
  validate.check_positive_int_or_none("newton_max_steps", newton_max_steps)
  validate.check_memory_budget(memory_budget)
  c = kernels.num_outputs(apply_fn, params, x_r)
  validate.check_labels("retain", y_r, c)
  validate.check_labels("forget", y_f, c)
  flat_w, _ = ravel_pytree(params)
  p = int(flat_w.shape[0])
  n_r, n_f = int(y_r.shape[0]), int(y_f.shape[0])
  n = n_r + n_f
  itemsize = jnp.dtype(flat_w.dtype).itemsize
  p_item = _PRECISIONS[precision]
  if solver == "auto":
    solver = choose_solver(n, c, p, itemsize, memory_budget, damping, p_item,
                           loss)
  elif solver != "cg":
    _check_budget(solver, n, c, p, itemsize, damping, p_item, loss,
                  memory_budget)
  keep = loss == "ce" and solver == "primal" and (
      _dense_bytes("primal", n, c, p, itemsize, damping, p_item, loss)
      + _jacobian_bytes(n, c, p, itemsize, p_item) <= memory_budget)
  shift = None
  if anc is not lin:
    with kernels.precision_scope(precision):
      shift = (ravel_pytree(anc)[0].astype(_dtype(precision))
               - ravel_pytree(lin)[0].astype(_dtype(precision)))
  return _Problem(apply_fn, lin, shift, x_r, y_r, x_f, y_f, damping, loss,
                  solver, precision, n_r, n_f, c, p, keep, linearize_at,
                  {"block_size": block_size, "mesh": mesh})


def _dtype(precision: str):
  return jnp.float64 if precision == "float64" else jnp.float32


def _check_budget(solver, n, c, p, itemsize, damping, p_item, loss, budget):
  need = _dense_bytes(solver, n, c, p, itemsize, damping, p_item, loss)
  if need <= budget:
    return
  other = "primal" if solver == "dual" else "dual"
  other_need = _dense_bytes(other, n, c, p, itemsize, damping, p_item, loss)
  shape = "P×P" if other == "primal" else "N·C×N·C"
  hint = (f"solver={other!r} needs only {shape} matrices, {other_need} "
          "bytes here, within the budget" if other_need <= budget
          else f"solver={other!r} ({shape}) would need {other_need} bytes, "
          "over the budget too; use solver='cg' (matrix-free)")
  raise ValueError(
      f"solver={solver!r} needs about {need} bytes ({need / 2**30:.3g} GiB) "
      f"of dense matrices for N={n} samples, C={c}, P={p}, over "
      f"memory_budget={budget} bytes ({budget / 2**30:.3g} GiB). Raise "
      f"memory_budget=... if the memory is there; {hint}.")


def _linear_report(info) -> NewtonReport:
  """A linear solve of Eq. (1) as one Newton step of the quadratic problem."""
  ok = bool(info.ok)
  return NewtonReport(ok, "converged" if ok else "factorisation_failed", 1,
                      float(info.relative_residual), float("nan"))


def _mse_update(prob: _Problem, rcond, implementation, cg_tol, cg_max_steps):
  """Eq. (1) with the linear model's residual at the anchor.

  With ``d = w_0 − w_lin`` that residual is ``r = f(w_lin) − Y + J d``:
  a JVP pass for the dual and CG forms, ``Jᵀr + A d`` from the Grams for
  the primal.
  """
  apply_fn, lin, blk = prob.apply_fn, prob.lin, prob.blk
  x_r, y_r, x_f, y_f = prob.x_r, prob.y_r, prob.x_f, prob.y_f
  n_r, n_f, c, lam = prob.n_r, prob.n_f, prob.c, prob.damping
  _, unravel = ravel_pytree(lin)
  res_fn = RESIDUAL_FNS["mse"]
  if prob.solver == "primal":
    # One pass per set gives the logits at w_lin, the residuals and the Grams.
    a_r, b_r, f0_r = kernels.gram(apply_fn, lin, x_r, res_fn, y=y_r,
                                  precision=prob.precision,
                                  return_outputs=True, **blk)
    a_f, b_f, f0_f = kernels.gram(apply_fn, lin, x_f, res_fn, y=y_f,
                                  precision=prob.precision,
                                  return_outputs=True, **blk)
    _check_logits(jnp.concatenate([f0_r, f0_f]), prob.linearize_at)
    r_f = res_fn(f0_f, jnp.asarray(y_f)).reshape(-1)
    with kernels.precision_scope(prob.precision):
      rr_f = jnp.sum(jnp.asarray(r_f, a_f.dtype) ** 2)
      if prob.shift is not None:
        d = prob.shift.astype(a_f.dtype)
        rr_f = rr_f + 2 * d @ b_f + d @ (a_f @ d)
        b_r, b_f = b_r + a_r @ d, b_f + a_f @ d
      upd = update.parameter_space(a_r, a_f, b_r, b_f, lam, rcond)
      _raise_if_failed(upd.infos, lam, prob.solver)
      delta = upd.delta.astype(ravel_pytree(lin)[0].dtype)
      # ‖V‖, a diagnostic, from the Grams rather than another pass over D_f.
      v = update.forget_residual_norm(a_f, b_f, upd.x_retrain, rr_f)
    return delta, v, [_linear_report(i) for i in upd.infos], upd.infos, False

  f0_r = kernels.predict(apply_fn, lin, x_r, mesh=blk["mesh"])
  f0_f = kernels.predict(apply_fn, lin, x_f, mesh=blk["mesh"])
  _check_logits(jnp.concatenate([f0_r, f0_f]), prob.linearize_at)
  r_r = res_fn(f0_r, jnp.asarray(y_r))
  r_f = res_fn(f0_f, jnp.asarray(y_f))
  if prob.shift is not None:
    d = unravel(prob.shift.astype(ravel_pytree(lin)[0].dtype))
    r_r = r_r + kernels.jvp(apply_fn, lin, x_r, d, **blk)
    r_f = r_f + kernels.jvp(apply_fn, lin, x_f, d, **blk)
  if prob.solver == "dual":
    # One symmetric kernel over D = [D_r; D_f]: one compilation, upper blocks
    # only; then its three blocks.
    theta = kernels.ntk(apply_fn, lin, jnp.concatenate(
        [jnp.asarray(x_r), jnp.asarray(x_f)]), implementation=implementation,
                        **blk)
    k = n_r * c
    th_rr, th_rf, th_ff = theta[:k, :k], theta[:k, k:], theta[k:, k:]
    del theta
    upd = update.kernel_space(th_rr, th_rf, th_ff, r_r.reshape(-1),
                              r_f.reshape(-1), lam, rcond)
    _raise_if_failed(upd.infos, lam, prob.solver)
    g_r = kernels.vjp(apply_fn, lin, x_r, upd.coef_r.reshape(n_r, c), **blk)
    g_f = kernels.vjp(apply_fn, lin, x_f, upd.coef_f.reshape(n_f, c), **blk)
    delta = ravel_pytree(g_r)[0] + ravel_pytree(g_f)[0]
    v = jnp.linalg.norm(upd.v)
    return delta, v, [_linear_report(i) for i in upd.infos], upd.infos, False
  delta, v, reports = _cg_update(apply_fn, lin, x_r, x_f, r_r, r_f, lam,
                                 cg_tol, cg_max_steps, blk)
  return delta, jnp.linalg.norm(v), reports, (), False


def _cg_update(apply_fn, lin, x_r, x_f, r_r, r_f, damping, tol, max_steps,
               blk):
  """Eq. (1) in parameter space, matrix-free.

  ``x_r = −(A_r + λI)⁻¹ J_rᵀ r_r`` and ``w_r − w_D = (A + λI)⁻¹ J_fᵀ V`` with
  ``V = J_f x_r + r_f``, every ``A v`` a linearised pass over the data.
  """
  mv_r = cg.gauss_newton_matvec(apply_fn, lin, x_r, **blk)
  mv_f = cg.gauss_newton_matvec(apply_fn, lin, x_f, **blk)
  _, unravel = ravel_pytree(lin)
  g_r = ravel_pytree(kernels.vjp(apply_fn, lin, x_r, r_r, **blk))[0]
  x_ret, info_r = cg.cg_solve(mv_r, -g_r, damping=damping, tol=tol,
                              max_steps=max_steps)
  v = kernels.jvp(apply_fn, lin, x_f, unravel(x_ret), **blk) + r_f
  rhs = ravel_pytree(kernels.vjp(apply_fn, lin, x_f, v, **blk))[0]
  delta, info = cg.cg_solve(lambda u: mv_r(u) + mv_f(u), rhs, damping=damping,
                            tol=tol, max_steps=max_steps)
  reports = [NewtonReport(i.ok, "converged" if i.ok else i.status, 1,
                          float(i.relative_residual), float("nan"), i.steps)
             for i in (info_r, info)]
  return delta, v.reshape(-1), reports


def _ce_update(prob: _Problem, implementation, tol, max_steps, cg_max_steps):
  """The linearised cross-entropy retrain: ``x_{D_r} − x_D`` by Newton.

  ``D`` is ordered ``[D_r; D_f]``; the ``D_r`` solve is warm-started from the
  ``D`` solve (from ``x_D`` in parameter space; from ``D_r``'s rows of
  ``β_D`` in kernel space).
  """
  apply_fn, lin, blk = prob.apply_fn, prob.lin, prob.blk
  loss = objective.cross_entropy
  n_r, n_f, c, lam = prob.n_r, prob.n_f, prob.c, prob.damping
  x_all = jnp.concatenate([jnp.asarray(prob.x_r), jnp.asarray(prob.x_f)])
  y_all = np.concatenate([prob.y_r, prob.y_f])
  dt = _dtype(prob.precision)
  f0 = kernels.predict(apply_fn, lin, x_all, mesh=blk["mesh"])
  _check_logits(f0, prob.linearize_at)
  opts = {"tol": tol, "max_iter": 100 if max_steps is None else max_steps,
          "precision": prob.precision}
  if prob.solver == "dual":
    theta = kernels.ntk(apply_fn, lin, x_all, implementation=implementation,
                        **blk)
    b = f0
    if prob.shift is not None:
      _, unravel = ravel_pytree(lin)
      b = f0 + kernels.jvp(apply_fn, lin, x_all, unravel(
          prob.shift.astype(f0.dtype)), **blk)
    beta_d, rep_d = newton.solve_dual(theta, b, y_all, loss, lam, **opts)
    k = n_r * c
    beta_r, rep_r = newton.solve_dual(theta[:k, :k], b[:n_r], prob.y_r, loss,
                                      lam, beta0=beta_d[:k], **opts)
    del theta
    flat_dtype = ravel_pytree(lin)[0].dtype
    coef_r = (beta_r - beta_d[:k]).astype(flat_dtype).reshape(n_r, c)
    coef_f = (-beta_d[k:]).astype(flat_dtype).reshape(n_f, c)
    delta = (ravel_pytree(kernels.vjp(apply_fn, lin, prob.x_r, coef_r,
                                      **blk))[0]
             + ravel_pytree(kernels.vjp(apply_fn, lin, prob.x_f, coef_f,
                                        **blk))[0])
    return delta, None, [rep_d, rep_r], (), False
  if prob.keep_jacobian:
    jac = kernels.jacobian(apply_fn, lin, x_all, **blk)
    with kernels.precision_scope(prob.precision):
      op = newton.DenseJacobian(jac, c, dtype=dt)
    del jac
  else:
    op = newton.PassJacobian(apply_fn, lin, x_all, **blk)
  with kernels.precision_scope(prob.precision):
    b = f0.astype(dt)
    if prob.shift is not None:
      b = b + op.matvec(prob.shift)
    weights = jnp.concatenate([jnp.ones((n_r,), dt), jnp.zeros((n_f,), dt)])
  if prob.solver == "primal":
    solve = newton.solve_primal
  else:
    solve = functools.partial(newton.solve_newton_cg,
                              cg_max_steps=cg_max_steps)
  x_d, rep_d = solve(op, b, y_all, loss, lam, **opts)
  x_r, rep_r = solve(op, b, y_all, loss, lam, weights=weights, x0=x_d, **opts)
  with kernels.precision_scope(prob.precision):
    delta = (x_r - x_d).astype(ravel_pytree(lin)[0].dtype)
  return delta, None, [rep_d, rep_r], (), prob.keep_jacobian


def _raise_not_converged(solver: str, reports) -> None:
  for k, r in enumerate(reports):
    if not r.converged:
      raise UnlearningError(
          f"{solver} solver: solve {k + 1} of {len(reports)} stopped with "
          f"status {r.status!r} after {r.iterations} step(s) at relative "
          f"gradient/residual norm {r.grad_norm:.3g}. Raise newton_max_steps "
          "(or cg_max_steps), raise damping (better conditioned), loosen "
          "newton_tol/cg_tol, or pass raise_on_failure=False to inspect the "
          "last iterate.")


def _raise_if_failed(infos, damping: float, solver: str) -> None:
  for k, info in enumerate(infos):
    if not bool(info.ok):
      raise UnlearningError(
          f"{solver} solver: factorisation {k + 1} of {len(infos)} failed (the "
          f"damped matrix is not numerically positive definite at damping="
          f"{damping}, condition estimate {float(info.cond):.3g}). Increase "
          "damping, enable float64 with jax.config.update('jax_enable_x64', "
          "True), or use damping=0 for the pseudo-inverse limit.")
