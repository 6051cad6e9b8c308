"""Deletion requests: prepare once over ``D``, then forget with work ∝ ``|D_f|``.

Eq. (1) in parameter space (:func:`fastntk_jax.update.parameter_space`) needs
``A_r = J_rᵀJ_r``, ``A = JᵀJ`` and ``g_r = J_rᵀ r_r`` with ``J`` and the
residuals ``r = f_0 − Y`` at the linearisation point. Over ``D`` they are
sums over samples, so after one pass over ``D`` (:func:`prepare`) a request
to forget ``D_f`` (:func:`forget`) needs only ``J_f``::

    A_r = A − J_fᵀJ_f,   g_r = g − J_fᵀ r_f
    x_r = −(A_r + λI)⁻¹ g_r
    w_r − w_D = (A + λI)⁻¹ (J_fᵀJ_f x_r + J_fᵀ r_f)

The Cholesky factor of ``A_r + λI`` is the next request's ``A + λI``, so a
request costs ``|D_f|·C`` Jacobian rows, one ``P×P`` rank-``|D_f|·C`` update
and one ``P×P`` factorisation, whatever ``|D|``. Requests compose:
``w_r − w_D = x_r − x_D`` with ``x_S`` the linear ridge solution from ``w_0``
on ``S`` (expand ``(A + λI)(x_r − x_D)``), so forgetting ``F_1`` then ``F_2``
gives exactly what forgetting ``F_1 ∪ F_2`` at once gives, and both equal
:func:`fastntk_jax.unlearn.unlearn` from scratch.

The ``P×P`` matrices and their solves run in ``precision`` (float64 by
default, through :func:`jax.enable_x64` locally): ``A`` sums ``N·C`` outer
products and its condition number grows with ``N``, and a request subtracts
from it, which float32 would not survive at full-dataset scale. Jacobians
stay in the model's dtype.

Example::

  state = prepare(apply_fn, w_D, (x, y), init_params=w_0, ids=np.arange(len(y)))
  res = forget(state, apply_fn, w_D, (x[req], y[req]), ids=req)
  res2 = forget(res.state, apply_fn, res.params, (x[req2], y[req2]), ids=req2)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax import kernels
from fastntk_jax import update
from fastntk_jax.unlearn import _LOSSES
from fastntk_jax.unlearn import _check_finite_tree
from fastntk_jax.unlearn import _check_split
from fastntk_jax.unlearn import _residuals
from fastntk_jax.unlearn import DEFAULT_DAMPING
from fastntk_jax.unlearn import RESIDUAL_FNS
from fastntk_jax.unlearn import UnlearningError

__all__ = ["DeletionResult", "PreparedState", "forget", "prepare"]

_PRECISIONS = {"float64": np.float64, "float32": np.float32}


class PreparedState(NamedTuple):
  """What a deletion request needs about the current training set.

  Attributes:
    lin_params: the linearisation point (``w_0`` or ``w_D``), a pytree.
    gram: ``A = JᵀJ`` over the current set, ``(P, P)`` in ``precision``.
    grad: ``g = Jᵀ r``, ``(P,)``.
    chol: lower Cholesky factor of ``A + λI``.
    num_samples: samples in the current set.
    num_outputs: C.
    damping: λ > 0.
    loss: ``"mse"`` or ``"ce"`` (the residual).
    precision: ``"float64"`` or ``"float32"``.
    ids: the current set's sample ids (sorted int64), or None if untracked.
    input_shape: per-sample input shape; input_dtype: its dtype name.
  """
  lin_params: Any
  gram: jax.Array
  grad: jax.Array
  chol: jax.Array
  num_samples: int
  num_outputs: int
  damping: float
  loss: str
  precision: str
  ids: np.ndarray | None
  input_shape: tuple
  input_dtype: str


class DeletionResult(NamedTuple):
  """Result of :func:`forget`.

  Attributes:
    params: ``w_r``, like ``params``.
    state: the :class:`PreparedState` of the remaining set, for the next
      request.
    num_forget: samples forgotten by this request.
    delta_norm: ``‖w_r − w_D‖₂``.
    forget_residual_norm: ``‖V‖₂ = ‖J_f x_r + r_f‖₂``.
    relative_residual: the larger relative residual of the two solves.
    seconds: wall time of the request.
  """
  params: Any
  state: PreparedState
  num_forget: int
  delta_norm: float
  forget_residual_norm: float
  relative_residual: float
  seconds: float


def _check_precision(precision):
  if precision not in _PRECISIONS:
    raise ValueError(f"precision must be one of {tuple(_PRECISIONS)}, got "
                     f"{precision!r}.")


def _check_ids(name, ids, n):
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.shape[0] != n:
    raise ValueError(f"{name}: expected {n} ids (one per sample), got shape "
                     f"{ids.shape}.")
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"{name}: ids must be integers, got dtype {ids.dtype}.")
  if np.unique(ids).size != n:
    raise ValueError(f"{name}: ids must be unique; a sample id repeats.")
  return np.sort(ids.astype(np.int64))


def prepare(apply_fn: Callable[[Any, Any], jax.Array], params, data, *,
            init_params=None, damping: float = DEFAULT_DAMPING,
            loss: str = "mse", ids=None, precision: str = "float64",
            block_size: int | None = None, mesh=None) -> PreparedState:
  """One pass over ``D`` after fine-tuning: what every later request needs.

  Args:
    apply_fn: ``apply_fn(params, x) -> (N, C)``, samples independent.
    params: ``w_D`` (used as the linearisation point when ``init_params`` is
      None, as in :func:`fastntk_jax.unlearn.unlearn`).
    data: ``(x, y)``, the whole training set ``D``.
    init_params: ``w_0``, the linearisation point.
    damping: λ > 0 (requests use Cholesky factors; for the λ → 0⁺ limit use
      :func:`fastntk_jax.unlearn.unlearn` with ``damping=0``).
    loss: ``"mse"`` or ``"ce"``, the residual as in ``unlearn``.
    ids: optional unique integer id per sample of ``D``; requests then name
      their samples and are checked against what remains.
    precision: ``"float64"`` (default) or ``"float32"`` for the ``P×P``
      matrices.
    block_size: samples per Jacobian block.
    mesh: devices to shard the Jacobian work over
      (:func:`fastntk_jax.kernels.default_mesh` when None).

  Returns:
    :class:`PreparedState`. Memory: two ``P×P`` matrices in ``precision``.
  """
  x, y = _check_split("data", data)
  if y.shape[0] == 0:
    raise ValueError("data: the training set is empty.")
  if isinstance(damping, bool) or not isinstance(
      damping, (int, float, np.floating, np.integer)):
    raise TypeError(f"damping must be a float > 0, got {type(damping)}.")
  damping = float(damping)
  if not (math.isfinite(damping) and damping > 0):
    raise ValueError(f"damping must be finite and > 0 for deletion requests, "
                     f"got {damping}; use unlearn(damping=0) for the λ → 0⁺ "
                     "limit.")
  if loss not in _LOSSES:
    raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}.")
  _check_precision(precision)
  _check_finite_tree("params", params)
  if init_params is not None:
    _check_finite_tree("init_params", init_params)
    if (jax.tree_util.tree_structure(init_params)
        != jax.tree_util.tree_structure(params)):
      raise ValueError("init_params must have the tree structure of params.")
  ids = None if ids is None else _check_ids("ids", ids, y.shape[0])
  c = kernels.num_outputs(apply_fn, params, x)
  if y.min() < 0 or y.max() >= c:
    raise ValueError(f"data: labels must lie in [0, {c}), got range "
                     f"[{y.min()}, {y.max()}].")
  mesh = kernels._resolve_mesh(mesh)
  lin = params if init_params is None else init_params
  # One pass: the logits at the linearisation point, residuals and Grams.
  a, g, f0 = kernels.gram(apply_fn, lin, x, RESIDUAL_FNS[loss], y=y,
                          precision=precision, block_size=block_size,
                          mesh=mesh, return_outputs=True)
  if not bool(jnp.all(jnp.isfinite(f0))):
    raise ValueError("apply_fn returns NaN or infinite logits at the "
                     "linearisation point.")
  with kernels.precision_scope(precision):
    chol = _cholesky(a, damping)
    ok = bool(jnp.all(jnp.isfinite(chol)))
  if not ok:
    raise UnlearningError(
        f"prepare: A + λI is not numerically positive definite at damping="
        f"{damping} in {precision}; raise damping or use precision='float64'.")
  return PreparedState(lin, a, g, chol, int(y.shape[0]), c, damping, loss,
                       precision, ids, tuple(np.shape(x)[1:]),
                       str(jnp.result_type(x)))


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


def forget(state: PreparedState, apply_fn: Callable[[Any, Any], jax.Array],
           params, forget_set, *, ids=None, block_size: int | None = None,
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
    mesh: as in :func:`prepare`.

  Returns:
    :class:`DeletionResult`; ``result.state`` describes ``D`` without
    ``forget_set``.

  Raises:
    ValueError: bad input; ids not in the current set; nothing would remain.
    UnlearningError: ``A_r + λI`` is not positive definite — the samples were
      not part of the prepared set (without ids this cannot be checked
      otherwise).
  """
  t0 = time.perf_counter()
  if not isinstance(state, PreparedState):
    raise TypeError("state must be the PreparedState returned by prepare() or "
                    "by the previous forget() call.")
  x_f, y_f = _check_split("forget_set", forget_set)
  n_f = int(y_f.shape[0])
  if n_f == 0:
    raise ValueError("forget_set is empty; there is nothing to forget.")
  if tuple(np.shape(x_f)[1:]) != state.input_shape or str(
      jnp.result_type(x_f)) != state.input_dtype:
    raise ValueError(
        f"forget_set: inputs are {np.shape(x_f)[1:]} {jnp.result_type(x_f)} "
        f"but the prepared set has {state.input_shape} {state.input_dtype}; "
        "prepare both the same way.")
  if y_f.min() < 0 or y_f.max() >= state.num_outputs:
    raise ValueError(f"forget_set: labels must lie in [0, "
                     f"{state.num_outputs}).")
  if n_f >= state.num_samples:
    raise ValueError(f"forget_set has {n_f} samples but the prepared set has "
                     f"{state.num_samples}; at least one must remain. To "
                     "forget everything, reset to init_params.")
  remaining = state.ids
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
  # ---- work ∝ |D_f| --------------------------------------------------------
  mesh = kernels._resolve_mesh(mesh)
  lin = state.lin_params
  a_f, g_f, f0 = kernels.gram(apply_fn, lin, x_f, RESIDUAL_FNS[state.loss],
                              y=y_f, precision=state.precision,
                              block_size=block_size, mesh=mesh,
                              return_outputs=True)
  r_f = _residuals(f0, y_f, state.loss).reshape(n_f, -1)
  with kernels.precision_scope(state.precision):
    # Everything on the request's devices (the state may come from another
    # mesh, or from a checkpoint on the host).
    a, g, chol, rr_f, lam = kernels._replicate(mesh, (
        state.gram, state.grad, state.chol,
        jnp.sum(jnp.asarray(r_f, state.gram.dtype) ** 2),
        jnp.asarray(state.damping, state.gram.dtype)))
    delta, a_r, g_r, chol_r, res, v = _request(a, g, chol, a_f, g_f, rr_f,
                                               lam)
    ok = bool(jnp.all(jnp.isfinite(chol_r))) and bool(
        jnp.all(jnp.isfinite(delta)))
    delta_norm = float(jnp.linalg.norm(delta))
    res, v = float(res), float(v)
    flat, unravel = ravel_pytree(params)
    delta = delta.astype(flat.dtype)
  if not ok:
    raise UnlearningError(
        "forget: A_r + λI is not positive definite after removing the "
        "request's samples. Were they part of the prepared set? Track them "
        "with prepare(..., ids=...); otherwise raise damping or use "
        "precision='float64'.")
  new_params = jax.tree_util.tree_map(
      lambda w, d: (w + d).astype(jnp.result_type(w)), params, unravel(delta))
  jax.block_until_ready(new_params)
  new_state = state._replace(gram=a_r, grad=g_r, chol=chol_r,
                             num_samples=state.num_samples - n_f, ids=remaining)
  return DeletionResult(new_params, new_state, n_f, delta_norm, v, res,
                        time.perf_counter() - t0)
