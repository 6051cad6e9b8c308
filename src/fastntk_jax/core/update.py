"""The one-shot NTK unlearning update, Eq. (1), as pure functions.

Notation (Golatkar et al. 2020; Fast-NTK Eq. (1)): ``w_0`` the linearisation
point, ``w_D`` the parameters trained on ``D = D_r ∪ D_f``, ``f_0 = f(w_0, ·)``,
``J = ∂f/∂w`` at ``w_0`` (logits flattened sample-major), ``Y`` one-hot
targets, ``Θ_ab = J_a J_bᵀ`` and λ ≥ 0 the damping added to every kernel
diagonal::

    w_r = w_D + P J_fᵀ M V
    P = I − J_rᵀ (Θ_rr + λI)⁻¹ J_r
    M = [Θ_ff + λI − Θ_fr (Θ_rr + λI)⁻¹ Θ_rf]⁻¹
    V = (f_0(D_f) − Y_f) + Θ_fr (Θ_rr + λI)⁻¹ (Y_r − f_0(D_r))

For a model linear in ``w``, if ``w_D`` is the λ-ridge solution from ``w_0``
on ``D``, then ``w_r`` is the λ-ridge solution from ``w_0`` on ``D_r``:
``w_r − w_D`` is the difference of two ridge solves. ``V`` is the residual,
on ``D_f``, of the linear model retrained on ``D_r``.

Two equivalent forms are given here:

* :func:`kernel_space` (dual, the paper's): ``(N·C)``-sized systems; it returns
  coefficients ``(c_r, c_f)`` with ``w_r − w_D = J_rᵀ c_r + J_fᵀ c_f``, i.e.
  ``c_f = M V`` and ``c_r = −(Θ_rr + λI)⁻¹ Θ_rf c_f``.
* :func:`parameter_space` (primal): ``P×P`` systems, by the push-through
  identity ``Jᵀ(JJᵀ + λI)⁻¹ = (JᵀJ + λI)⁻¹Jᵀ``::

      x_r = −(A_r + λI)⁻¹ J_rᵀ r_r          (retrain step, r = f_0 − Y)
      w_r − w_D = (A + λI)⁻¹ J_fᵀ (J_f x_r + r_f),   A = A_r + A_f = JᵀJ

  where ``J_f x_r + r_f`` is ``V`` again. No difference of two large,
  nearly equal solutions is formed.

λ = 0 is the ``λ → 0⁺`` limit (min-norm least squares), well defined also when
the kernel is rank-deficient (``P < N·C``, common with PEFT), where the block
formula's inverses do not exist. Both forms then use pseudo-inverses through
:func:`fastntk_jax.core.solve.psd_solve`; the dual uses the equivalent
``w_r − w_D = Jᵀ (Θ + λI)⁺ [0; V]``.

References:
  Golatkar, Achille, Soatto, Forgetting Outside the Box: Scrubbing Deep
  Networks of Information Accessible from Input-Output Observations, ECCV
  2020, https://arxiv.org/abs/2003.02960.
  Li et al., Fast-NTK, 2023, https://arxiv.org/abs/2312.14923, Eq. (1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fastntk_jax.core.solve import SolveInfo, psd_solve

__all__ = [
    "KernelSpaceUpdate",
    "ParameterSpaceUpdate",
    "forget_residual_norm",
    "kernel_space",
    "parameter_space",
]


class KernelSpaceUpdate(NamedTuple):
  """``w_r − w_D = J_rᵀ coef_r + J_fᵀ coef_f``.

  Attributes:
    coef_r: ``(N_r·C,)``.
    coef_f: ``(N_f·C,)``; equals ``M V``.
    v: ``V``, the linear retrained model's residual on ``D_f``, ``(N_f·C,)``.
    infos: :class:`SolveInfo` of each solve, in order.
  """
  coef_r: jax.Array
  coef_f: jax.Array
  v: jax.Array
  infos: tuple[SolveInfo, ...]


class ParameterSpaceUpdate(NamedTuple):
  """``w_r − w_D`` in parameter space.

  Attributes:
    delta: ``w_r − w_D``, ``(P,)``.
    x_retrain: the linear retrain step from ``w_0`` on ``D_r``, ``(P,)``.
    infos: :class:`SolveInfo` of each solve, in order.
  """
  delta: jax.Array
  x_retrain: jax.Array
  infos: tuple[SolveInfo, ...]


def kernel_space(theta_rr: jax.Array, theta_rf: jax.Array,
                 theta_ff: jax.Array, resid_r: jax.Array, resid_f: jax.Array,
                 damping: float, rcond: float | None = None
                 ) -> KernelSpaceUpdate:
  """Eq. (1) in kernel space.

  Args:
    theta_rr: ``Θ_rr``, ``(N_r·C, N_r·C)``.
    theta_rf: ``Θ_rf``, ``(N_r·C, N_f·C)``.
    theta_ff: ``Θ_ff``, ``(N_f·C, N_f·C)``.
    resid_r: ``f_0(D_r) − Y_r`` flattened sample-major, ``(N_r·C,)``.
    resid_f: ``f_0(D_f) − Y_f``, ``(N_f·C,)``.
    damping: λ ≥ 0 (Python float).
    rcond: eigenvalue cutoff for λ = 0.

  Returns:
    :class:`KernelSpaceUpdate`; ``w_r = w_D + J_rᵀ coef_r + J_fᵀ coef_f``.
  """
  theta_fr = theta_rf.T
  if float(damping) > 0:
    # One factorisation of Θ_rr + λI serves both (Θ_rr + λI)⁻¹ (Y_r − f_0(D_r))
    # and (Θ_rr + λI)⁻¹ Θ_rf.
    sol, info_r = psd_solve(
        theta_rr, jnp.concatenate([-resid_r[:, None], theta_rf], axis=1),
        damping)
    alpha_r, kinv_rf = sol[:, 0], sol[:, 1:]
    # V = (f_0(D_f) − Y_f) + Θ_fr (Θ_rr + λI)⁻¹ (Y_r − f_0(D_r))
    v = resid_f + theta_fr @ alpha_r
    # M = [Θ_ff + λI − Θ_fr (Θ_rr + λI)⁻¹ Θ_rf]⁻¹, the Schur complement's inverse.
    schur = theta_ff - theta_fr @ kinv_rf
    schur = 0.5 * (schur + schur.T)
    coef_f, info_m = psd_solve(schur, v, damping)  # M V
    # P J_fᵀ M V = J_fᵀ (M V) − J_rᵀ (Θ_rr + λI)⁻¹ Θ_rf (M V)
    coef_r = -kinv_rf @ coef_f
    return KernelSpaceUpdate(coef_r, coef_f, v, (info_r, info_m))
  alpha_r, info_r = psd_solve(theta_rr, -resid_r, damping, rcond)
  v = resid_f + theta_fr @ alpha_r
  # λ → 0⁺: Jᵀ Θ⁺ [0; V] (the block formula needs inverses that may not exist).
  theta = jnp.block([[theta_rr, theta_rf], [theta_fr, theta_ff]])
  rhs = jnp.concatenate([jnp.zeros_like(resid_r), v])
  coef, info = psd_solve(theta, rhs, 0.0, rcond)
  n_r = resid_r.shape[0]
  return KernelSpaceUpdate(coef[:n_r], coef[n_r:], v, (info_r, info))


def parameter_space(gram_r: jax.Array, gram_f: jax.Array, grad_r: jax.Array,
                    grad_f: jax.Array, damping: float,
                    rcond: float | None = None) -> ParameterSpaceUpdate:
  """Eq. (1) in parameter space.

  Args:
    gram_r: ``A_r = J_rᵀ J_r``, ``(P, P)``.
    gram_f: ``A_f = J_fᵀ J_f``, ``(P, P)``.
    grad_r: ``J_rᵀ r_r`` with ``r_r = f_0(D_r) − Y_r``, ``(P,)``.
    grad_f: ``J_fᵀ r_f``, ``(P,)``.
    damping: λ ≥ 0 (Python float).
    rcond: eigenvalue cutoff for λ = 0.

  Returns:
    :class:`ParameterSpaceUpdate` with ``delta = w_r − w_D``.
  """
  # x_r: the ridge step from w_0 retrained on D_r alone.
  x_r, info_r = psd_solve(gram_r, -grad_r, damping, rcond)
  # (A + λI)⁻¹ J_fᵀ (J_f x_r + r_f) = (A + λI)⁻¹ (A_f x_r + J_fᵀ r_f)
  rhs = gram_f @ x_r + grad_f
  delta, info = psd_solve(gram_r + gram_f, rhs, damping, rcond)
  return ParameterSpaceUpdate(delta, x_r, (info_r, info))


def forget_residual_norm(gram_f: jax.Array, grad_f: jax.Array,
                         x_retrain: jax.Array, rr_f: jax.Array) -> jax.Array:
  """``‖V‖ = ‖J_f x_r + r_f‖`` from parameter-space quantities alone.

  ``‖V‖² = x_rᵀ A_f x_r + 2 x_r·J_fᵀr_f + ‖r_f‖²`` with ``A_f = gram_f``,
  ``J_fᵀr_f = grad_f`` and ``rr_f = ‖r_f‖²``: no pass over ``D_f``. Rounding
  can make the sum slightly negative when ``V ≈ 0``; it is clipped at 0.
  """
  v2 = x_retrain @ (gram_f @ x_retrain) + 2 * x_retrain @ grad_f + rr_f
  return jnp.sqrt(jnp.maximum(v2, 0.0))
