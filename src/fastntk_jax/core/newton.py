"""The linearised model's regularised loss, minimised by Newton's method.

This is Fast-NTK for any convex per-sample loss (:mod:`fastntk_jax.core.objective`),
cross-entropy in particular. Notation: ``w_lin`` is the linearisation point
(where ``J = ∂f/∂w`` and ``f`` are taken), ``w_0`` the *anchor* (the centre of
the ridge term: the parameters fine-tuning started from) and ``x = w − w_0``.
For a set ``S`` of samples the linearised model's logits and objective are::

    z_S(x) = b_S + J_S x,      b_S = f(w_lin; S) + J_S (w_0 − w_lin)
    Φ_S(x) = Σ_{i∈S} ℓ(z_i(x), y_i) + (λ/2) ‖x‖²,      x_S = argmin Φ_S

``λ`` multiplies ``½‖w − w_0‖²`` against the *sum* of per-sample losses, so the
same λ means the same thing for every loss and every ``N``. Unlearning ``D_f``
from ``D = D_r ∪ D_f`` is ``w_r = w_D + (x_{D_r} − x_D)``: for a model that is
linear in ``w`` and trained to the minimiser of ``Φ_D`` (``w_D = w_0 + x_D``)
this is ``w_0 + x_{D_r}``, i.e. exact retraining. For squared error ``Φ`` is
quadratic, one Newton step solves it, and the difference is Eq. (1) of
Fast-NTK (:mod:`fastntk_jax.core.update`).

``Φ_S`` is strongly convex for λ > 0. Because ``z`` is affine in ``x``, its
Hessian is the generalised Gauss-Newton matrix::

    ∇Φ = Jᵀ ℓ'(z) + λx,        ∇²Φ = Jᵀ H J + λI,        H = blockdiag(H_i)

Three forms of damped Newton (Armijo backtracking on ``Φ``), with the same
iterates up to rounding:

* :func:`solve_primal` — ``∇²Φ`` as a ``P×P`` matrix (float32 products summed
  in float64), Cholesky. The Hessian only sets the direction; the gradient and
  ``Φ`` are evaluated in float64, so the fixed point is that of float64.
* :func:`solve_newton_cg` — each Newton system by (preconditioned) conjugate
  gradients with ``v ↦ JᵀHJv``: matrix-free (one JVP and one VJP pass per
  product) or with kept Jacobian rows; inexact Newton with forcing term
  ``η = min(½, √(‖∇Φ‖/‖∇Φ(0)‖))``.
* :func:`solve_dual` — kernel space, ``x = Jᵀβ``, ``Θ = JJᵀ``: ``z = b + Θβ``,
  ``‖x‖² = βᵀΘβ`` and the Newton step ``(HΘ + λI)Δβ = −(ℓ'(z) + λβ)`` solved
  through the symmetric ``B = λI + LᵀΘL`` (``H = LLᵀ``)::

      Δβ = −(1/λ) [v − L B⁻¹ Lᵀ Θ v],     v = ℓ'(z) + λβ

  (iteratively reweighted least squares); ``JᵀΔβ`` is the primal Newton step.

Every solve reports its iterations, the final relative gradient norm
``‖∇Φ_S(x)‖ / max(‖∇Φ_S(0)‖, λ‖x‖)`` (:class:`NewtonReport`) and a status
(``"converged"``,
``"max_iterations"``, ``"line_search_failed"``, ``"factorisation_failed"``);
it never raises on a numerical failure — the caller decides.

A :class:`DenseJacobian` keeps ``J`` (``N·C × P``) in memory; a
:class:`PassJacobian` recomputes what each product needs from ``apply_fn``
(JVP/VJP passes; a Jacobian pass per Gauss-Newton matrix). Per-sample
``weights`` (0 or 1) select a subset of the rows without copying them.

References:
  Golatkar, Achille, Soatto, ECCV 2020, https://arxiv.org/abs/2003.02960;
  Li et al., Fast-NTK, https://arxiv.org/abs/2312.14923;
  Nocedal and Wright, Numerical Optimization (2006), ch. 3 and 7
  (backtracking, inexact Newton-CG).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax.core import cg
from fastntk_jax.core import kernels
from fastntk_jax.core import validate
from fastntk_jax.core.objective import Loss

__all__ = [
    "DenseJacobian",
    "NewtonReport",
    "PassJacobian",
    "Start",
    "default_tol",
    "solve_dual",
    "solve_newton_cg",
    "solve_preconditioned",
    "solve_primal",
]

_HI = jax.lax.Precision.HIGHEST
_ARMIJO = 1e-4
_HALVINGS = 40
#: Rows of ``J`` per block when a :class:`DenseJacobian` forms ``JᵀHJ``.
_GGN_BLOCK_BYTES = 256 * 2**20


class NewtonReport(NamedTuple):
  """Diagnostics of one Newton solve (Python scalars).

  Attributes:
    converged: the relative gradient norm reached ``tol``.
    status: ``"converged"``, ``"max_iterations"``, ``"line_search_failed"``
      (no decrease was found along a Newton direction: usually ``tol`` below
      the rounding floor) or ``"factorisation_failed"``.
    iterations: Newton steps taken.
    grad_norm: ``‖∇Φ_S(x)‖ / max(‖∇Φ_S(0)‖, λ‖x‖)`` at the returned ``x``:
      the gradient relative to the larger of its value at the anchor and the
      ridge term it balances (``∇Φ = Jᵀℓ' + λx`` sums two terms of about
      ``λ‖x‖`` at the minimiser, so rounding is relative to that). Because
      ``∇²Φ ⪰ λI``, ``‖x − x_S‖ ≤ ‖∇Φ_S(x)‖/λ ≤ grad_norm ·
      max(‖∇Φ_S(0)‖/λ, ‖x‖)``.
    objective: ``Φ_S(x)``.
    cg_steps: conjugate-gradient steps over all Newton steps (0 for direct
      solves).
  """
  converged: bool
  status: str
  iterations: int
  grad_norm: float
  objective: float
  cg_steps: int = 0


def default_tol(exact: bool) -> float:
  """Relative gradient tolerance: 1e-9 when the solve's products are float64
  (kept rows or kernels in a float64 solve), 1e-5 otherwise — float32 model
  passes or a float32 solve, whose rounding floor is about 1e-6."""
  return 1e-9 if exact else 1e-5


def _tol(op, dtype, tol):
  if tol is not None:
    return float(tol)
  return default_tol(bool(op.exact) and jnp.dtype(dtype) == jnp.float64)


# ---------------------------------------------------------------- operators
#: Elements of ``J`` converted to the vector's dtype at a time inside a
#: mixed-dtype product (about 8 MB of float64: the converted block stays in
#: cache). Converting all of ``J`` at once inside one product writes a
#: float64 copy of it (about 12x slower on CPU); converting it once at
#: creation doubles the memory and the bytes each product reads.
_CONVERT_ELEMS = 2**20


def _row_blocks(j):
  """``(rows per block, blocks)`` for :func:`_dense_matvec` and
  :func:`_dense_rmatvec`: whole blocks of about ``_CONVERT_ELEMS``."""
  per = max(1, min(j.shape[0], _CONVERT_ELEMS // max(1, j.shape[1])))
  return per, j.shape[0] // per


def _block(j, i, per):
  """Rows ``[i·per, (i+1)·per)`` of ``j``: a dynamic slice, so that no copy
  of the other rows is made (a static ``j[:k]`` of most rows is one)."""
  return jax.lax.dynamic_slice_in_dim(j, i * per, per)


@functools.partial(jax.jit, static_argnums=(2,))
def _dense_matvec(j, v, c):
  if j.dtype == v.dtype:
    return jnp.matmul(j, v, precision=_HI).reshape(-1, c)
  # Exact products in v's dtype: each block of rows converted as it is used.
  per, nb = _row_blocks(j)
  head = jax.lax.map(
      lambda i: jnp.matmul(_block(j, i, per).astype(v.dtype), v,
                           precision=_HI), jnp.arange(nb)).reshape(-1)
  tail = jnp.matmul(j[per * nb:].astype(v.dtype), v, precision=_HI)
  return jnp.concatenate([head, tail]).reshape(-1, c)


@jax.jit
def _dense_rmatvec(j, u):
  u = u.reshape(-1)
  if j.dtype == u.dtype:
    return jnp.matmul(u, j, precision=_HI)
  per, nb = _row_blocks(j)

  def add(i, acc):
    ub = jax.lax.dynamic_slice_in_dim(u, i * per, per)
    return acc + jnp.matmul(ub, _block(j, i, per).astype(u.dtype),
                            precision=_HI)

  acc = jnp.matmul(u[per * nb:], j[per * nb:].astype(u.dtype), precision=_HI)
  return jax.lax.fori_loop(0, nb, add, acc)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _dense_step_pass(loss, j, d, z, y, w, c):
  """``(J d, Jᵀ(w·∇ℓ(z + J d)))`` in one read of ``J``: each block of whole
  samples' rows, converted to ``d``'s dtype, gives its ``J d`` and, at the
  logits ``z + J d``, its share of the gradient's data term while it is in
  cache. Two passes (``J d``, then ``Jᵀ u``) read the rows twice."""
  n = z.shape[0]
  per = max(1, min(n, _CONVERT_ELEMS // max(1, j.shape[1]) // c))
  nb = n // per

  def part(jb, zb, yb, wb):
    jb = jb.astype(d.dtype)
    jdb = jnp.matmul(jb, d, precision=_HI).reshape(-1, c)
    gb = loss.grad(zb + jdb, yb) * wb[:, None]
    return jdb, jnp.matmul(gb.reshape(-1), jb, precision=_HI)

  def add(i, carry):
    jd, acc = carry
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * per, per)  # noqa: E731
    jdb, gb = part(jax.lax.dynamic_slice_in_dim(j, i * per * c, per * c),
                   sl(z), sl(y), sl(w))
    return jax.lax.dynamic_update_slice_in_dim(jd, jdb, i * per, 0), acc + gb

  s = per * nb
  jdt, acc = part(j[s * c:], z[s:], y[s:], w[s:])
  jd = jnp.zeros(z.shape, d.dtype).at[s:].set(jdt)
  return jax.lax.fori_loop(0, nb, add, (jd, acc))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dense_ggn_block(j, l, c, dtype):
  jb = j.astype(dtype).reshape(-1, c, j.shape[-1])
  rows = jnp.einsum("bcd,bcp->bdp", l.astype(dtype), jb,
                    precision=_HI).reshape(-1, j.shape[-1])
  return jnp.matmul(rows.T, rows, precision=_HI)


@functools.partial(jax.jit, static_argnums=(3,))
def _dense_hvp(j, h, v, c):
  jv = _dense_matvec(j, v, c)
  hjv = jnp.einsum("bcd,bd->bc", h.astype(v.dtype), jv, precision=_HI)
  return _dense_rmatvec(j, hjv)


class DenseJacobian:
  """``J`` (``N·C × P``, sample-major rows) kept in memory.

  The rows stay in the dtype they were computed in (float32 for a float32
  model) unless ``dtype`` is given; ``J v`` and ``Jᵀ u`` are exact products in
  the vector's dtype all the same: each block of rows is converted as it is
  used (float64 vectors in a float64 solve give float64 products of the
  given ``J``). Kept in float32, the rows take half the memory of float64
  ones and each product reads half the bytes (``benchmarks/dense_products.py``
  on 2 CPU cores, N·C × P = 100,000 × 2,026: ``Jᵀu`` 0.038 s against 0.056 s
  from float64 rows, ``J v`` 0.038 s against 0.030 s). ``JᵀHJ`` is formed
  in the rows' dtype (``ggn_dtype`` overrides) from blocks of rows and
  summed in the requested dtype: it only sets Newton directions. Create it
  inside :func:`fastntk_jax.core.kernels.dtype_scope` for float64.
  """
  exact = True

  def __init__(self, jac: jax.Array, num_outputs: int, dtype=None,
               ggn_dtype=None):
    jac = jnp.asarray(jac)
    self.ggn_dtype = jac.dtype if ggn_dtype is None else jnp.dtype(ggn_dtype)
    self.jac = jac if dtype is None else jac.astype(dtype)
    self.c = int(num_outputs)
    self.n = self.jac.shape[0] // self.c
    self.p = self.jac.shape[1]

  def matvec(self, v):
    return _dense_matvec(self.jac, v, self.c)

  def rmatvec(self, u):
    return _dense_rmatvec(self.jac, u)

  def ggn(self, factors, dtype):
    """``Σ_i J_iᵀ L_i L_iᵀ J_i`` for ``factors`` ``L`` ``(N, C, C)``."""
    per = max(1, _GGN_BLOCK_BYTES // max(1, self.c * self.p
                                         * self.jac.dtype.itemsize))
    out = jnp.zeros((self.p, self.p), dtype)
    for s in range(0, self.n, per):
      e = min(s + per, self.n)
      out = out + _dense_ggn_block(self.jac[s * self.c:e * self.c],
                                   factors[s:e], self.c,
                                   self.ggn_dtype).astype(dtype)
    return 0.5 * (out + out.T)

  def ggn_matvec(self, hessians):
    return lambda v: _dense_hvp(self.jac, hessians, v, self.c)

  def step_pass(self, d, z, y, w, loss):
    """``(J d, Jᵀ(w·∇ℓ(z + J d)))``: a Newton step's direction product and
    the gradient's data term at the full step, in one read of the rows
    (:func:`_newton` uses the second when the line search takes ``t = 1``)."""
    return _dense_step_pass(loss, self.jac, d, z, y, w, self.c)


class PassJacobian:
  """``J`` of ``apply_fn`` at ``params`` over inputs ``x``, never stored.

  ``J v`` is a JVP pass, ``Jᵀ u`` a VJP pass, ``JᵀHJ`` a Jacobian pass
  (:func:`fastntk_jax.core.kernels.gram` with factors) and ``v ↦ JᵀHJv`` one
  linearised pass and its transpose (:func:`fastntk_jax.core.cg.gauss_newton_matvec`),
  all in blocks of samples over ``mesh``. The passes run in the model's dtype
  and outside any float64 scope of the solver (the model is traced as the
  caller configured JAX).
  """
  exact = False

  def __init__(self, apply_fn, params, x, *, block_size=None, mesh=None,
               x64: bool | None = None):
    self.apply_fn, self.params = apply_fn, params
    self.x = jnp.asarray(x)
    flat, self._unravel = ravel_pytree(params)
    self.dtype = flat.dtype
    self.exact = self.dtype == jnp.float64
    self.n, self.p = int(self.x.shape[0]), int(flat.shape[0])
    self.c = kernels.num_outputs(apply_fn, params, self.x)
    self.blk = {"block_size": block_size, "mesh": mesh}
    self._x64 = bool(jax.config.jax_enable_x64) if x64 is None else x64

  def _model(self):
    return jax.enable_x64(self._x64)

  def matvec(self, v):
    out_dtype = v.dtype
    v = v.astype(self.dtype)
    with self._model():
      out = kernels.jvp(self.apply_fn, self.params, self.x, self._unravel(v),
                        **self.blk)
    return out.astype(out_dtype)

  def rmatvec(self, u):
    out_dtype = u.dtype
    u = u.astype(self.dtype)
    with self._model():
      g = kernels.vjp(self.apply_fn, self.params, self.x, u, **self.blk)
    return ravel_pytree(g)[0].astype(out_dtype)

  def ggn(self, factors, dtype):
    factors = factors.astype(self.dtype)
    with self._model():
      a, _ = kernels.gram(self.apply_fn, self.params, self.x, weights=factors,
                          solve_dtype=np.dtype(dtype).name, **self.blk)
    return a

  def ggn_matvec(self, hessians):
    hessians = hessians.astype(self.dtype)
    with self._model():
      mv = cg.gauss_newton_matvec(self.apply_fn, self.params, self.x,
                                  hessians=hessians, **self.blk)

    def matvec(v):
      out_dtype = v.dtype
      v = v.astype(self.dtype)
      with self._model():
        out = mv(v)
      return out.astype(out_dtype)
    return matvec


# ------------------------------------------------------------ the objective
@functools.partial(jax.jit, static_argnums=(0,))
def _phi(loss: Loss, z, y, w, x2, damping):
  return jnp.sum(w * loss.value(z, y)) + 0.5 * damping * x2


@functools.partial(jax.jit, static_argnums=(0,))
def _line_values(loss: Loss, z, jd, y, w, x2, xd, d2, damping, ts):
  """``Φ(x + t d)`` for every step length in ``ts``, one after another: a
  ``vmap`` would hold ``len(ts)`` copies of the ``(N, C)`` logits (32 MB at
  N = 10,000, C = 10, allocated and freed every step)."""
  def one(t):
    return (jnp.sum(w * loss.value(z + t * jd, y))
            + 0.5 * damping * (x2 + 2 * t * xd + t * t * d2))
  return jax.lax.map(one, ts)


_STEPS = 0.5 ** np.arange(_HALVINGS)


def _line_search(loss, z, jd, y, w, x, d, phi, slope, damping):
  """Armijo backtracking along ``d``: the first ``t = 2⁻ᵏ`` with
  ``Φ(x + td) ≤ Φ(x) + 10⁻⁴ t ∇Φ·d``; every trial from one vectorised call."""
  ts = jnp.asarray(_STEPS, z.dtype)
  vals = np.asarray(_line_values(loss, z, jd, y, w, jnp.vdot(x, x),
                                 jnp.vdot(x, d), jnp.vdot(d, d), damping, ts))
  ok = vals <= float(phi) + _ARMIJO * _STEPS * float(slope)
  if not ok.any():
    return None, None
  k = int(np.argmax(ok))
  return float(_STEPS[k]), float(vals[k])


def _relative(g, x, g0n: float, lam: float) -> float:
  """``‖∇Φ(x)‖ / max(‖∇Φ(0)‖, λ‖x‖)`` (see :class:`NewtonReport`)."""
  return float(jnp.linalg.norm(g)) / max(g0n, lam * float(jnp.linalg.norm(x)))


def _below_resolution(slope, phi, dtype) -> bool:
  """Whether ``|∇Φ·d|`` is within rounding of ``Φ`` (no Armijo test can
  then tell a decrease)."""
  eps = float(jnp.finfo(dtype).eps)
  return abs(float(slope)) <= 1e3 * eps * max(abs(float(phi)), 1.0)


def _check_problem(op, b, y, weights, damping, x0):
  n, c = op.n, op.c
  if b.shape != (n, c):
    raise ValueError(f"b must have shape (N, C) = {(n, c)}, got {b.shape}.")
  if np.shape(y) != (n,):
    raise ValueError(f"y must have shape ({n},), got {np.shape(y)}.")
  if weights is not None:
    if np.shape(weights) != (n,):
      raise ValueError(f"weights must have shape ({n},), got "
                       f"{np.shape(weights)}.")
    wt = np.asarray(weights, np.float64)
    if not (np.all(np.isfinite(wt)) and np.all(wt >= 0)):
      raise ValueError("weights must be finite and >= 0 (0 drops a sample).")
  if isinstance(damping, bool) or not isinstance(
      damping, (int, float, np.floating, np.integer)) or not (
          math.isfinite(float(damping)) and float(damping) > 0):
    raise ValueError(f"damping must be a finite float > 0, got {damping!r}; "
                     "the problem is only strongly convex for λ > 0.")
  if x0 is not None and np.shape(x0) != (op.p,):
    raise ValueError(f"x0 must have shape ({op.p},), got {np.shape(x0)}.")


class Start(NamedTuple):
  """What a solve computes before its first step, when the caller has it
  already (a deletion request downdates the previous solve's): it then
  skips the three passes over ``J`` that would form it.

  Attributes:
    logits: ``z = b + J x0``, ``(N, C)``, for every row (weighted or not).
    grad: ``∇Φ_S(x0)`` over the weighted rows, ``(P,)``.
    grad0_norm: ``‖∇Φ_S(0)‖``, the scale of the relative tolerance.
  """
  logits: jax.Array
  grad: jax.Array
  grad0_norm: float


def _check_start(op, start, x0):
  if start is None:
    return
  if x0 is None:
    raise ValueError("start: give x0 too (start describes the solve at x0).")
  if not isinstance(start, Start):
    raise TypeError("start must be a newton.Start or None.")
  if np.shape(start.logits) != (op.n, op.c) or np.shape(start.grad) != (op.p,):
    raise ValueError(f"start: logits must be {(op.n, op.c)} and grad "
                     f"{(op.p,)}, got {np.shape(start.logits)} and "
                     f"{np.shape(start.grad)}.")
  if not (math.isfinite(float(start.grad0_norm))
          and float(start.grad0_norm) >= 0):
    raise ValueError("start: grad0_norm must be finite and >= 0, got "
                     f"{start.grad0_norm!r}.")


def _newton(op, b, y, weights, loss: Loss, damping: float, x0, tol: float,
            max_iter: int, direction, dtype, start: Start | None = None
            ) -> tuple[jax.Array, NewtonReport, Start]:
  """Damped Newton; ``direction(z, g) -> (d, info)`` solves the Newton system.
  Returns the solution, the report and the :class:`Start` at the solution."""
  b = jnp.asarray(b, dtype)
  y = jnp.asarray(y)
  w = (jnp.ones((op.n,), dtype) if weights is None
       else jnp.asarray(weights, dtype))
  lam = float(damping)
  damping = lam
  tiny = float(jnp.finfo(dtype).tiny)
  if start is not None:
    x = jnp.asarray(x0, dtype)
    z, g = jnp.asarray(start.logits, dtype), jnp.asarray(start.grad, dtype)
    g0n = max(float(start.grad0_norm), tiny)
  else:
    g0 = op.rmatvec(w[:, None] * loss.grad(b, y))
    g0n = max(float(jnp.linalg.norm(g0)), tiny)
    if x0 is None:
      x, z, g = jnp.zeros((op.p,), dtype), b, g0
    else:
      x = jnp.asarray(x0, dtype)
      z = b + op.matvec(x)
      g = op.rmatvec(w[:, None] * loss.grad(z, y)) + lam * x
  phi = _phi(loss, z, y, w, jnp.vdot(x, x), lam)
  status, it, cg_steps, last_full = "max_iterations", 0, 0, True
  while True:
    rel = _relative(g, x, g0n, lam)
    if rel <= tol:
      status = "converged"
      break
    if it >= max_iter:
      break
    d, info = direction(z, g, w, rel, x)
    if d is None:
      status = "factorisation_failed"
      break
    cg_steps += info
    slope = jnp.vdot(g, d)
    if not float(slope) < 0:  # not a descent direction: rounding floor
      status = "line_search_failed"
      break
    # With kept rows, J d and the gradient at the full step share one read
    # of J; a step that takes t = 1 then needs no second pass. After a step
    # that backtracked, the next is read twice as before (a full-step
    # gradient that is not used would cost more than a plain J d).
    full, step_pass = None, getattr(op, "step_pass", None)
    if step_pass is not None and last_full:
      jd, full = step_pass(d, z, y, w, loss)
    else:
      jd = op.matvec(d)
    if _below_resolution(slope, phi, dtype):
      # The predicted decrease is below Φ's rounding, so no Armijo test can
      # see it: take the full Newton step if it reduces the gradient (local
      # quadratic convergence), else stop.
      x1, z1 = x + d, z + jd
      g1 = (op.rmatvec(w[:, None] * loss.grad(z1, y)) if full is None
            else full) + lam * x1
      if not float(jnp.linalg.norm(g1)) < float(jnp.linalg.norm(g)):
        status = "line_search_failed"
        break
      x, z, g = x1, z1, g1
      phi = _phi(loss, z, y, w, jnp.vdot(x, x), lam)
      it += 1
      continue
    t, phi_new = _line_search(loss, z, jd, y, w, x, d, phi, slope, lam)
    if t is None:
      status = "line_search_failed"
      break
    x, z, phi = x + t * d, z + t * jd, phi_new
    g = (full if t == 1.0 and full is not None
         else op.rmatvec(w[:, None] * loss.grad(z, y))) + lam * x
    last_full = t == 1.0
    it += 1
  return x, NewtonReport(status == "converged", status, it, rel, float(phi),
                         cg_steps), Start(z, g, g0n)


def _result(out, return_start: bool):
  return out if return_start else out[:2]


def solve_primal(op, b, y, loss: Loss, damping: float, *, weights=None,
                 x0=None, tol: float | None = None, max_iter: int = 100,
                 solve_dtype: str = "float64", start: Start | None = None,
                 return_start: bool = False):
  """``x_S = argmin Φ_S`` by Newton with the ``P×P`` Gauss-Newton matrix.

  Args:
    op: :class:`DenseJacobian` or :class:`PassJacobian` over ``S`` (``N``
      samples, ``C`` logits, ``P`` parameters).
    b: ``(N, C)``, the linear model's logits at the anchor.
    y: ``(N,)`` integer labels.
    loss: a :class:`fastntk_jax.core.objective.Loss`.
    damping: λ > 0.
    weights: optional ``(N,)`` sample weights (0 drops a sample).
    x0: starting point ``(P,)`` (default 0, the anchor).
    tol: relative gradient tolerance (default :func:`default_tol`).
    max_iter: Newton steps at most.
    solve_dtype: dtype of ``x``, the gradient and the ``P×P`` matrix.
    start: a :class:`Start` at ``x0`` (requires ``x0``), to skip the three
      passes over ``J`` that would compute it; the caller vouches for it.
    return_start: also return the :class:`Start` at the solution.

  Returns:
    ``(x, NewtonReport)`` (and the :class:`Start` at ``x`` with
    ``return_start``); ``x`` in ``solve_dtype``. Cost per step: one
    Gauss-Newton matrix (``N·C·P²`` flops from kept rows, a Jacobian pass
    otherwise), one ``P×P`` Cholesky, one ``J v`` and one ``Jᵀ u``.
  """
  _check_problem(op, b, y, weights, damping, x0)
  _check_start(op, start, x0)
  dtype = validate.check_solve_dtype(solve_dtype)
  tol = _tol(op, dtype, tol)
  with kernels.dtype_scope(solve_dtype):
    eye = damping * jnp.eye(op.p, dtype=dtype)

    def direction(z, g, w, rel, x):
      del rel
      factors = loss.hess_factor(z) * jnp.sqrt(w)[:, None, None]
      chol = jnp.linalg.cholesky(op.ggn(factors, dtype) + eye)
      d = -jsl.cho_solve((chol, True), g)
      if not bool(jnp.all(jnp.isfinite(d))):
        return None, 0
      return d, 0

    return _result(_newton(op, b, y, weights, loss, damping, x0, tol,
                   max_iter, direction, dtype, start), return_start)


def solve_newton_cg(op, b, y, loss: Loss, damping: float, *, weights=None,
                    x0=None, tol: float | None = None, max_iter: int = 100,
                    cg_max_steps: int | None = None, preconditioner=None,
                    solve_dtype: str = "float64", start: Start | None = None,
                    return_start: bool = False):
  """``x_S = argmin Φ_S`` by inexact Newton-CG (no ``P×P`` matrix).

  Arguments as :func:`solve_primal`, and:
    cg_max_steps: CG steps per Newton system (default ``min(10·P, 1000)``).
    preconditioner: ``r ↦ M⁻¹ r`` with ``M ≈ JᵀHJ + λI`` symmetric positive
      definite (e.g. a Cholesky solve with the matrix of a nearby problem:
      :mod:`fastntk_jax.core.deletion` passes the prepared factor).

  Cost per Newton step: ``m`` products ``JᵀHJv`` (with a
  :class:`PassJacobian`, a JVP and a VJP pass each), one ``J v`` and one
  ``Jᵀ u``.
  """
  _check_problem(op, b, y, weights, damping, x0)
  _check_start(op, start, x0)
  dtype = validate.check_solve_dtype(solve_dtype)
  tol = _tol(op, dtype, tol)
  with kernels.dtype_scope(solve_dtype):

    def direction(z, g, w, rel, x):
      hess = loss.hess_matvec
      c = op.c
      eye = jnp.eye(c, dtype=dtype)
      # H_i as C×C matrices (columns H_i e_k), weighted by the sample weights.
      hm = jax.vmap(lambda e: hess(z, jnp.broadcast_to(e, z.shape)),
                    out_axes=2)(eye) * w[:, None, None]
      mv = op.ggn_matvec(hm)
      eta = min(0.5, math.sqrt(rel))
      d, info = cg.cg_solve(mv, -g, damping=damping, tol=eta,
                            max_steps=cg_max_steps,
                            preconditioner=preconditioner)
      if info.status == "breakdown" or not bool(jnp.all(jnp.isfinite(d))):
        return None, info.steps
      return d, info.steps

    return _result(_newton(op, b, y, weights, loss, damping, x0, tol,
                   max_iter, direction, dtype, start), return_start)


def solve_preconditioned(op, b, y, loss: Loss, damping: float, *,
                         preconditioner, weights=None, x0=None,
                         tol: float | None = None, max_iter: int = 30,
                         memory: int = 0, solve_dtype: str = "float64",
                         start: Start | None = None,
                         return_start: bool = False):
  """``x_S = argmin Φ_S`` with a fixed approximation ``M`` of the Hessian.

  With ``memory=0`` the step is ``d = −M⁻¹∇Φ(x)`` with backtracking: a
  preconditioned gradient iteration, i.e. Newton's method with the Hessian
  frozen at a nearby problem's. It converges linearly, at a rate about
  ``‖I − M⁻¹∇²Φ‖``, so it pays when ``M`` is close to the Hessian (a
  deletion request's remaining set, whose Gauss-Newton matrix at the
  prepared logits is ``M``).

  With ``memory=m > 0`` the step is L-BFGS's with ``M⁻¹`` as the initial
  inverse Hessian (the two-loop recursion over the last ``m`` pairs of
  steps and gradient changes): the pairs correct ``M`` along the directions
  the solve has explored, which turns the linear rate superlinear in
  practice (fewer steps when ``M`` is stale) at ``4m`` vector operations a
  step. ``Φ`` is strictly convex (λ > 0), so every pair has ``sᵀy > 0``
  and Armijo backtracking keeps the update positive definite.

  Cost per step either way: one ``J v`` and one ``Jᵀ u`` (two passes; one
  read of kept rows, :meth:`DenseJacobian.step_pass`, when the step is the
  full one) and one application of ``preconditioner``.

  Arguments as :func:`solve_newton_cg`; ``preconditioner`` (``r ↦ M⁻¹r``) is
  required. A run that does not reach ``tol`` in ``max_iter`` steps reports
  ``"max_iterations"``; :mod:`fastntk_jax.core.deletion` then continues with
  :func:`solve_newton_cg` from the returned point.
  """
  _check_problem(op, b, y, weights, damping, x0)
  _check_start(op, start, x0)
  dtype = validate.check_solve_dtype(solve_dtype)
  tol = _tol(op, dtype, tol)
  validate.check_positive_int_or_none("max_iter", max_iter)
  validate.check_int("memory", memory, 0, " (0: no L-BFGS pairs)")
  with kernels.dtype_scope(solve_dtype):
    pairs, last = [], {}

    def direction(z, g, w, rel, x):
      del z, w, rel
      if memory and last:
        sv, yv = x - last["x"], g - last["g"]
        sy = float(jnp.vdot(sv, yv))
        # sᵀy > 0 for a strictly convex Φ; a pair lost in rounding is skipped.
        if sy > 1e3 * float(jnp.finfo(dtype).eps) * float(
            jnp.linalg.norm(sv) * jnp.linalg.norm(yv)):
          pairs.append((sv, yv, 1.0 / sy))
          del pairs[:-memory]
      last.update(x=x, g=g)
      q, alphas = g, []
      for sv, yv, rho in reversed(pairs):
        a = rho * jnp.vdot(sv, q)
        q = q - a * yv
        alphas.append(a)
      r = preconditioner(q)
      for (sv, yv, rho), a in zip(pairs, reversed(alphas)):
        r = r + (a - rho * jnp.vdot(yv, r)) * sv
      d = -r
      return (d, 0) if bool(jnp.all(jnp.isfinite(d))) else (None, 0)

    return _result(_newton(op, b, y, weights, loss, damping, x0, tol,
                   max_iter, direction, dtype, start), return_start)


# --------------------------------------------------------------- dual form
@functools.partial(jax.jit, static_argnums=(0, 6))
def _dual_step(loss: Loss, theta, b, y, beta, damping, c):
  """One IRLS step: ``(Δβ, ΘΔβ, v, Θv)`` at ``β`` (arrays flattened N·C)."""
  n = b.shape[0] // c
  tb = theta @ beta
  z = (b + tb).reshape(n, c)
  v = loss.grad(z, y).reshape(-1) + damping * beta
  tv = theta @ v
  l = loss.hess_factor(z)  # (N, C, C)
  # Lᵀ Θ L with block-diagonal L: (N, C, N, C) contractions.
  t4 = theta.reshape(n, c, n, c)
  ltl = jnp.einsum("icd,icje,jef->idjf", l, t4, l,
                   precision=_HI).reshape(n * c, n * c)
  bmat = ltl + damping * jnp.eye(n * c, dtype=theta.dtype)
  chol = jnp.linalg.cholesky(0.5 * (bmat + bmat.T))
  ltv = jnp.einsum("icd,ic->id", l, tv.reshape(n, c)).reshape(-1)
  s = jsl.cho_solve((chol, True), ltv).reshape(n, c)
  ls = jnp.einsum("icd,id->ic", l, s).reshape(-1)
  dbeta = -(v - ls) / damping
  return dbeta, theta @ dbeta, v, tv, z


@functools.partial(jax.jit, static_argnums=(0, 5))
def _dual_grad(loss: Loss, theta, b, y, beta, c, damping):
  """``(‖∇Φ‖, λ‖x‖, z, Θβ)`` with ``∇Φ = Jᵀv`` and ``x = Jᵀβ``."""
  n = b.shape[0] // c
  tb = theta @ beta
  z = (b + tb).reshape(n, c)
  v = loss.grad(z, y).reshape(-1) + damping * beta
  gn = jnp.sqrt(jnp.maximum(v @ (theta @ v), 0.0))
  return gn, damping * jnp.sqrt(jnp.maximum(beta @ tb, 0.0)), z, tb


def _check_dual(theta, b, y, beta0, damping) -> tuple[int, int]:
  """:func:`solve_dual`'s shape checks; returns ``(N, C)``."""
  n, c = np.shape(b)
  if np.shape(y) != (n,):
    raise ValueError(f"y must have shape ({n},), got {np.shape(y)}.")
  if beta0 is not None and np.shape(beta0) != (n * c,):
    raise ValueError(f"beta0 must have shape ({n * c},), got "
                     f"{np.shape(beta0)}.")
  if np.shape(theta) != (n * c, n * c):
    raise ValueError(f"theta must have shape (N·C, N·C) = {(n * c, n * c)}, "
                     f"got {np.shape(theta)}.")
  if not (math.isfinite(float(damping)) and float(damping) > 0):
    raise ValueError(f"damping must be a finite float > 0, got {damping!r}.")
  return n, c


def solve_dual(theta, b, y, loss: Loss, damping: float, *, beta0=None,
               tol: float | None = None, max_iter: int = 100,
               solve_dtype: str = "float64") -> tuple[jax.Array, NewtonReport]:
  """``x_S = Jᵀβ`` with ``β`` from Newton in kernel space (IRLS).

  Args:
    theta: ``Θ = J Jᵀ`` over ``S``, ``(N·C, N·C)`` sample-major.
    b: ``(N, C)``, the linear model's logits at the anchor.
    y: ``(N,)`` labels.
    loss: a :class:`fastntk_jax.core.objective.Loss`.
    damping: λ > 0.
    beta0: starting coefficients ``(N·C,)`` (default 0, ``x = 0``).
    tol: relative gradient tolerance on ``‖∇Φ‖ = √(vᵀΘv)`` (default
      :func:`default_tol`: 1e-9 in float64, 1e-5 in float32).
    max_iter: Newton steps at most.
    solve_dtype: dtype of the solve.

  Returns:
    ``(β, NewtonReport)``, ``β`` of shape ``(N·C,)``; ``x_S = J_Sᵀ β``. Cost
    per step: one ``N·C`` Cholesky (``(NC)³/3`` flops) and ``O(C·(NC)²)``.
  """
  dtype = validate.check_solve_dtype(solve_dtype)
  tol = default_tol(solve_dtype == "float64") if tol is None else float(tol)
  n, c = _check_dual(theta, b, y, beta0, damping)
  with kernels.dtype_scope(solve_dtype):
    th = jnp.asarray(theta, dtype)
    bf = jnp.asarray(b, dtype).reshape(-1)
    y = jnp.asarray(y)
    lam = jnp.asarray(damping, dtype)
    beta = (jnp.zeros((n * c,), dtype) if beta0 is None
            else jnp.asarray(beta0, dtype))
    g0, _, _, _ = _dual_grad(loss, th, bf, y, jnp.zeros_like(beta), c, lam)
    g0n = max(float(g0), float(jnp.finfo(dtype).tiny))
    gn, lx, z, tb = _dual_grad(loss, th, bf, y, beta, c, lam)
    ones = jnp.ones((n,), dtype)
    phi = _phi(loss, z, y, ones, beta @ tb, lam)
    status, it = "max_iterations", 0
    while True:
      rel = float(gn) / max(g0n, float(lx))
      if rel <= tol:
        status = "converged"
        break
      if it >= max_iter:
        break
      dbeta, tdb, v, _, z = _dual_step(loss, th, bf, y, beta, lam, c)
      if not bool(jnp.all(jnp.isfinite(dbeta))):
        status = "factorisation_failed"
        break
      slope = v @ tdb  # ∇Φ · JᵀΔβ
      if not float(slope) < 0:
        status = "line_search_failed"
        break
      if _below_resolution(slope, phi, dtype):  # as in _newton
        gn1, lx1, z1, tb1 = _dual_grad(loss, th, bf, y, beta + dbeta, c, lam)
        if not float(gn1) < float(gn):
          status = "line_search_failed"
          break
        beta, gn, lx, z, tb = beta + dbeta, gn1, lx1, z1, tb1
        phi = float(_phi(loss, z, y, ones, beta @ tb, lam))
        it += 1
        continue
      # Φ along Δβ: z + tΘΔβ and ‖x + tJᵀΔβ‖² = βᵀΘβ + 2tΔβᵀΘβ + t²ΔβᵀΘΔβ.
      ts = jnp.asarray(_STEPS, dtype)
      vals = np.asarray(_line_values(
          loss, z, tdb.reshape(n, c), y, ones, beta @ tb, dbeta @ tb,
          dbeta @ tdb, lam, ts))
      ok = vals <= float(phi) + _ARMIJO * _STEPS * float(slope)
      if not ok.any():
        status = "line_search_failed"
        break
      k = int(np.argmax(ok))
      beta, phi = beta + float(_STEPS[k]) * dbeta, float(vals[k])
      gn, lx, z, tb = _dual_grad(loss, th, bf, y, beta, c, lam)
      it += 1
  return beta, NewtonReport(status == "converged", status, it, rel,
                            float(phi))


def as_report_dict(report: NewtonReport) -> dict[str, Any]:
  """A JSON-ready dict of a :class:`NewtonReport`."""
  return dict(report._asdict())
