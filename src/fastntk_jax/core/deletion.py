"""Deletion requests: prepare once over ``D``, then forget with little work.

A request to forget ``F`` from the current set ``S`` moves the parameters by
``x_{S∖F} − x_S``, where ``x_S`` minimises the linearised model's loss on
``S`` plus ``(λ/2)‖w − w_0‖²`` (:mod:`fastntk_jax.core.newton`). Requests compose:
forgetting ``F_1`` then ``F_2`` gives ``w_D + x_{D∖(F_1∪F_2)} − x_D``, which
is what :func:`fastntk_jax.core.unlearn.unlearn` gives from scratch.

**Squared error** (``loss="mse"``). Eq. (1) in parameter space needs
``A = JᵀJ`` and ``g = Jᵀr`` over the current set, with ``r`` the linear
model's residual at the anchor. They are sums over samples, so after one
pass over ``D`` (:func:`prepare`) a request needs only ``J_F``::

    A_r = A − J_FᵀJ_F,   g_r = g − J_Fᵀ r_F
    x_r = −(A_r + λI)⁻¹ g_r
    w_r − w_D = (A + λI)⁻¹ (J_FᵀJ_F x_r + J_Fᵀ r_F)

The Cholesky factor of ``A_r + λI`` is the next request's ``A + λI``. Cost of
a request: ``|F|·C`` Jacobian rows, one rank-``|F|·C`` update of a ``P×P``
matrix and one ``P×P`` factorisation (``P³/3`` flops), whatever ``|D|``.
``J`` and ``r`` are taken at the fixed linearisation point, so with
``prepare(..., keep_rows=True)`` the state keeps ``D``'s rows and logits
(``N·C·P`` numbers, as for cross-entropy) and a request reads its rows
instead of computing them: one forward pass over ``F`` to check its inputs,
no Jacobian work.

**Cross-entropy** (``loss="ce"``). The Hessian ``JᵀH(z)J + λI`` depends on the
iterate, so a request is not a rank update. :func:`prepare` keeps what the
solves need: the Jacobian rows of ``D`` (``N·C × P``, in the model's dtype;
the products over them are exact ones in ``solve_dtype``), the
anchor logits ``b = f(w_lin) + J(w_0 − w_lin)``, the solution ``x_D`` (Newton
with the ``P×P`` Gauss-Newton matrix) and the factor of
``M = Σ_i J_iᵀ H_i(z̄_i) J_i + λI`` at the prepared logits ``z̄ = b + J x_D``.
A request then

1. finds the request's rows by id (no Jacobian work) and checks, with one
   forward pass over the request, that its inputs are those samples;
2. downdates ``M`` by the request's rows at the *same* ``z̄`` (so ``M`` stays
   the remaining set's matrix up to float32 rounding of the terms, about
   ``eps₃₂·‖M‖``, and positive definite) and refactors it (``|F|·C·P²`` +
   ``P³/3`` flops); ``M`` only preconditions: the answer is fixed by the
   float64 gradient;
3. minimises ``Φ_{S∖F}`` from ``x_S`` by L-BFGS with ``M⁻¹`` as the initial
   inverse Hessian (Newton with the Hessian frozen at ``M``, corrected by the
   last 10 pairs of steps and gradient changes: ``x_S`` is close to
   ``x_{S∖F}`` and ``M`` to the true Hessian there, so it converges in a few
   steps), and, if that is slow (more than 50 steps), continues by
   Newton-CG preconditioned with ``M``.
   Every product is a pass over the kept rows (``2·N·C·P`` flops): no model
   evaluation.

Cost of a request: one forward pass over ``F``, the ``P×P`` downdate and
factorisation, and one read of the kept rows per step (``J d`` and the
gradient at the full step together; a second pass when the line search
backtracks; plus two per CG step if Newton-CG takes over);
``result.solve`` reports the steps. The solve
starts from the previous one's logits and gradient less the request's
terms, so no pass precedes its first step.
Memory: the rows (``N·C·P`` numbers) and three ``P×P`` matrices in
``solve_dtype``; :func:`prepare` refuses before any work when that exceeds
``memory_budget``.

The ``P×P`` matrices and solves run in ``solve_dtype`` (float64 by default,
through :func:`jax.enable_x64` locally): ``A`` sums ``N·C`` outer products, its
condition number grows with ``N``, and a request subtracts from it. Jacobians
stay in the model's dtype.

Example::

  state = prepare(apply_fn, w_D, (x, y), anchor=w_0, ids=np.arange(len(y)))
  res = forget(state, apply_fn, w_D, (x[req], y[req]), ids=req)
  res2 = forget(res.state, apply_fn, res.params, (x[req2], y[req2]), ids=req2)
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax.core import blocking
from fastntk_jax.core import kernels
from fastntk_jax.core import newton
from fastntk_jax.core import objective
from fastntk_jax.core import update
from fastntk_jax.core import validate
from fastntk_jax.core.unlearn import DEFAULT_DAMPING
from fastntk_jax.core.unlearn import DEFAULT_MEMORY_BUDGET
from fastntk_jax.core.unlearn import RESIDUAL_FNS
from fastntk_jax.core.unlearn import UnlearningError

__all__ = ["DeletionResult", "PreparedState", "compact", "forget", "prepare",
           "refresh_preconditioner", "state_bytes", "warm_up",
           "warm_up_newton_cg"]

#: Steps of the preconditioned L-BFGS iteration before a request switches to
#: Newton-CG (whose steps cost several passes each: on 3,000 CIFAR-10 images,
#: requests that switched after 20 steps took 2.7-5.8 s, those that converged
#: in 17 steps 1.7 s). At most ``newton_max_steps − 1`` (and at least 1):
#: Newton-CG gets at least one step unless ``newton_max_steps=1`` (with the
#: two caps equal, it never ran, and a request that L-BFGS could not finish
#: in 50 steps failed where one preconditioned Newton-CG step converged).
_FROZEN_STEPS = 50

#: L-BFGS pairs that correct ``M`` within a request's solve
#: (:func:`fastntk_jax.core.newton.solve_preconditioned`).
_LBFGS_PAIRS = 10


class PreparedState(NamedTuple):
  """What a deletion request needs about the current training set.

  Attributes:
    lin_params: the linearisation point (``w_D`` or ``w_0``), a pytree.
    gram: ``"mse"``: ``A = JᵀJ`` over the current set; ``"ce"``: the
      preconditioner's ``Σ_i J_iᵀ H_i(z̄_i) J_i``; ``(P, P)`` in ``solve_dtype``.
    grad: ``"mse"``: ``g = Jᵀ r`` (``r`` the residual at the anchor), ``(P,)``;
      None for ``"ce"``.
    chol: lower Cholesky factor of ``gram + λI``.
    num_samples: samples in the current set.
    num_outputs: C.
    damping: λ > 0.
    loss: ``"mse"`` or ``"ce"``.
    solve_dtype: ``"float64"`` or ``"float32"``.
    ids: the current set's sample ids (sorted int64), or None if untracked.
    input_shape: per-sample input shape; input_dtype: its dtype name.
    shift: ``w_0 − w_lin`` flattened ``(P,)``, or None when the anchor is the
      linearisation point.
    anchored_at, linearized_at: ``"w_0"``/``"w_D"``, as in
      :class:`fastntk_jax.core.unlearn.UnlearnResult`.
    jacobian: ``"ce"`` (and ``"mse"`` prepared with ``keep_rows=True``,
      which also keeps ``labels``, ``logits``, ``active`` and ``row_ids``):
      the prepared set's Jacobian rows ``(N_0·C, P)`` in the model's dtype
      (states saved before kept them in ``solve_dtype``; either works) —
      rows of forgotten samples stay, unused, until :func:`compact`.
    offsets: ``"ce"``: ``b``, the linear model's logits at the anchor,
      ``(N_0, C)``.
    labels: with rows: ``(N_0,)``.
    logits: with rows: ``f(w_lin)`` ``(N_0, C)``, to check a request's inputs
      (and, for ``"mse"``, its residuals).
    active: with rows: ``(N_0,)`` bool, the samples still in the set.
    solution: ``"ce"``: ``x_S`` ``(P,)`` in ``solve_dtype``.
    ref_logits: ``"ce"``: ``z̄`` ``(N_0, C)``, where ``gram``'s terms were
      formed.
    row_ids: with rows: the id of each prepared row ``(N_0,)`` int64.
    solution_logits: ``"ce"``: ``b + J x_S`` ``(N_0, C)``, the linear model's
      logits at the solution; with the next two, the next request's solve
      starts without a pass over the rows. None in states saved before these
      fields existed (a request then computes them: three passes).
    solution_grad: ``"ce"``: ``∇Φ_S(x_S)`` over the current set ``(P,)``.
    anchor_grad: ``"ce"``: ``∇Φ_S(0)`` over the current set ``(P,)``.
  """
  lin_params: Any
  gram: jax.Array
  grad: jax.Array | None
  chol: jax.Array
  num_samples: int
  num_outputs: int
  damping: float
  loss: str
  solve_dtype: str
  ids: np.ndarray | None
  input_shape: tuple
  input_dtype: str
  shift: jax.Array | None = None
  anchored_at: str = "w_D"
  linearized_at: str = "w_D"
  jacobian: jax.Array | None = None
  offsets: jax.Array | None = None
  labels: np.ndarray | None = None
  logits: jax.Array | None = None
  active: np.ndarray | None = None
  solution: jax.Array | None = None
  ref_logits: jax.Array | None = None
  row_ids: np.ndarray | None = None
  solution_logits: jax.Array | None = None
  solution_grad: jax.Array | None = None
  anchor_grad: jax.Array | None = None


class DeletionResult(NamedTuple):
  """Result of :func:`forget`.

  Attributes:
    params: ``w_r``, like ``params``.
    state: the :class:`PreparedState` of the remaining set, for the next
      request.
    num_forget: samples forgotten by this request.
    delta_norm: ``‖w_r − w_D‖₂``.
    forget_residual_norm: ``‖V‖₂ = ‖J_F x_r + r_F‖₂`` (``"mse"``; NaN for
      ``"ce"``).
    relative_residual: the larger relative residual of the two solves
      (``"mse"``) or the Newton solve's final relative gradient norm
      (``"ce"``).
    seconds: wall time of the request.
    solve: ``"ce"``: the :class:`fastntk_jax.core.newton.NewtonReport` of the
      request's solve; None for ``"mse"``.
  """
  params: Any
  state: PreparedState
  num_forget: int
  delta_norm: float
  forget_residual_norm: float
  relative_residual: float
  seconds: float
  solve: newton.NewtonReport | None = None


def _check_ids(name, ids, n):
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.shape[0] != n:
    raise ValueError(f"{name}: expected {n} ids (one per sample), got shape "
                     f"{ids.shape}.")
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"{name}: ids must be integers, got dtype {ids.dtype}.")
  if np.unique(ids).size != n:
    raise ValueError(f"{name}: ids must be unique; a sample id repeats.")
  return ids.astype(np.int64)


def state_bytes(loss: str, n: int, c: int, p: int, itemsize: int = 4,
                solve_dtype: str = "float64", keep_rows: bool = False) -> int:
  """Memory of a :class:`PreparedState` (its dominant terms), in bytes.

  ``"mse"``: ``A``, its factor and, during a request, their successors (four
  ``P×P``), plus the Jacobian rows ``N·C·P`` with ``keep_rows``. ``"ce"``:
  the Jacobian rows, kept in the model's dtype (``itemsize`` bytes each),
  and a Gauss-Newton matrix being formed (five ``P×P``).
  """
  pp = p * p * np.dtype(solve_dtype).itemsize
  rows = n * c * p * itemsize
  if loss == "mse":
    return 4 * pp + (rows if keep_rows else 0)
  return rows + 5 * pp


def _legacy_precision(solve_dtype, legacy: dict):
  """Version 0.1's ``precision=`` (popped from ``legacy``), with a warning."""
  if "precision" not in legacy:
    return solve_dtype
  warnings.warn("prepare(precision=...) is deprecated: pass solve_dtype=... "
                "(docs/migration.md).", DeprecationWarning, stacklevel=3)
  return legacy.pop("precision")


