"""``unlearn``: Fast-NTK's one-shot forgetting update on PEFT parameters.

Validates its inputs, linearises the model at ``init_params`` (or ``params``),
builds the kernel- or parameter-space quantities over the PEFT pytree only,
applies Eq. (1) (:mod:`fastntk_jax.update`) and returns the updated parameters
with diagnostics.
"""

from __future__ import annotations

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
from fastntk_jax import update
from fastntk_jax.solve import SolveInfo

__all__ = [
    "DEFAULT_DAMPING",
    "DEFAULT_MEMORY_BUDGET",
    "UnlearnResult",
    "UnlearningError",
    "choose_solver",
    "unlearn",
]

#: λ, chosen from the measurements in docs/defaults.md (quickstart, 5 seeds).
DEFAULT_DAMPING = 1.0
#: Bytes the dense matrices of a solver may take before it is refused.
DEFAULT_MEMORY_BUDGET = 4 * 2**30

_LOSSES = ("mse", "ce")
_SOLVERS = ("auto", "dual", "primal", "cg")
_PRECISIONS = {"float64": 8, "float32": 4}


class UnlearningError(FloatingPointError):
  """A factorisation failed or the update is not finite."""


class UnlearnResult(NamedTuple):
  """Result of :func:`unlearn` (a pytree).

  Attributes:
    params: ``w_r``, same tree structure and dtypes as ``params``.
    solver: ``"dual"``, ``"primal"`` or ``"cg"``: the solver that ran.
    damping: λ used.
    loss: ``"mse"`` or ``"ce"``.
    linearized_at: ``"init_params"`` or ``"params"``.
    num_retain, num_forget: samples in ``D_r`` and ``D_f``.
    num_outputs: C.
    num_params: P, scalars in the PEFT pytree.
    delta_norm: ``‖w_r − w_D‖₂``.
    forget_residual_norm: ``‖V‖₂``, the linear retrained model's residual on
      ``D_f`` that the update removes.
    relative_residual: the largest relative residual of the linear solves.
    cond: the largest condition number (estimate) of the systems solved
      (NaN for ``"cg"``, which never forms them).
    rank: numerical rank of the last system (its size when λ > 0; P for
      ``"cg"``).
    seconds: wall time of the call, compilation included.
    cg_steps: conjugate-gradient steps over both solves (0 for dense solvers).
  """
  params: Any
  solver: str
  damping: float
  loss: str
  linearized_at: str
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


def _check_split(name: str, data) -> tuple[np.ndarray | jax.Array, np.ndarray]:
  if not isinstance(data, (tuple, list)) or len(data) != 2:
    raise TypeError(f"{name}: expected a pair (x, y) of inputs and integer "
                    f"labels, got {type(data).__name__}.")
  x, y = data
  x_shape = np.shape(x)
  y = np.asarray(y)
  if len(x_shape) < 1:
    raise ValueError(f"{name}: x must have a leading sample axis, got shape "
                     f"{x_shape}.")
  if y.ndim != 1:
    raise ValueError(f"{name}: y must be a 1-D array of integer labels, got "
                     f"shape {y.shape}. Pass class indices, not one-hot rows.")
  if not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"{name}: y must hold integer class labels, got dtype "
                    f"{y.dtype}. Convert with y.astype(int).")
  if x_shape[0] != y.shape[0]:
    raise ValueError(f"{name}: x has {x_shape[0]} samples but y has "
                     f"{y.shape[0]}; they must match.")
  xa = np.asarray(x) if not isinstance(x, jax.Array) else x
  finite = np.isfinite if isinstance(xa, np.ndarray) else jnp.isfinite
  if jnp.issubdtype(xa.dtype, jnp.inexact) and not bool(finite(xa).all()):
    raise ValueError(f"{name}: x contains NaN or infinite values; clean or "
                     "drop those samples.")
  return xa, y


def _check_finite_tree(name: str, tree) -> None:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError(f"{name}: the pytree has no arrays.")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"{name}: every leaf must be a floating-point array, got "
                      f"{jnp.result_type(leaf)}.")
    if not bool(jnp.all(jnp.isfinite(leaf))):
      raise ValueError(f"{name}: contains NaN or infinite values.")


def _check_positive_int_or_none(name: str, value) -> None:
  if value is not None and (isinstance(value, bool) or int(value) != value
                            or value < 1):
    raise ValueError(f"{name} must be a positive int or None, got {value!r}.")


