"""Symmetric positive semi-definite solves with a reported status.

``psd_solve(K, B, damping)`` solves ``(K + λI) X = B``:

* ``λ > 0``: Cholesky. If the factorisation breaks down (the matrix is not
  numerically positive definite at this precision) the result carries
  ``ok=False`` instead of NaNs leaking into the update; the caller decides.
* ``λ = 0``: the ``λ → 0⁺`` limit, i.e. the Moore–Penrose pseudo-inverse
  applied to ``B``, through an eigendecomposition with a relative rank cutoff
  ``rcond`` (eigenvalues below ``rcond · max eigenvalue`` are dropped). This is
  the min-norm least-squares answer and is well defined for the
  rank-deficient kernels that PEFT gives (``P < N·C``).

Jittable; no Python-side branching on values.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

__all__ = ["SolveInfo", "psd_solve"]


class SolveInfo(NamedTuple):
  """Diagnostics of one solve (all scalars are arrays).

  Attributes:
    ok: True if the factorisation succeeded and the result is finite.
    relative_residual: ``‖(K + λI)X − B‖ / ‖B‖`` (λ > 0) or
      ``‖K(K⁺B) − P_K B‖ / ‖B‖`` on the kept eigenspace (λ = 0).
    cond: condition number of ``K + λI`` — exact from the eigenvalues when
      λ = 0 (over the kept eigenvalues), a lower-bound estimate
      ``(max Lᵢᵢ / min Lᵢᵢ)²`` from the Cholesky factor when λ > 0.
    rank: numerical rank kept (λ = 0) or the full size (λ > 0).
  """
  ok: jax.Array
  relative_residual: jax.Array
  cond: jax.Array
  rank: jax.Array


def default_rcond(n: int, dtype) -> float:
  """numpy.linalg.pinv-style cutoff: ``n · eps`` of the dtype."""
  return float(n * jnp.finfo(dtype).eps)


def _cholesky_solve(k, b, damping):
  n = k.shape[0]
  kd = k + damping * jnp.eye(n, dtype=k.dtype)
  chol = jnp.linalg.cholesky(kd)
  x = jsl.cho_solve((chol, True), b)
  diag = jnp.abs(jnp.diagonal(chol))
  cond = (jnp.max(diag) / jnp.min(diag)) ** 2
  res = jnp.linalg.norm(kd @ x - b) / jnp.maximum(jnp.linalg.norm(b),
                                                   jnp.finfo(k.dtype).tiny)
  ok = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.isfinite(x))
  return x, SolveInfo(ok, res, cond, jnp.asarray(n))


def _pinv_solve(k, b, rcond):
  evals, evecs = jnp.linalg.eigh(k)
  top = jnp.max(evals)
  keep = evals > rcond * jnp.maximum(top, 0.0)
  inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
  proj_b = evecs.T @ b
  x = evecs @ (inv.reshape((-1,) + (1,) * (b.ndim - 1)) * proj_b)
  kept_b = evecs @ (keep.reshape((-1,) + (1,) * (b.ndim - 1)) * proj_b)
  res = jnp.linalg.norm(k @ x - kept_b) / jnp.maximum(
      jnp.linalg.norm(b), jnp.finfo(k.dtype).tiny)
  smallest = jnp.min(jnp.where(keep, evals, jnp.inf))
  cond = top / smallest
  ok = jnp.all(jnp.isfinite(x)) & jnp.any(keep)
  return x, SolveInfo(ok, res, cond, jnp.sum(keep))


def psd_solve(k: jax.Array, b: jax.Array, damping: float,
              rcond: float | None = None) -> tuple[jax.Array, SolveInfo]:
  """Solves ``(K + λI) X = B`` for symmetric PSD ``K``.

  Args:
    k: ``(n, n)`` symmetric positive semi-definite.
    b: ``(n,)`` or ``(n, m)``.
    damping: λ ≥ 0, a Python float (it selects the method).
    rcond: relative eigenvalue cutoff for λ = 0; default ``n · eps``.

  Returns:
    ``(X, SolveInfo)``.
  """
  n = k.shape[0]
  if n == 0:
    z = jnp.zeros_like(b)
    one = jnp.asarray(1.0, k.dtype)
    return z, SolveInfo(jnp.asarray(True), 0 * one, one, jnp.asarray(0))
  if float(damping) > 0:
    return _cholesky_solve(k, b, jnp.asarray(damping, k.dtype))
  if rcond is None:
    rcond = default_rcond(n, k.dtype)
  return _pinv_solve(k, b, rcond)