def _check_state_fits(loss, n, c, p, itemsize, solve_dtype,
                      memory_budget, keep_rows=False) -> None:
  """Refuses, before any work, a state over ``memory_budget``."""
  need = state_bytes(loss, n, c, p, itemsize, solve_dtype, keep_rows)
  rows = loss == "ce" or keep_rows
  if need > memory_budget:
    alt = ("solve each request from scratch with unlearn(loss='ce', "
           "solver='cg') (matrix-free), or choose a smaller PEFT set"
           if loss == "ce" else "prepare without keep_rows (requests then "
           "compute their rows), or choose a smaller PEFT set"
           if keep_rows else "choose a smaller PEFT set (the state is "
           "P×P), or unlearn(solver='cg') per request")
    raise ValueError(
        f"memory_budget: the prepared state needs about {need} bytes "
        f"({need / 2**30:.3g} GiB) for N={n}, C={c}, P={p}"
        f"{' (Jacobian rows N·C·P)' if rows else ''}, over "
        f"memory_budget={memory_budget} ({memory_budget / 2**30:.3g} GiB). "
        f"Raise memory_budget if the memory is there; otherwise {alt}.")


def prepare(apply_fn: Callable[[Any, Any], jax.Array], params, data, *,
            anchor=None, linearize_at: str = "w_D",
            damping: float = DEFAULT_DAMPING, loss: str = "mse", ids=None,
            solve_dtype: str = "float64", block_size: int | None = None,
            memory_budget: int = DEFAULT_MEMORY_BUDGET,
            newton_tol: float | None = None, newton_max_steps: int = 100,
            keep_rows: bool = False, mesh=None, **legacy) -> PreparedState:
  """One pass over ``D`` after fine-tuning: what every later request needs.

  Args:
    apply_fn: ``apply_fn(params, x) -> (N, C)``, samples independent.
    params: ``w_D``, the deployed PEFT parameters.
    data: ``(x, y)``, the whole training set ``D``.
    anchor: ``w_0``, the centre of the ridge term (as in
      :func:`fastntk_jax.core.unlearn.unlearn`; None centres it at ``params``).
    linearize_at: ``"w_D"`` (default) or ``"w_0"``: where ``J`` is taken.
    damping: λ > 0 (requests use Cholesky factors; for the λ → 0⁺ limit use
      :func:`fastntk_jax.core.unlearn.unlearn` with ``damping=0``).
    loss: the fine-tuning loss, ``"mse"`` or ``"ce"``.
    ids: unique integer id per sample of ``D``; requests then name their
      samples and are checked against what remains. Required for ``"ce"``
      (its rows are found by id).
    solve_dtype: ``"float64"`` (default) or ``"float32"`` for the ``P×P``
      matrices and the solves.
    block_size: samples per Jacobian block.
    memory_budget: bytes the state may take (:func:`state_bytes`); refused
      before any work when over it.
    newton_tol, newton_max_steps: for the ``"ce"`` solves (as in ``unlearn``);
      a solve that does not converge raises :class:`UnlearningError`.
    keep_rows: ``"mse"``: keep ``D``'s Jacobian rows and logits (``N·C·P``
      numbers in the model's dtype, counted against ``memory_budget``;
      requires ``ids``), so that a request reads its rows instead of
      computing them. ``"ce"`` states always keep them.
    mesh: devices to shard the Jacobian work over
      (:func:`fastntk_jax.core.kernels.default_mesh` when None).

  Returns:
    :class:`PreparedState`.
  """
  solve_dtype = _legacy_precision(solve_dtype, legacy)
  lin, anc = validate.check_points(params, anchor, linearize_at, legacy)
  x, y = validate.check_split("data", data)
  if y.shape[0] == 0:
    raise ValueError("data: the training set is empty.")
  damping = validate.check_damping(damping, positive=True)
  loss = validate.check_loss(loss)
  validate.check_solve_dtype(solve_dtype)
  validate.check_positive_int_or_none("block_size", block_size)
  validate.check_positive_int_or_none("newton_max_steps", newton_max_steps)
  validate.check_tolerance("newton_tol", newton_tol, allow_none=True)
  validate.check_memory_budget(memory_budget)
  keep_rows, ids = _check_rows_and_ids(loss, keep_rows, ids, y.shape[0])
  c = kernels.num_outputs(apply_fn, params, x)
  validate.check_labels("data", y, c)
  flat, _ = ravel_pytree(params)
  n, p = int(y.shape[0]), int(flat.shape[0])
  _check_state_fits(loss, n, c, p, flat.dtype.itemsize, solve_dtype,
                    memory_budget, keep_rows)
  mesh = blocking.resolve_mesh(mesh)
  shift = None
  with kernels.dtype_scope(solve_dtype):
    if anc is not lin:
      shift = (ravel_pytree(anc)[0].astype(solve_dtype)
               - ravel_pytree(lin)[0].astype(solve_dtype))
  common = dict(lin_params=lin, num_samples=n, num_outputs=c,
                damping=damping, loss=loss, solve_dtype=solve_dtype,
                ids=None if ids is None else np.sort(ids),
                input_shape=tuple(np.shape(x)[1:]),
                input_dtype=str(jnp.result_type(x)), shift=shift,
                anchored_at="w_D" if anchor is None else "w_0",
                linearized_at=linearize_at)
  blk = {"block_size": block_size, "mesh": mesh}
  if loss == "mse" and keep_rows:
    return _prepare_mse_rows(apply_fn, x, y, ids, common, blk)
  if loss == "mse":
    return _prepare_mse(apply_fn, x, y, common, blk)
  return _prepare_ce(apply_fn, x, y, ids, common, blk, newton_tol,
                     newton_max_steps)


