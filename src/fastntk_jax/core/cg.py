"""Matrix-free conjugate gradients for ``(A + λI) x = b``, ``A`` symmetric PSD.

For PEFT of large models neither dense form of Eq. (1) fits: the kernel is
``(N·C)²`` numbers and the parameter-space Gram matrix ``P²``. Conjugate
gradients need only ``v ↦ A v``; with ``A = JᵀJ`` that product is a
Jacobian–vector product followed by a vector–Jacobian product over the data
(:func:`gauss_newton_matvec`), so memory is a few ``P``-vectors plus one
block's activations.

Convergence is reported, not raised: :class:`CGInfo` carries the final
relative residual ``‖b − (A + λI)x‖ / ‖b‖``, the number of steps and a status
(``"converged"``, ``"max_steps_reached"`` or ``"breakdown"``), like lineax's
``RESULTS``. The caller decides what a non-converged solve means.

References:
  Hestenes and Stiefel, Methods of Conjugate Gradients for Solving Linear
  Systems, J. Res. NBS 49 (1952).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fastntk_jax.core import blocking

from fastntk_jax.core import kernels

__all__ = ["CGInfo", "cg_solve", "gauss_newton_matvec"]


class CGInfo(NamedTuple):
  """Diagnostics of :func:`cg_solve`.

  Attributes:
    ok: the relative residual reached ``tol``.
    relative_residual: ``‖b − (A + λI)x‖ / ‖b‖`` (recomputed, not recursed).
    steps: matrix–vector products spent in iterations.
    status: ``"converged"``, ``"max_steps_reached"`` or ``"breakdown"`` (a
      direction with ``pᵀ(A + λI)p ≤ 0``: the operator is not PSD; or
      ``rᵀM⁻¹r ≤ 0``: the preconditioner is not positive definite).
  """
  ok: bool
  relative_residual: float
  steps: int
  status: str


def cg_solve(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *,
             damping: float = 0.0, tol: float = 1e-5,
             max_steps: int | None = None,
             x0: jax.Array | None = None,
             preconditioner: Callable[[jax.Array], jax.Array] | None = None
             ) -> tuple[jax.Array, CGInfo]:
  """Solves ``(A + λI) x = b`` by (preconditioned) conjugate gradients.

  Each step costs one ``matvec``; the loop runs in Python because the
  operator is usually a sum of jitted block products over a data set.

  Args:
    matvec: ``v ↦ A v`` for ``v`` shaped like ``b``; ``A`` symmetric PSD.
    b: right-hand side ``(P,)``.
    damping: λ ≥ 0. With λ = 0 and ``x0 = 0`` the iterates stay in the range
      of ``A``: for a consistent ``b`` (e.g. ``b = Jᵀu`` with ``A = JᵀJ``) the
      limit is the min-norm solution.
    tol: stop when the recursive relative residual is below ``tol``.
    max_steps: iteration cap (default ``10·P``, at most 1000).
    x0: starting point (default zeros).
    preconditioner: ``r ↦ M⁻¹ r`` for a symmetric positive definite ``M ≈
      A + λI`` (e.g. a Cholesky solve with a nearby matrix); None: ``M = I``.
      The stopping test stays on the unpreconditioned residual.

  Returns:
    ``(x, CGInfo)``.
  """
  if tol <= 0:
    raise ValueError(f"tol must be > 0, got {tol}.")
  if damping < 0:
    raise ValueError(f"damping must be >= 0, got {damping}.")
  n = b.shape[0]
  if max_steps is None:
    max_steps = int(min(10 * n, 1000))
  op = lambda v: matvec(v) + damping * v
  b_norm = float(jnp.linalg.norm(b))
  if b_norm == 0.0:
    return jnp.zeros_like(b), CGInfo(True, 0.0, 0, "converged")
  x = jnp.zeros_like(b) if x0 is None else jnp.asarray(x0, b.dtype)
  r = b - op(x) if x0 is not None else b
  prec = (lambda v: v) if preconditioner is None else preconditioner
  zr = prec(r)
  p = zr
  rz = jnp.vdot(r, zr)
  status, steps = "max_steps_reached", 0
  for steps in range(1, max_steps + 1):
    if float(jnp.linalg.norm(r)) <= tol * b_norm:
      status, steps = "converged", steps - 1
      break
    ap = op(p)
    curv = jnp.vdot(p, ap)
    if not float(curv) > 0.0:
      status = "breakdown"
      break
    alpha = rz / curv
    x = x + alpha * p
    r = r - alpha * ap
    zr = prec(r)
    rz_new = jnp.vdot(r, zr)
    if not float(rz_new) > 0.0 and float(jnp.linalg.norm(r)) > tol * b_norm:
      status = "breakdown"  # the preconditioner is not positive definite
      break
    p = zr + (rz_new / rz) * p
    rz = rz_new
  else:
    if float(jnp.linalg.norm(r)) <= tol * b_norm:
      status = "converged"
  true_res = float(jnp.linalg.norm(b - op(x))) / b_norm
  ok = status == "converged" and bool(jnp.all(jnp.isfinite(x)))
  return x, CGInfo(ok, true_res, steps, status)


@blocking.per_apply_fn
def _gn_block_fn(apply_fn, weighted: bool = False):
  def f(params, xb, v, mask, *hb):
    flat, unravel = ravel_pytree(params)
    fn = lambda w: apply_fn(unravel(w), xb)
    _, lin = jax.linearize(fn, flat)
    jv = lin(v.astype(flat.dtype))
    if weighted:  # H_i (J_i v)
      jv = jnp.einsum("bcd,bd->bc", hb[0].astype(jv.dtype), jv,
                      precision=jax.lax.Precision.HIGHEST)
    jv = jv * mask[:, None]
    return jax.linear_transpose(lin, flat)(jv.astype(flat.dtype))[0]
  return jax.jit(f)


def gauss_newton_matvec(apply_fn, params, x, *, block_size: int | None = None,
                        mesh=None,
                        hessians=None) -> Callable[[jax.Array], jax.Array]:
  """``v ↦ JᵀJ v`` (or ``Σ_i J_iᵀ H_i J_i v``) over the inputs ``x``.

  ``J`` is taken at ``params``. One linearised forward pass and its transpose
  per block of samples; no Jacobian or Gram matrix is formed. ``hessians``:
  optional per-sample symmetric ``H_i``, ``(N, C, C)`` (a generalised
  Gauss-Newton product, e.g. the softmax curvature ``diag(p) − ppᵀ``).

  Args:
    apply_fn: ``apply_fn(params, x) -> (N, C)``, samples independent.
    params: the linearisation point (a pytree; ``v`` is its flattening by
      :func:`jax.flatten_util.ravel_pytree`).
    x: inputs ``(N, ...)``.
    block_size: samples per block (None: all of ``x`` up to the automatic
      limit of :func:`fastntk_jax.core.kernels.auto_block_size`).
    mesh: devices to shard each block's samples over; None:
      :func:`fastntk_jax.core.kernels.default_mesh`.

  Returns:
    A function ``(P,) -> (P,)``.
  """
  mesh = blocking.resolve_mesh(mesh)
  x = jnp.asarray(x)
  weighted = hessians is not None
  fn = _gn_block_fn(apply_fn, weighted)
  flat = ravel_pytree(params)[0]
  p, dtype = flat.shape[0], flat.dtype
  c = kernels.num_outputs(apply_fn, params, x)
  if weighted:
    hessians = jnp.asarray(hessians)
    if hessians.shape != (x.shape[0], c, c):
      raise ValueError(f"hessians must have shape (N, C, C) = "
                       f"{(x.shape[0], c, c)}, got {hessians.shape}.")
  params_r = blocking.replicate(mesh, params)
  rows = lambda a: blocking.shard_rows(mesh, a)
  extra = lambda n: ((rows(jnp.zeros((n, c, c), dtype)),) if weighted else ())
  block, _, _ = blocking.resolve_block(
      apply_fn, params, x, block_size, "gnvp-h" if weighted else "gnvp", fn,
      lambda xb: (params_r, rows(xb), blocking.replicate(
          mesh, jnp.zeros((p,), dtype)), rows(jnp.ones((xb.shape[0],), dtype)))
      + extra(xb.shape[0]), mesh=mesh)
  blocks = []
  for s, e in blocking.iter_blocks(x.shape[0], block):
    mask = (jnp.arange(block) < (e - s)).astype(dtype)
    hb = ((rows(blocking.pad_block(hessians[s:e], block)),) if weighted else ())
    blocks.append((rows(blocking.pad_block(x[s:e], block)), rows(mask)) + hb)

  def matvec(v):
    v_r = blocking.replicate(mesh, v.astype(dtype))
    out = None
    for xb, mask, *hb in blocks:
      g = fn(params_r, xb, v_r, mask, *hb)
      out = g if out is None else out + g
    return out.astype(v.dtype)

  return matvec
