"""Per-sample losses of the linearised problem, with their curvature.

The unlearning problem of :mod:`fastntk_jax.core.newton` is a sum of per-sample
losses ``ℓ(z_i, y_i)`` of the logits ``z_i ∈ R^C`` plus a ridge term. A
:class:`Loss` carries what Newton's method needs of ``ℓ``: its value, its
gradient ``ℓ'(z) = ∂ℓ/∂z`` and its Hessian ``H = ∂²ℓ/∂z²`` as a factor
``L`` with ``H = L Lᵀ`` (for kernel-space solves and Gram matrices) and as a
product ``u ↦ H u`` (for matrix-free ones).

* ``"mse"`` — ``½‖z − onehot(y)‖²``: ``ℓ' = z − Y``, ``H = I``. Newton's
  method converges in one step, and that step is Eq. (1) of Fast-NTK.
* ``"ce"`` — softmax cross-entropy ``logsumexp(z) − z_y``: ``ℓ' = p − Y`` with
  ``p = softmax(z)``, ``H = diag(p) − p pᵀ`` (PSD, rank ``C − 1``), factored
  exactly as ``L = diag(√p) − p √pᵀ`` (``L Lᵀ = diag(p) − ppᵀ`` because
  ``Σ p = 1``).

Arrays are ``z (N, C)``, ``y (N,)`` integer labels; every function is
jittable and works in the dtype of ``z``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["LOSSES", "Loss", "cross_entropy", "squared_error"]


class Loss(NamedTuple):
  """A per-sample loss of the logits and its curvature.

  Attributes:
    name: ``"mse"`` or ``"ce"``.
    value: ``(z, y) -> (N,)`` per-sample losses.
    grad: ``(z, y) -> (N, C)``, ``ℓ'(z_i)``.
    hess_factor: ``z -> (N, C, C)``, ``L_i`` with ``H_i = L_i L_iᵀ``.
    hess_matvec: ``(z, u) -> (N, C)``, ``H_i u_i``.
    quadratic: True when ``H`` does not depend on ``z`` (one Newton step
      solves the problem exactly).
  """
  name: str
  value: Callable[[jax.Array, jax.Array], jax.Array]
  grad: Callable[[jax.Array, jax.Array], jax.Array]
  hess_factor: Callable[[jax.Array], jax.Array]
  hess_matvec: Callable[[jax.Array, jax.Array], jax.Array]
  quadratic: bool


def _onehot(y, z):
  return jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)


def _mse_value(z, y):
  return 0.5 * jnp.sum((z - _onehot(y, z)) ** 2, axis=-1)


def _mse_grad(z, y):
  return z - _onehot(y, z)


def _mse_factor(z):
  return jnp.broadcast_to(jnp.eye(z.shape[-1], dtype=z.dtype),
                          z.shape + z.shape[-1:])


def _mse_matvec(z, u):
  del z
  return u


def _ce_value(z, y):
  return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(
      z, jnp.asarray(y)[:, None], axis=-1)[:, 0]


def _ce_grad(z, y):
  return jax.nn.softmax(z, axis=-1) - _onehot(y, z)


def _ce_factor(z):
  p = jax.nn.softmax(z, axis=-1)
  s = jnp.sqrt(p)
  # diag(√p) − p √pᵀ: its product with its transpose is diag(p) − p pᵀ.
  return jax.vmap(jnp.diag)(s) - p[:, :, None] * s[:, None, :]


def _ce_matvec(z, u):
  p = jax.nn.softmax(z, axis=-1)
  return p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)


squared_error = Loss("mse", _mse_value, _mse_grad, _mse_factor, _mse_matvec,
                     True)
cross_entropy = Loss("ce", _ce_value, _ce_grad, _ce_factor, _ce_matvec, False)

#: ``name -> Loss``.
LOSSES = {"mse": squared_error, "ce": cross_entropy}