def _check_rows_and_ids(loss, keep_rows, ids, n):
  """``(keep_rows, ids)`` checked: rows are found by id."""
  if not isinstance(keep_rows, (bool, np.bool_)):
    raise TypeError(f"keep_rows must be True or False, got {keep_rows!r}.")
  keep_rows = bool(keep_rows) and loss == "mse"
  if ids is not None:
    return keep_rows, _check_ids("ids", ids, n).copy()
  if loss == "ce" or keep_rows:
    raise ValueError("ids: " + ("cross-entropy deletion" if loss == "ce" else
                                "keep_rows") + " finds each request's "
                     "Jacobian rows by sample id; pass ids=... (e.g. "
                     "np.arange(len(y))).")
  return keep_rows, None


def _prepare_mse(apply_fn, x, y, common, blk):
  lin, solve_dtype, lam = (common["lin_params"], common["solve_dtype"],
                         common["damping"])
  # One pass: the logits at the linearisation point, residuals and Grams.
  a, g, f0 = kernels.gram(apply_fn, lin, x, RESIDUAL_FNS["mse"], y=y,
                          solve_dtype=solve_dtype, return_outputs=True, **blk)
  _check_logits(f0)
  # The P×P algebra once, on one device (not repeated on every device).
  a, g = blocking.on_one_device(blk["mesh"], (a, g))
  return _mse_state(a, g, common)