def _dense_bytes(solver: str, n: int, c: int, p: int, itemsize: int,
                 damping: float = 1.0, precision_itemsize: int = 8) -> int:
  """Memory of a solver's dense matrices (its dominant term).

  Dual: Θ on the host and on the device, a damped copy and its Cholesky factor
  (λ > 0); for λ = 0 also the re-assembled Θ and its eigenvectors, all in the
  model's dtype (``itemsize``). Primal: ``A_r``, ``A_f``, their sum, a damped
  copy and its factor, in ``precision_itemsize``. CG: four ``P``-vectors
  (iterate, residual, direction, product) plus the right-hand sides.
  """
  if solver == "dual":
    return (4 if damping > 0 else 6) * (n * c) ** 2 * itemsize
  if solver == "primal":
    return 5 * p * p * precision_itemsize
  return 8 * p * itemsize


def _flops(solver: str, n: int, c: int, p: int) -> float:
  """Leading-order flop counts of the dense solvers (beyond the Jacobian)."""
  if solver == "dual":
    # kernel contraction N²C²P, Cholesky of the N·C system
    return (n * c) ** 2 * p + (n * c) ** 3 / 3
  # Gram accumulation N·C·P², two P×P Cholesky factorisations
  return n * c * p * p + 2 * p ** 3 / 3


def choose_solver(n: int, c: int, p: int, itemsize: int = 4,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET,
                  damping: float = 1.0, precision_itemsize: int = 8) -> str:
  """The solver ``solver="auto"`` runs: the cheapest dense one that fits.

  Cost model (leading terms beyond the Jacobian rows, which every solver
  needs): dual ``(NC)²P + (NC)³/3`` flops and ``4(NC)²`` numbers (6 for
  λ = 0); primal ``NCP² + 2P³/3`` flops and ``5P²`` numbers in the solve
  precision; with N samples, C logits, P PEFT parameters. Of those that fit
  ``memory_budget`` the one with fewer flops wins (ties go to the dual, the
  paper's form). When neither fits, ``"cg"``: matrix-free conjugate
  gradients, ``O(P)`` memory, each step one linearised pass over the data
  (about ``3·N·C·P``-equivalent work); its step count depends on the
  conditioning, so it is chosen only when no dense form fits.
  """
  need = {s: _dense_bytes(s, n, c, p, itemsize, damping, precision_itemsize)
          for s in ("dual", "primal")}
  fits = [s for s in ("dual", "primal") if need[s] <= memory_budget]
  if not fits:
    return "cg"
  return min(fits, key=lambda s: _flops(s, n, c, p))


def _mse_residual(logits: jax.Array, y: jax.Array) -> jax.Array:
  return logits - jax.nn.one_hot(y, logits.shape[1], dtype=logits.dtype)


def _ce_residual(logits: jax.Array, y: jax.Array) -> jax.Array:
  return jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(
      y, logits.shape[1], dtype=logits.dtype)


#: ``loss -> r(logits, y)``, the residual at the linearisation point
#: (module-level functions, so that compiled passes are reused).
RESIDUAL_FNS = {"mse": _mse_residual, "ce": _ce_residual}


def _residuals(logits: jax.Array, y: np.ndarray, loss: str) -> jax.Array:
  return RESIDUAL_FNS[loss](logits, jnp.asarray(y)).reshape(-1)


def _check_logits(f0, init_params) -> None:
  if not bool(jnp.all(jnp.isfinite(f0))):
    raise ValueError(
        f"apply_fn returns NaN or infinite logits at the linearisation point "
        f"({'init_params' if init_params is not None else 'params'}); check "
        "the model and its inputs there.")