def _mse_state(a, g, common, **rows) -> PreparedState:
  lam, solve_dtype = common["damping"], common["solve_dtype"]
  with kernels.dtype_scope(solve_dtype):
    if common["shift"] is not None:
      g = g + a @ common["shift"]
    chol = _cholesky(a, lam)
    ok = bool(jnp.all(jnp.isfinite(chol)))
  if not ok:
    raise UnlearningError(
        f"prepare: A + λI is not numerically positive definite at damping="
        f"{lam} in {solve_dtype}; raise damping or use solve_dtype='float64'.")
  return PreparedState(gram=a, grad=g, chol=chol, **rows, **common)


def _prepare_mse_rows(apply_fn, x, y, ids, common, blk):
  """``_prepare_mse`` keeping the rows and logits: ``A`` and ``g`` are
  formed from the kept rows as :func:`_mse_terms` forms a request's (block
  products in the model's dtype, sums in ``solve_dtype``, as
  :func:`fastntk_jax.core.kernels.gram` forms them)."""
  lin, c = common["lin_params"], common["num_outputs"]
  jac = kernels.jacobian(apply_fn, lin, x, **blk)
  f0 = kernels.predict(apply_fn, lin, x, mesh=blk["mesh"])
  _check_logits(f0)
  n = int(y.shape[0])
  a, g = _mse_terms_all(jac, jnp.asarray(f0), jnp.asarray(y), c=c,
                        dtype=common["solve_dtype"])
  # The P×P algebra on one device, as in _prepare_mse.
  a, g = blocking.on_one_device(blk["mesh"], (a, g))
  return _mse_state(a, g, common, jacobian=jac, labels=np.array(y, copy=True),
                    logits=f0, active=np.ones(n, bool), row_ids=ids)


def _check_logits(f0):
  if not bool(jnp.all(jnp.isfinite(f0))):
    raise ValueError("apply_fn returns NaN or infinite logits at the "
                     "linearisation point.")


def _prepare_ce(apply_fn, x, y, ids, common, blk, tol, max_steps):
  lin, solve_dtype, lam, c = (common["lin_params"], common["solve_dtype"],
                            common["damping"], common["num_outputs"])
  loss = objective.cross_entropy
  jac = kernels.jacobian(apply_fn, lin, x, **blk)
  f0 = kernels.predict(apply_fn, lin, x, mesh=blk["mesh"])
  _check_logits(f0)
  with kernels.dtype_scope(solve_dtype):
    # Rows in the model's dtype; the products are exact ones in the solve's
    # (newton.DenseJacobian converts them block by block).
    op = newton.DenseJacobian(jac, c, ggn_dtype=ravel_pytree(lin)[0].dtype)
    del jac
    b = f0.astype(solve_dtype)
    if common["shift"] is not None:
      b = b + op.matvec(common["shift"])
  with kernels.dtype_scope(solve_dtype):
    g0 = op.rmatvec(loss.grad(b, jnp.asarray(y)))  # kept: ∇Φ(0) downdates
    x0 = jnp.zeros((op.p,), g0.dtype)
    start = newton.Start(b, g0, float(jnp.linalg.norm(g0)))
  sol, rep, at = newton.solve_primal(
      op, b, y, loss, lam, tol=tol, max_iter=max_steps,
      solve_dtype=solve_dtype, x0=x0, return_start=True, start=start)
  if not rep.converged:
    raise UnlearningError(
        f"prepare: the Newton solve on D stopped with status {rep.status!r} "
        f"after {rep.iterations} steps at relative gradient norm "
        f"{rep.grad_norm:.3g}; raise newton_max_steps or damping.")
  with kernels.dtype_scope(solve_dtype):
    z_ref = b + op.matvec(sol)
    gram = op.ggn(loss.hess_factor(z_ref), solve_dtype)
    chol = _cholesky(gram, lam)
    if not bool(jnp.all(jnp.isfinite(chol))):
      raise UnlearningError(
          f"prepare: the Gauss-Newton matrix + λI is not numerically positive "
          f"definite at damping={lam} in {solve_dtype}; raise damping.")
  return PreparedState(
      gram=gram, grad=None, chol=chol, jacobian=op.jac, offsets=b,
      labels=np.array(y, copy=True),
      logits=f0, active=np.ones(len(y), bool), solution=sol,
      ref_logits=z_ref, row_ids=ids, solution_logits=at.logits,
      solution_grad=at.grad, anchor_grad=g0, **common)


@jax.jit
def _cho_apply(chol, r):
  return jsl.cho_solve((chol, True), r)


@jax.jit
def _cholesky(a, damping):
  return jnp.linalg.cholesky(a + damping * jnp.eye(a.shape[0], dtype=a.dtype))


@jax.jit
def _request(a, g, chol, a_f, g_f, rr_f, damping):
  a_r, g_r = a - a_f, g - g_f
  a_r = 0.5 * (a_r + a_r.T)
  chol_r = jnp.linalg.cholesky(a_r + damping * jnp.eye(a.shape[0],
                                                         dtype=a.dtype))
  x_r = -jsl.cho_solve((chol_r, True), g_r)
  rhs = a_f @ x_r + g_f
  delta = jsl.cho_solve((chol, True), rhs)
  res_r = jnp.linalg.norm((a_r @ x_r + damping * x_r) + g_r) / jnp.maximum(
      jnp.linalg.norm(g_r), jnp.finfo(a.dtype).tiny)
  res = jnp.linalg.norm(a @ delta + damping * delta - rhs) / jnp.maximum(
      jnp.linalg.norm(rhs), jnp.finfo(a.dtype).tiny)
  return delta, a_r, g_r, chol_r, jnp.maximum(res_r, res), (
      update.forget_residual_norm(a_f, g_f, x_r, rr_f))


def _request_ids(state, ids, n_f):
  """``(remaining ids, request ids)``, checked against the current set."""
  remaining, req = state.ids, None
  if state.ids is not None:
    if ids is None:
      raise ValueError("ids: the state tracks sample ids; pass the ids of "
                       "forget_set's samples.")
    req = _check_ids("ids", ids, n_f)
    missing = np.setdiff1d(req, state.ids, assume_unique=True)
    if missing.size:
      raise ValueError(f"ids: {missing.size} of the requested samples are not "
                       f"in the current training set (e.g. {missing[:5].tolist()}"
                       "); they were never in it or are already forgotten.")
    remaining = np.setdiff1d(state.ids, req, assume_unique=True)
  elif ids is not None:
    raise ValueError("ids: the state was prepared without ids; prepare with "
                     "ids=... to track samples, or drop ids here.")
  return remaining, req


def forget(state: PreparedState, apply_fn: Callable[[Any, Any], jax.Array],
           params, forget_set, *, ids=None, block_size: int | None = None,
           newton_tol: float | None = None, newton_max_steps: int = 100,
           cg_max_steps: int | None = None, refresh_steps: int | None = None,
           mesh=None) -> DeletionResult:
  """Answers one deletion request: forgets ``forget_set`` from ``params``.

  Args:
    state: from :func:`prepare` or the previous request's ``result.state``.
    apply_fn: the ``apply_fn`` given to :func:`prepare`.
    params: the current parameters (``w_D``, or the previous request's
      ``result.params``).
    forget_set: ``(x_f, y_f)``, samples of the current training set.
    ids: their ids, required when ``state`` tracks ids (checked to be in the
      current set; a sample cannot be forgotten twice).
    block_size: samples per Jacobian block.
    newton_tol, newton_max_steps, cg_max_steps: the ``"ce"`` solve's
      tolerance and caps (a solve that does not converge raises
      :class:`UnlearningError` and leaves ``state`` unchanged).
      ``newton_max_steps`` counts the L-BFGS steps (at most 50, and at most
      ``newton_max_steps − 1``, so that Newton-CG gets at least one step;
      with ``newton_max_steps=1`` the one step is L-BFGS's) and the
      Newton-CG steps after them.
    refresh_steps: ``"ce"``: when the solve took more steps than this, the
      preconditioner ``M`` is formed again at the new solution's logits
      (one Gauss-Newton pass over the kept rows, ``N·C·P²`` flops), so that
      later requests converge as fast as the first; None (default) never
      refreshes. ``M`` only preconditions: the answer is the same up to the
      solve's tolerance. :class:`fastntk_jax.store.DeletionStore` has its
      own rule instead (:func:`fastntk_jax.store.store.refresh_due`).
    mesh: as in :func:`prepare`.

  Returns:
    :class:`DeletionResult`; ``result.state`` describes the current set
    without ``forget_set``.

  Raises:
    ValueError: bad input; ids not in the current set; nothing would remain;
      (states with rows) the inputs or labels are not the prepared samples'
      with these ids.
    UnlearningError: ``A_r + λI`` is not positive definite — the samples were
      not part of the prepared set (without ids this cannot be checked
      otherwise) — or the ``"ce"`` solve did not converge.
  """
  t0 = time.perf_counter()
  if not isinstance(state, PreparedState):
    raise TypeError("state must be the PreparedState returned by prepare() or "
                    "by the previous forget() call.")
  x_f, y_f = validate.check_split("forget_set", forget_set)
  n_f = int(y_f.shape[0])
  if n_f == 0:
    raise ValueError("forget_set is empty; there is nothing to forget.")
  if tuple(np.shape(x_f)[1:]) != state.input_shape or str(
      jnp.result_type(x_f)) != state.input_dtype:
    raise ValueError(
        f"forget_set: inputs are {np.shape(x_f)[1:]} {jnp.result_type(x_f)} "
        f"but the prepared set has {state.input_shape} {state.input_dtype}; "
        "prepare both the same way.")
  validate.check_labels("forget_set", y_f, state.num_outputs)
  if n_f >= state.num_samples:
    raise ValueError(f"forget_set has {n_f} samples but the prepared set has "
                     f"{state.num_samples}; at least one must remain. To "
                     "forget everything, reset to the anchor w_0.")
  remaining, req = _request_ids(state, ids, n_f)
  validate.check_positive_int_or_none("newton_max_steps", newton_max_steps)
  validate.check_positive_int_or_none("cg_max_steps", cg_max_steps)
  validate.check_positive_int_or_none("refresh_steps", refresh_steps)
  validate.check_positive_int_or_none("block_size", block_size)
  validate.check_tolerance("newton_tol", newton_tol, allow_none=True)
  mesh = blocking.resolve_mesh(mesh)
  if state.loss == "ce":
    res = _forget_ce(state, apply_fn, params, x_f, y_f, req, remaining,
                     newton_tol, newton_max_steps, cg_max_steps, mesh, t0)
    if refresh_steps is not None and res.solve.iterations > refresh_steps:
      res = res._replace(state=refresh_preconditioner(res.state),
                         seconds=time.perf_counter() - t0)
    return res
  return _forget_mse(state, apply_fn, params, x_f, y_f, req, remaining,
                     block_size, mesh, t0)


def _apply(params, delta):
  flat, unravel = ravel_pytree(params)
  new = jax.tree_util.tree_map(
      lambda w, d: (w + d).astype(jnp.result_type(w)), params,
      unravel(delta.astype(flat.dtype)))
  return jax.block_until_ready(new)