def unlearn(apply_fn: Callable[[Any, Any], jax.Array], params, retain,
            forget, *, init_params=None, damping: float = DEFAULT_DAMPING,
            loss: str = "mse", solver: str = "auto", rcond: float | None = None,
            implementation: int = 1, block_size: int | None = None,
            memory_budget: int = DEFAULT_MEMORY_BUDGET,
            precision: str = "float64", cg_tol: float = 1e-5,
            cg_max_steps: int | None = None, mesh=None) -> UnlearnResult:
  r"""Forgets ``forget`` with the one-shot NTK update (Fast-NTK, Eq. (1)).

  ``w_r = w_D + P J_fᵀ M V`` (see :mod:`fastntk_jax.update`), computed over
  the pytree ``params`` only — pass the PEFT parameters and an ``apply_fn``
  that closes over the frozen rest (:func:`fastntk_jax.peft.make_apply_fn`).

  Example::

    apply_fn, peft, frozen = make_apply_fn(model, variables, predicate)
    res = unlearn(apply_fn, peft, (x_r, y_r), (x_f, y_f),
                  init_params=peft_before_finetuning, damping=1.0)
    variables = merge(res.params, frozen)

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (N, C)``; each sample's output
      must depend on that sample alone (BatchNorm in inference mode).
    params: ``w_D``, the PEFT parameters after fine-tuning on ``D``.
    retain: ``(x, y)``, ``D_r``; ``y`` integer labels in ``[0, C)``.
    forget: ``(x, y)``, ``D_f``; non-empty, inputs shaped like ``retain``'s.
    init_params: ``w_0``, where ``J`` and ``f_0`` are taken (the parameters
      before fine-tuning). None linearises at ``params`` (as the public code
      of Golatkar et al. does).
    damping: λ ≥ 0, absolute, added to every kernel diagonal. 0 means the
      ``λ → 0⁺`` limit (pseudo-inverses with cutoff ``rcond``).
    loss: ``"mse"`` — residual ``f_0 − onehot(y)`` (the linearised theory; use
      with MSE-fine-tuned models) — or ``"ce"`` — ``softmax(f_0) − onehot(y)``.
    solver: ``"dual"`` (kernel space, ``N·C`` systems, the paper's),
      ``"primal"`` (parameter space, ``P×P`` systems), ``"cg"`` (matrix-free
      conjugate gradients on ``JᵀJ + λI`` with Jacobian–vector products, for
      when neither dense form fits) or ``"auto"`` (by :func:`choose_solver`).
    rcond: relative eigenvalue cutoff for ``damping=0``.
    implementation: neural-tangents NTK implementation for the dual kernel
      when its Jacobians do not fit in memory (:func:`fastntk_jax.kernels.ntk`
      otherwise contracts Jacobians computed once): 1 (Jacobian contraction)
      or 2 (NTK-vector products).
    block_size: samples per block of Jacobian work (None: automatic).
    memory_budget: bytes the dense matrices may take; a solver over it is
      refused before any work starts.
    precision: ``"float64"`` or ``"float32"``: dtype of the ``P×P`` Gram
      matrices and their solves (``"primal"``); Jacobians stay in the model's
      dtype. float64 keeps full-dataset Grams (condition numbers growing with
      N) solvable; ``"float32"`` halves their memory.
    cg_tol: relative residual at which ``"cg"`` stops.
    cg_max_steps: iteration cap per ``"cg"`` solve (None: ``min(10·P, 1000)``);
      a solve that does not converge raises :class:`UnlearningError`.
    mesh: a 1-D :class:`jax.sharding.Mesh` with axis ``"data"`` to shard the
      Jacobian and kernel work over; None uses every local device
      (:func:`fastntk_jax.kernels.default_mesh`). Checked before any work.

  Returns:
    :class:`UnlearnResult`.

  Raises:
    TypeError, ValueError: bad input, before heavy work.
    UnlearningError: a factorisation failed (e.g. λ too small for float32).

  References:
    Li et al., Fast-NTK, https://arxiv.org/abs/2312.14923, Eq. (1);
    Golatkar et al., ECCV 2020, https://arxiv.org/abs/2003.02960.
  """
  t0 = time.perf_counter()
  # ---- validation, before any heavy work --------------------------------
  if not callable(apply_fn):
    raise TypeError("apply_fn must be callable as apply_fn(params, x).")
  x_r, y_r = _check_split("retain", retain)
  x_f, y_f = _check_split("forget", forget)
  if y_f.shape[0] == 0:
    raise ValueError("forget: the forget set is empty; there is nothing to "
                     "unlearn. Pass at least one (x, y) sample.")
  if y_r.shape[0] == 0:
    raise ValueError("retain: the retain set is empty; Eq. (1) needs D_r. To "
                     "forget everything, reset to init_params instead.")
  if np.shape(x_r)[1:] != np.shape(x_f)[1:]:
    raise ValueError(
        f"forget: inputs have per-sample shape {np.shape(x_f)[1:]} but retain "
        f"inputs have {np.shape(x_r)[1:]}; both must match the model input.")
  if x_r.dtype != x_f.dtype:  # e.g. raw uint8 images beside normalised ones
    raise TypeError(f"forget: x dtype {x_f.dtype} differs from retain's "
                    f"{x_r.dtype}; prepare both sets the same way.")
  if isinstance(damping, bool) or not isinstance(
      damping, (int, float, np.floating, np.integer)):
    raise TypeError(f"damping must be a float ≥ 0, got {type(damping)}.")
  damping = float(damping)
  if not math.isfinite(damping) or damping < 0:
    raise ValueError(f"damping must be finite and ≥ 0, got {damping}. Use 0 "
                     "for the λ → 0⁺ (pseudo-inverse) limit.")
  if loss not in _LOSSES:
    raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}.")
  if solver not in _SOLVERS:
    raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}.")
  if isinstance(implementation, bool) or implementation not in (1, 2):
    raise ValueError(f"implementation must be 1 or 2, got {implementation!r}.")
  if rcond is not None and not (math.isfinite(float(rcond)) and rcond >= 0):
    raise ValueError(f"rcond must be a finite float ≥ 0 or None, got {rcond}.")
  _check_positive_int_or_none("block_size", block_size)
  mesh = kernels._resolve_mesh(mesh)
  if precision not in _PRECISIONS:
    raise ValueError(f"precision must be one of {tuple(_PRECISIONS)}, got "
                     f"{precision!r}.")
  if not (isinstance(cg_tol, (int, float)) and 0 < cg_tol < 1):
    raise ValueError(f"cg_tol must be a float in (0, 1), got {cg_tol!r}.")
  _check_positive_int_or_none("cg_max_steps", cg_max_steps)
  if isinstance(memory_budget, bool) or not isinstance(
      memory_budget, (int, np.integer)) or memory_budget <= 0:
    raise ValueError(f"memory_budget must be a positive number of bytes, got "
                     f"{memory_budget!r}.")
  _check_finite_tree("params", params)
  if init_params is not None:
    _check_finite_tree("init_params", init_params)
    s_p = jax.tree_util.tree_structure(params)
    s_i = jax.tree_util.tree_structure(init_params)
    if s_p != s_i:
      raise ValueError("init_params must have the tree structure of params "
                       f"(w_0 and w_D of the same PEFT pytree); got {s_i} vs "
                       f"{s_p}.")
    for a, b in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(init_params)):
      if np.shape(a) != np.shape(b):
        raise ValueError("init_params: a leaf has shape "
                         f"{np.shape(b)} where params has {np.shape(a)}.")
  c = kernels.num_outputs(apply_fn, params, x_r)
  for name, y in (("retain", y_r), ("forget", y_f)):
    if y.min() < 0 or y.max() >= c:
      raise ValueError(
          f"{name}: labels must lie in [0, {c}) for a model with {c} logits; "
          f"got range [{y.min()}, {y.max()}].")
  lin = params if init_params is None else init_params
  flat_w, unravel = ravel_pytree(params)
  p = int(flat_w.shape[0])
  n_r, n_f = int(y_r.shape[0]), int(y_f.shape[0])
  n = n_r + n_f
  itemsize = jnp.dtype(flat_w.dtype).itemsize
  p_item = _PRECISIONS[precision]
  if solver == "auto":
    solver = choose_solver(n, c, p, itemsize, memory_budget, damping, p_item)
  elif solver != "cg":
    need = _dense_bytes(solver, n, c, p, itemsize, damping, p_item)
    if need > memory_budget:
      other = "primal" if solver == "dual" else "dual"
      other_need = _dense_bytes(other, n, c, p, itemsize, damping, p_item)
      shape = "P×P" if other == "primal" else "N·C×N·C"
      hint = (f"solver={other!r} needs only {shape} matrices, {other_need} "
              "bytes here, within the budget" if other_need <= memory_budget
              else f"solver={other!r} ({shape}) would need {other_need} bytes, "
              "over the budget too; use solver='cg' (matrix-free)")
      raise ValueError(
          f"solver={solver!r} needs about {need} bytes ({need / 2**30:.3g} GiB) "
          f"of dense matrices for N={n} samples, C={c}, P={p}, over "
          f"memory_budget={memory_budget} bytes ({memory_budget / 2**30:.3g} "
          f"GiB). Raise memory_budget=... if the memory is there; {hint}.")

  # ---- residuals at the linearisation point -----------------------------
  blk = {"block_size": block_size, "mesh": mesh}
  if solver != "primal":
    f0_r = kernels.predict(apply_fn, lin, x_r, mesh=mesh)
    f0_f = kernels.predict(apply_fn, lin, x_f, mesh=mesh)
    _check_logits(jnp.concatenate([f0_r, f0_f]), init_params)
    r_r = _residuals(f0_r, y_r, loss)
    r_f = _residuals(f0_f, y_f, loss)

  cg_steps = 0
  if solver == "dual":
    # One symmetric kernel over D = [D_r; D_f]: one compilation, upper blocks
    # only; then its three blocks.
    theta = kernels.ntk(apply_fn, lin, jnp.concatenate(
        [jnp.asarray(x_r), jnp.asarray(x_f)]), implementation=implementation,
                        **blk)
    k = n_r * c
    th_rr, th_rf, th_ff = theta[:k, :k], theta[:k, k:], theta[k:, k:]
    del theta
    upd = update.kernel_space(th_rr, th_rf, th_ff, r_r, r_f, damping, rcond)
    infos, v = upd.infos, upd.v
    _raise_if_failed(infos, damping, solver)
    g_r = kernels.vjp(apply_fn, lin, x_r, upd.coef_r.reshape(n_r, c), **blk)
    g_f = kernels.vjp(apply_fn, lin, x_f, upd.coef_f.reshape(n_f, c), **blk)
    delta = ravel_pytree(g_r)[0] + ravel_pytree(g_f)[0]
  elif solver == "primal":
    # One pass per set gives the logits at w_0, the residuals and the Grams.
    res_fn = RESIDUAL_FNS[loss]
    a_r, b_r, f0_r = kernels.gram(apply_fn, lin, x_r, res_fn, y=y_r,
                                  precision=precision, return_outputs=True,
                                  **blk)
    a_f, b_f, f0_f = kernels.gram(apply_fn, lin, x_f, res_fn, y=y_f,
                                  precision=precision, return_outputs=True,
                                  **blk)
    _check_logits(jnp.concatenate([f0_r, f0_f]), init_params)
    r_f = _residuals(f0_f, y_f, loss)
    with kernels.precision_scope(precision):
      upd = update.parameter_space(a_r, a_f, b_r, b_f, damping, rcond)
      infos = upd.infos
      _raise_if_failed(infos, damping, solver)
      delta = upd.delta.astype(flat_w.dtype)
      # ‖V‖, a diagnostic, from the Grams rather than another pass over D_f.
      v = update.forget_residual_norm(
          a_f, b_f, upd.x_retrain, jnp.sum(jnp.asarray(r_f, a_f.dtype) ** 2))
  else:
    delta, v, infos, cg_steps = _cg_update(
        apply_fn, lin, x_r, x_f, r_r.reshape(n_r, c), r_f.reshape(n_f, c),
        damping, cg_tol, cg_max_steps, blk)

  if not bool(jnp.all(jnp.isfinite(delta))):
    raise UnlearningError(
        "the update is not finite although every solve reported success; "
        "check apply_fn for NaNs at the linearisation point.")
  new_params = jax.tree_util.tree_map(
      lambda w, d: (w + d).astype(jnp.result_type(w)), params,
      unravel(delta.astype(flat_w.dtype)))
  jax.block_until_ready(new_params)
  return UnlearnResult(
      params=new_params, solver=solver, damping=damping, loss=loss,
      linearized_at="params" if init_params is None else "init_params",
      num_retain=n_r, num_forget=n_f, num_outputs=c, num_params=p,
      delta_norm=float(jnp.linalg.norm(delta)),
      forget_residual_norm=float(np.linalg.norm(np.asarray(v))),
      relative_residual=max(float(i.relative_residual) for i in infos),
      cond=max(float(i.cond) for i in infos),
      rank=int(infos[-1].rank),
      seconds=time.perf_counter() - t0, cg_steps=cg_steps)


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
  for k, i in enumerate((info_r, info)):
    if not i.ok:
      raise UnlearningError(
          f"cg solver: solve {k + 1} of 2 stopped with status {i.status!r} "
          f"after {i.steps} steps at relative residual "
          f"{i.relative_residual:.3g} (cg_tol {tol}). Raise cg_max_steps, "
          "raise damping (better conditioned), or loosen cg_tol.")
  p = delta.shape[0]
  infos = tuple(SolveInfo(jnp.asarray(True), jnp.asarray(i.relative_residual),
                          jnp.asarray(jnp.nan), jnp.asarray(p))
                for i in (info_r, info))
  return delta, v.reshape(-1), infos, info_r.steps + info.steps


def _raise_if_failed(infos, damping: float, solver: str) -> None:
  for k, info in enumerate(infos):
    if not bool(info.ok):
      raise UnlearningError(
          f"{solver} solver: factorisation {k + 1} of {len(infos)} failed (the "
          f"damped matrix is not numerically positive definite at damping="
          f"{damping}, condition estimate {float(info.cond):.3g}). Increase "
          "damping, enable float64 with jax.config.update('jax_enable_x64', "
          "True), or use damping=0 for the pseudo-inverse limit.")