def _forget_mse(state, apply_fn, params, x_f, y_f, req, remaining,
                block_size, mesh, t0):
  """Work ∝ |F|: the request's Gram pass (or its kept rows) and one P×P
  factorisation."""
  n_f = int(y_f.shape[0])
  lin = state.lin_params
  active = None
  if state.jacobian is not None:  # prepared with keep_rows
    rows = _rows_of(state, req, y_f)
    if x_f is not None:  # None: warm_up's request, which has no inputs
      _check_request_inputs(state, apply_fn, x_f, rows, mesh)
    padded, mask = _padded_rows(rows)
    with kernels.dtype_scope(state.solve_dtype):
      a_f, g_f = _mse_terms(
          state.jacobian, jnp.asarray(padded),
          jnp.asarray(mask, state.solve_dtype), jnp.asarray(state.logits),
          jnp.asarray(state.labels), c=state.num_outputs,
          dtype=state.solve_dtype)
    f0 = np.asarray(state.logits)[rows]
    # From the ids that remain, not from the old mask: a store written by a
    # version that did not keep the mask for MSE heals on its next request.
    active = np.isin(state.row_ids, remaining)
  else:
    # Blocks of prepare's shape, a short request padded: requests of any
    # size run the compiled pass (stable_shape), and the small per-request
    # arithmetic below is NumPy's, which compiles nothing either.
    a_f, g_f, f0 = kernels.gram(apply_fn, lin, x_f, RESIDUAL_FNS["mse"],
                                y=y_f, solve_dtype=state.solve_dtype,
                                block_size=block_size, mesh=mesh,
                                return_outputs=True, stable_shape=True)
  f0 = np.asarray(f0)
  r_f = f0 - np.eye(f0.shape[1], dtype=f0.dtype)[np.asarray(y_f)]
  # The P×P algebra once, on one device of the request's mesh (the state may
  # come from another mesh, or from a checkpoint on the host); replicated,
  # every device would repeat it on the same cores.
  a_f, g_f = blocking.on_one_device(mesh, (a_f, g_f))
  with kernels.dtype_scope(state.solve_dtype):
    rr_f = blocking.on_one_device(mesh, jnp.asarray(
        np.sum(r_f.astype(state.gram.dtype) ** 2), state.gram.dtype))
    if state.shift is not None:  # the residual at the anchor: r + J_F d
      d = blocking.on_one_device(mesh, state.shift)
      rr_f = rr_f + 2 * d @ g_f + d @ (a_f @ d)
      g_f = g_f + a_f @ d
    a, g, chol, lam = blocking.on_one_device(mesh, (
        state.gram, state.grad, state.chol,
        jnp.asarray(state.damping, state.gram.dtype)))
    delta, a_r, g_r, chol_r, res, v = _request(a, g, chol, a_f, g_f, rr_f,
                                               lam)
    ok = bool(jnp.all(jnp.isfinite(chol_r))) and bool(
        jnp.all(jnp.isfinite(delta)))
    delta_norm = float(jnp.linalg.norm(delta))
    res, v = float(res), float(v)
    delta = delta.astype(ravel_pytree(params)[0].dtype)
  if not ok:
    raise UnlearningError(
        "forget: A_r + λI is not positive definite after removing the "
        "request's samples. Were they part of the prepared set? Track them "
        "with prepare(..., ids=...); otherwise raise damping or use "
        "solve_dtype='float64'.")
  new_params = _apply(params, delta)
  new_state = state._replace(gram=a_r, grad=g_r, chol=chol_r,
                             num_samples=state.num_samples - n_f, ids=remaining,
                             active=state.active if active is None else active)
  return DeletionResult(new_params, new_state, n_f, delta_norm, v, res,
                        time.perf_counter() - t0)


def _forget_ce(state, apply_fn, params, x_f, y_f, req, remaining, tol,
               max_steps, cg_max_steps, mesh, t0):
  """Newton-CG on the kept rows from the current solution (module docstring)."""
  rows = _rows_of(state, req, y_f)
  # The request's rows padded to a bucket size (weight 0 on the padding):
  # every request size in a bucket runs the same compiled programs.
  padded, mask = _padded_rows(rows)
  if x_f is not None:  # None: warm_up's request, which has no inputs
    _check_request_inputs(state, apply_fn, x_f, rows, mesh)
  loss = objective.cross_entropy
  c, lam, prec = state.num_outputs, state.damping, state.solve_dtype
  active = state.active.copy()
  active[rows] = False
  with kernels.dtype_scope(prec):
    # The downdate forms the request's terms as prepare() formed them.
    g_dtype = ravel_pytree(state.lin_params)[0].dtype
    op = newton.DenseJacobian(state.jacobian, c)
    z = state.solution_logits
    ggn_f, g0_f, g_f = _request_terms(
        state.jacobian, jnp.asarray(padded), jnp.asarray(mask, prec),
        jnp.asarray(state.ref_logits), jnp.asarray(state.offsets),
        None if z is None else jnp.asarray(z), jnp.asarray(state.labels),
        c=c, ggn_dtype=np.dtype(g_dtype).name, dtype=np.dtype(prec).name)
    gram = state.gram - ggn_f
    chol = _cholesky(gram, lam)
    if not bool(jnp.all(jnp.isfinite(chol))):
      raise UnlearningError(
          "forget: the preconditioner lost positive definiteness after the "
          "downdate; raise damping or use solve_dtype='float64'.")
    precond = functools.partial(_cho_apply, chol)
    weights = jnp.asarray(active, prec)
    start, anchor_grad = _request_start(state, op, g0_f, g_f, weights)
  common = dict(weights=weights, tol=tol, solve_dtype=prec,
                preconditioner=precond, return_start=True)
  # L-BFGS from M (one read of the rows a step) first; where it converges slowly,
  # Newton-CG preconditioned with M from where it stopped.
  x_new, rep, at = newton.solve_preconditioned(
      op, state.offsets, state.labels, loss, lam, x0=state.solution,
      start=start, max_iter=max(1, min(max_steps - 1, _FROZEN_STEPS)),
      memory=_LBFGS_PAIRS, **common)
  left = max_steps - rep.iterations
  if not rep.converged and rep.status != "factorisation_failed" and left > 0:
    first = rep
    x_new, rep, at = newton.solve_newton_cg(
        op, state.offsets, state.labels, loss, lam, x0=x_new, start=at,
        max_iter=left, cg_max_steps=cg_max_steps, **common)
    rep = rep._replace(iterations=rep.iterations + first.iterations)
  if not rep.converged:
    raise UnlearningError(
        f"forget: the Newton solve on the remaining set stopped with status "
        f"{rep.status!r} after {rep.iterations} steps at relative gradient "
        f"norm {rep.grad_norm:.3g}; the state is unchanged. Raise "
        "newton_max_steps or cg_max_steps, or loosen newton_tol.")
  with kernels.dtype_scope(prec):
    delta = x_new - state.solution
    delta_norm = float(jnp.linalg.norm(delta))
    delta = delta.astype(ravel_pytree(params)[0].dtype)
  new_params = _apply(params, delta)
  new_state = state._replace(gram=gram, chol=chol, active=active,
                             solution=x_new, solution_logits=at.logits,
                             solution_grad=at.grad, anchor_grad=anchor_grad,
                             num_samples=state.num_samples - len(rows),
                             ids=remaining)
  return DeletionResult(new_params, new_state, len(rows), delta_norm,
                        float("nan"), rep.grad_norm,
                        time.perf_counter() - t0, rep)


def _rows_of(state, req, y_f) -> np.ndarray:
  """Positions of the request's samples among the prepared rows, their
  labels checked against the prepared ones."""
  order = np.argsort(state.row_ids)
  rows = order[np.searchsorted(state.row_ids, req, sorter=order)]
  if not np.array_equal(state.labels[rows], np.asarray(y_f)):
    raise ValueError("forget_set: the labels differ from those prepared for "
                     "these ids; pass each sample with its own id.")
  return rows


def _check_request_inputs(state, apply_fn, x_f, rows, mesh) -> None:
  """The request's inputs must be the prepared samples: one forward pass."""
  f_req = np.asarray(kernels.predict(apply_fn, state.lin_params, x_f,
                                     block_size=_REQUEST_BLOCK, mesh=mesh,
                                     stable_shape=True))
  ref = np.asarray(state.logits)[rows]
  scale = float(np.max(np.abs(ref))) + 1.0
  if float(np.max(np.abs(f_req - ref))) > 1e-3 * scale:
    raise ValueError("forget_set: the inputs give other logits at the "
                     "linearisation point than the prepared samples with "
                     "these ids; pass each sample with its own id, "
                     "preprocessed as at prepare().")


def warm_up(state: PreparedState, params) -> float | None:
  """Runs a one-sample request on a ``state`` that keeps Jacobian rows and
  discards it, so that the request's programs for the state's shapes are
  compiled before a real request needs them (after :func:`compact` changed
  ``N``). The sample's inputs are not needed: the check of its logits is
  skipped.

  Returns:
    The seconds it took; None for a state without rows (its request
    programs do not depend on ``N``), with fewer than two samples, or when
    the solve fails (a real request would report that).
  """
  if not isinstance(state, PreparedState):
    raise TypeError("state must be a PreparedState.")
  if state.jacobian is None or state.num_samples < 2:
    return None
  t0 = time.perf_counter()
  row = int(np.flatnonzero(state.active)[0])
  req = np.asarray(state.row_ids[[row]])
  remaining = np.setdiff1d(state.ids, req, assume_unique=True)
  mesh = blocking.resolve_mesh(None)
  try:
    if state.loss == "ce":
      _forget_ce(state, None, params, None, state.labels[[row]], req,
                 remaining, None, 100, None, mesh, t0)
    else:
      _forget_mse(state, None, params, None, state.labels[[row]], req,
                  remaining, None, mesh, t0)
  except UnlearningError:
    return None
  warm_up_newton_cg(state)
  return time.perf_counter() - t0


def warm_up_newton_cg(state: PreparedState) -> float | None:
  """One Newton-CG step (two CG steps) on a cross-entropy ``state``'s
  problem, discarded: a request whose L-BFGS phase runs out continues with
  Newton-CG, whose programs are otherwise compiled inside that request.
  Returns its seconds; None for an ``"mse"`` state."""
  if not isinstance(state, PreparedState):
    raise TypeError("state must be a PreparedState.")
  if state.loss != "ce":
    return None
  t0 = time.perf_counter()
  prec = state.solve_dtype
  with kernels.dtype_scope(prec):
    op = newton.DenseJacobian(state.jacobian, state.num_outputs)
    weights = jnp.asarray(state.active, prec)
    start = None
    if state.solution_grad is not None:
      start = newton.Start(state.solution_logits, state.solution_grad,
                           float(jnp.linalg.norm(state.anchor_grad)))
  # tol 0: the step is taken even at a converged solution.
  newton.solve_newton_cg(
      op, state.offsets, state.labels, objective.cross_entropy, state.damping,
      weights=weights, x0=state.solution, start=start, tol=0.0, max_iter=1,
      cg_max_steps=2, solve_dtype=prec, return_start=True,
      preconditioner=functools.partial(_cho_apply, state.chol))
  return time.perf_counter() - t0


def _row_index(rows, c: int) -> np.ndarray:
  """The Jacobian rows (sample-major, ``c`` a sample) of samples ``rows``.
  Indexing by them copies only those rows; reshaping the ``N·C × P`` rows to
  pick samples copies all of them (eagerly, ~0.4 s at N = 10,000)."""
  xp = np if isinstance(rows, np.ndarray) else jnp
  return (xp.asarray(rows)[:, None] * c + xp.arange(c)).reshape(-1)


#: Samples per block of a request's forward pass (padded: one compiled shape).
_REQUEST_BLOCK = 32


def _padded_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``rows`` padded with copies of ``rows[0]`` to a bucket size, and the
  mask (1 on ``rows``, 0 on the padding). Buckets: multiples of
  ``max(16, 2^(⌊log₂ n⌋ − 3))`` — eight a doubling of ``n``, less than an
  eighth of ``n`` (or 16 rows) of padding — so a stream of requests of many
  sizes compiles a few shapes, not one per size."""
  n = len(rows)
  q = max(16, 2 ** max(0, int(n).bit_length() - 1 - 3))
  size = -(-n // q) * q
  padded = np.concatenate([rows, np.full(size - n, rows[0], rows.dtype)])
  mask = np.concatenate([np.ones(n), np.zeros(size - n)])
  return padded, mask


@functools.partial(jax.jit, static_argnames=("c", "ggn_dtype", "dtype"))
def _request_terms(jac, rows, mask, ref_logits, offsets, z, labels, *, c,
                   ggn_dtype, dtype):
  """A cross-entropy request's terms over its (padded, masked) rows: the
  Gauss-Newton matrix at the prepared logits ``Σ J_iᵀ L_i L_iᵀ J_i`` (formed
  in ``ggn_dtype`` as :func:`prepare` formed ``M``), and ``Σ J_iᵀ ∇ℓ_i`` at
  the offsets (``∇Φ(0)``'s terms) and, when ``z`` is given, at the current
  solution's logits."""
  loss = objective.cross_entropy
  sub = newton.DenseJacobian(jac[_row_index(rows, c)], c, ggn_dtype=ggn_dtype)
  y = labels[rows]
  m = mask.astype(dtype)
  ggn = sub.ggn(loss.hess_factor(ref_logits[rows]) * m[:, None, None], dtype)
  g0 = sub.rmatvec(m[:, None] * loss.grad(offsets[rows], y))
  g = None if z is None else sub.rmatvec(m[:, None] * loss.grad(z[rows], y))
  return ggn, g0, g


@functools.partial(jax.jit, static_argnames=("c", "dtype"))
def _mse_terms(jac, rows, mask, logits, labels, *, c, dtype):
  """A squared-error request's ``J_FᵀJ_F`` and ``J_Fᵀ r_F`` from kept rows
  (padded, masked), ``r`` the residual at the linearisation point: one
  product over all the given rows in the rows' dtype (at full precision),
  returned in ``dtype``. :func:`_mse_terms_all` sums blocks of
  ``_ROWS_BLOCK`` samples in ``dtype``, as
  :func:`fastntk_jax.core.kernels.gram` sums its blocks."""
  sub = jac[_row_index(rows, c)].reshape(-1, c, jac.shape[1])
  sub = sub * mask.astype(jac.dtype)[:, None, None]
  return _mse_block_terms(sub.reshape(-1, jac.shape[1]), logits[rows],
                          labels[rows], mask, c, dtype)


def _mse_block_terms(j, f, y, mask, c, dtype):
  """``(jᵀj, jᵀr)`` for rows ``j`` with logits ``f`` and labels ``y``."""
  r = (f - jax.nn.one_hot(y, c, dtype=f.dtype)) * mask[:, None].astype(
      f.dtype)
  hi = jax.lax.Precision.HIGHEST
  a = jnp.matmul(j.T, j, precision=hi).astype(dtype)
  g = jnp.matmul(j.T, r.reshape(-1).astype(j.dtype), precision=hi)
  return a, g.astype(dtype)


#: Samples a block when forming ``A`` from kept rows (``_mse_terms_all``).
_ROWS_BLOCK = 256


def _mse_terms_all(jac, logits, labels, *, c, dtype):
  """``A = JᵀJ`` and ``g = Jᵀr`` over all kept rows, in blocks of
  ``_ROWS_BLOCK`` samples (one compiled shape, the last block padded)."""
  n = labels.shape[0]
  a = g = None
  with kernels.dtype_scope(dtype):
    for s in range(0, n, _ROWS_BLOCK):
      rows = np.arange(s, min(s + _ROWS_BLOCK, n))
      mask = np.ones(_ROWS_BLOCK)
      mask[rows.size:] = 0
      rows = np.concatenate([rows, np.full(_ROWS_BLOCK - rows.size,
                                           rows[0])])
      ab, gb = _mse_terms(jac, jnp.asarray(rows), jnp.asarray(mask, dtype),
                          logits, labels, c=c, dtype=dtype)
      a, g = (ab, gb) if a is None else (a + ab, g + gb)
    return 0.5 * (a + a.T), g


def _request_start(state, op, g0_f, g_f, weights):
  """The solve's :class:`fastntk_jax.core.newton.Start` at ``x_S`` over the
  remaining set, and ``∇Φ(0)`` there: the state's, less the request's terms
  (``g0_f``, ``g_f`` from :func:`_request_terms`), so that no pass over all
  rows is needed. A state saved before these fields existed lacks them:
  three passes then."""
  loss = objective.cross_entropy
  if state.solution_grad is None:
    y = jnp.asarray(state.labels)
    g0 = op.rmatvec(weights[:, None] * loss.grad(state.offsets, y))
    z = state.offsets + op.matvec(state.solution)
    g = op.rmatvec(weights[:, None] * loss.grad(z, y)) + (
        state.damping * state.solution)
  else:
    g0 = state.anchor_grad - g0_f
    z = state.solution_logits
    g = state.solution_grad - g_f
  return newton.Start(z, g, float(jnp.linalg.norm(g0))), g0


def refresh_preconditioner(state: PreparedState,
                           rows: np.ndarray | None = None) -> PreparedState:
  """``M`` formed again at the current solution's logits over the kept rows
  (``"ce"``): ``z̄ = b + J x_S`` for every row, ``Σ_{i kept} J_iᵀH_i(z̄_i)J_i``
  and its factor. Later downdates use the same ``z̄``. ``M`` only
  preconditions: later answers are the same up to the solve's tolerance,
  in fewer steps. Cost: ``N·C·P²`` flops; ``rows`` (sample positions)
  restricts it to those samples, to time a fraction of that work.
  An ``"mse"`` state is returned as is."""
  if not isinstance(state, PreparedState):
    raise TypeError("state must be a PreparedState.")
  if state.loss != "ce":
    return state
  loss = objective.cross_entropy
  c, prec = state.num_outputs, state.solve_dtype
  g_dtype = ravel_pytree(state.lin_params)[0].dtype
  with kernels.dtype_scope(prec):  # float64 rows stay float64
    if rows is not None:
      rows = np.asarray(rows)
      state = state._replace(
          jacobian=state.jacobian[_row_index(rows, c)],
          offsets=state.offsets[rows], active=state.active[rows],
          ref_logits=state.ref_logits[rows], solution_logits=(
              None if state.solution_logits is None
              else state.solution_logits[rows]))
    op = newton.DenseJacobian(state.jacobian, c, ggn_dtype=g_dtype)
    z = state.offsets + op.matvec(state.solution).reshape(-1, c)
    keep = jnp.asarray(state.active, z.dtype)[:, None, None]
    gram = op.ggn(loss.hess_factor(z) * keep, prec)
    chol = _cholesky(gram, state.damping)
    if not bool(jnp.all(jnp.isfinite(chol))):
      return state  # keep the downdated one; it still preconditions
  return state._replace(gram=gram, chol=chol, ref_logits=z)


def compact(state: PreparedState) -> PreparedState:
  """The state without the rows of forgotten samples (states with rows).

  A cross-entropy request only masks its samples' Jacobian rows, offsets,
  labels and logits (``active``), so that it need not copy the ``N·C × P``
  rows. ``compact`` drops them: the state then holds nothing computed from a
  forgotten sample but the sums in ``gram`` (from which they were
  subtracted). Later requests give the same answers (the dropped rows had
  weight 0). An ``"mse"`` state prepared with ``keep_rows`` is compacted
  the same way; one without rows is returned as is.
  """
  if not isinstance(state, PreparedState):
    raise TypeError("state must be a PreparedState.")
  if state.jacobian is None or bool(np.all(state.active)):
    return state
  keep = np.flatnonzero(state.active)
  c = state.num_outputs
  pick = lambda a: None if a is None else a[keep]  # noqa: E731
  with kernels.dtype_scope(state.solve_dtype):  # float64 stays float64
    # Rows by index (a reshape to pick samples would copy all of them).
    jac = state.jacobian[_row_index(keep, c)]
    return state._replace(
        jacobian=jac, offsets=pick(state.offsets),
        labels=state.labels[keep], logits=state.logits[keep],
        ref_logits=pick(state.ref_logits), row_ids=state.row_ids[keep],
        solution_logits=pick(state.solution_logits),
        active=np.ones(keep.size, bool))
