"""Kernels and Jacobian products over the PEFT pytree only.

Everything here sees a model only as ``apply_fn(params, x) -> logits`` of
shape ``(N, C)``, where ``params`` is the PEFT pytree. Outputs are flattened
*sample-major*: row ``n * C + c`` is logit ``c`` of sample ``n``.

* :func:`ntk` — the empirical NTK with every logit kept,
  ``Θ(X1, X2) = J(X1) J(X2)ᵀ`` of shape ``(N1·C, N2·C)``: from Jacobians
  computed once per block and kept whole when they fit in memory, else
  through neural-tangents' kernel per pair of blocks (memory bounded by the
  block, Jacobians recomputed per pair).
* :func:`jacobian` — the explicit ``(N·C, P)`` Jacobian (blocked).
* :func:`gram` — the parameter-space counterparts ``JᵀJ`` (P×P) and
  ``Jᵀ r`` accumulated over blocks of samples.
* :func:`sketched_gram` — an unbiased random-cotangent estimate of ``JᵀJ``
  from ``s < C`` reverse passes per sample, with the exact ``Jᵀ r``
  (approximate; only when asked for).
* :func:`jvp`, :func:`vjp` — ``J v`` and ``Jᵀ u`` over blocks.

All of them vectorise over samples (``vmap_axes=0`` in neural-tangents), which
assumes that a sample's logits do not depend on the other samples of the
batch. Keep BatchNorm in inference mode (running statistics, as
:func:`fastntk_jax.peft.make_apply_fn` does): in training mode its batch
statistics couple the samples and these kernels would be wrong.

Parameters are flattened with :func:`jax.flatten_util.ravel_pytree`; the
columns of :func:`jacobian` and the rows of :func:`gram` follow that order.

Sharding: every function takes ``mesh``, a 1-D :class:`jax.sharding.Mesh`
with axis ``"data"``; None means :func:`default_mesh` (all local devices when
there are several, else none). Each block of samples is placed with
``NamedSharding(mesh, P("data"))`` along the sample axis and the parameters
are replicated; the jitted block functions then run SPMD over the devices and
XLA inserts the collectives (e.g. the all-reduce of :func:`vjp`'s ``Jᵀu``).
:func:`gram` instead keeps one partial sum per device (``jax.shard_map``) and
reduces them once, after the last block. Block sizes are rounded up to a
multiple of the number of devices; padded samples never contribute. On one
device nothing changes.

Automatic block sizes fit :data:`DEFAULT_BLOCK_BYTES`; on CPU devices,
blocks of Jacobian work also stop at :data:`CPU_BLOCK_PER_DEVICE` samples per
device, which runs faster there.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fastntk_jax.core import nt
from fastntk_jax.core import validate
from fastntk_jax.core.blocking import (
  CPU_BLOCK_PER_DEVICE,
  DATA_AXIS,
  DEFAULT_BLOCK_BYTES,
  auto_block_size,
  default_mesh,
  iter_blocks,
  n_devices,
  num_outputs,
  pad_block,
  per_apply_fn,
  replicate,
  resolve_block,
  resolve_mesh,
  shard_rows,
  tail_block,
)

__all__ = [
    "CPU_BLOCK_PER_DEVICE",
    "DEFAULT_BLOCK_BYTES",
    "DATA_AXIS",
    "auto_block_size",
    "default_mesh",
    "gram",
    "jac_block_fn",
    "jacobian",
    "jacobians_fit",
    "jvp",
    "ntk",
    "ntk_block_fn",
    "num_outputs",
    "predict",
    "SketchedGram",
    "SketchedRows",
    "sketch_cotangents",
    "sketched_gram",
    "sketched_jacobian",
    "vjp",
]

ApplyFn = Callable[..., jax.Array]

@per_apply_fn
def ntk_block_fn(apply_fn, implementation: int):
  """The jitted neural-tangents kernel of two blocks, ``(params, x1, x2) ->
  (B1, B2, C, C)``, cached per ``apply_fn`` (for profiling and tests)."""
  fn = nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0,
                            implementation=implementation)
  return jax.jit(fn)


def jacobians_fit(n1: int, n2: int | None, c: int, p: int, itemsize: int = 4,
                  budget: int = DEFAULT_BLOCK_BYTES) -> bool:
  """Whether :func:`ntk` may hold the Jacobians of ``x1`` (and ``x2``) whole.

  ``(N1 [+ N2])·C·P·itemsize <= budget``; ``n2`` None is the symmetric
  kernel, whose one Jacobian serves both sides.
  """
  rows = n1 + (0 if n2 is None else n2)
  return rows * c * p * itemsize <= budget


@functools.cache
def _contract_fn(mesh: Mesh | None):
  """Jitted ``J1 J2ᵀ`` at full float32 precision (no TF32 on GPUs)."""
  def contract(j1, j2):
    return jnp.matmul(j1, j2.T, precision=jax.lax.Precision.HIGHEST)
  if mesh is None:
    return jax.jit(contract)
  return jax.jit(contract, out_shardings=NamedSharding(mesh, P()))


@functools.cache
def _gram_rows_fn(mesh: Mesh | None):
  """Jitted symmetric ``J Jᵀ`` in one program: ``½(K + Kᵀ)`` is fused with
  the product, so the peak is two ``(N·C)²`` buffers, not the three that
  the product and an eager symmetrisation take."""
  def gram(j):
    k = jnp.matmul(j, j.T, precision=jax.lax.Precision.HIGHEST)
    return 0.5 * (k + k.T)
  if mesh is None:
    return jax.jit(gram)
  return jax.jit(gram, out_shardings=NamedSharding(mesh, P()))


def ntk(apply_fn: ApplyFn, params, x1, x2=None, *, block_size: int | None = None,
        implementation: int = 1, mesh: Mesh | None = None,
        reuse_jacobians: bool | None = None) -> jax.Array:
  """Empirical NTK over ``params`` with every logit kept.

  Args:
    apply_fn: ``apply_fn(params, x) -> (N, C)`` logits, samples independent.
    params: the pytree to differentiate (the PEFT parameters).
    x1: inputs ``(N1, ...)``.
    x2: inputs ``(N2, ...)``; None means ``x1`` (the kernel is then
      symmetric and only its upper blocks are computed).
    block_size: samples per block; None chooses it so that a block's working
      memory (measured on a compiled probe block) fits
      :data:`DEFAULT_BLOCK_BYTES`. Each pair of blocks recomputes its two
      Jacobians (neural-tangents contracts them inside one call), so the
      Jacobian work grows with the number of blocks.
    implementation: neural-tangents' ``1`` (Jacobian contraction, the most
      reliable, default) or ``2`` (NTK-vector products).
    mesh: devices to shard over (module docstring); None means
      :func:`default_mesh`. Each ``x1`` block is split over the devices and
      the ``x2`` block and ``params`` are replicated, so every device computes
      its rows of the kernel block.
    reuse_jacobians: True computes each block's Jacobian once (our
      ``vmap(jacrev)``, as :func:`jacobian`), keeps them whole and returns
      ``J1 J2ᵀ`` — ``N1 (+ N2)`` per-sample Jacobians instead of the
      ``~N1·N2/block`` that neural-tangents' per-pair calls need, at the cost
      of holding ``(N1 [+ N2])·C·P`` numbers. False always uses
      neural-tangents' kernel per pair of blocks (``implementation``). None
      (default): True when :func:`jacobians_fit` within
      :data:`DEFAULT_BLOCK_BYTES`, else False.

  Returns:
    ``Θ`` of shape ``(N1·C, N2·C)``, sample-major:
    ``Θ[n·C + c, m·C + d] = ∂f_c(x1_n)/∂w · ∂f_d(x2_m)/∂w``.
  """
  mesh = resolve_mesh(mesh)
  symmetric = x2 is None
  x1 = jnp.asarray(x1)
  x2 = x1 if symmetric else jnp.asarray(x2)
  if reuse_jacobians is None:
    flat, _ = ravel_pytree(params)
    reuse_jacobians = jacobians_fit(
        x1.shape[0], None if symmetric else x2.shape[0],
        num_outputs(apply_fn, params, x1), int(flat.shape[0]),
        jnp.dtype(flat.dtype).itemsize, budget=DEFAULT_BLOCK_BYTES)
  if reuse_jacobians:
    j1 = jacobian(apply_fn, params, x1, block_size=block_size, mesh=mesh)
    if symmetric:
      return _gram_rows_fn(mesh)(j1)
    j2 = jacobian(apply_fn, params, x2, block_size=block_size, mesh=mesh)
    return _contract_fn(mesh)(j1, j2)
  fn = ntk_block_fn(apply_fn, int(implementation))
  params_r = replicate(mesh, params)
  block, c, _ = resolve_block(
      apply_fn, params, x1, block_size, "ntk", fn,
      lambda xb: (shard_rows(mesh, xb), replicate(mesh, xb), params_r),
      mesh=mesh)
  n1, n2 = x1.shape[0], x2.shape[0]
  dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
  out = np.empty((n1 * c, n2 * c), dtype=dtype)
  for i0, i1 in iter_blocks(n1, block):
    a = shard_rows(mesh, pad_block(x1[i0:i1], block))
    for j0, j1 in iter_blocks(n2, block):
      if symmetric and j0 < i0:
        continue
      b = replicate(mesh, pad_block(x2[j0:j1], block))
      k = fn(a, b, params_r)[: i1 - i0, : j1 - j0]  # (bi, bj, C, C)
      k = np.asarray(jnp.transpose(k, (0, 2, 1, 3)).reshape(
          (i1 - i0) * c, (j1 - j0) * c))
      out[i0 * c:i1 * c, j0 * c:j1 * c] = k
      if symmetric and j0 > i0:
        out[j0 * c:j1 * c, i0 * c:i1 * c] = k.T
  return jnp.asarray(out)


@per_apply_fn
def jac_block_fn(apply_fn):
  """The jitted Jacobian rows of a block, ``(params, x) -> (B·C, P)`` in
  ``ravel_pytree`` order, cached per ``apply_fn`` (for profiling and tests)."""
  def one(params, xi):
    return apply_fn(params, xi[None])[0]

  def block_jac(params, xb):
    flat, unravel = ravel_pytree(params)
    jac = jax.vmap(jax.jacrev(lambda w, xi: one(unravel(w), xi)),
                   in_axes=(None, 0))(flat, xb)  # (B, C, P)
    return jac.reshape(-1, flat.shape[0])

  return jax.jit(block_jac)


def _padded_jac_blocks(apply_fn, params, x, block_size, mesh):
  """Yields ``(start, end, J_block)`` for an already resolved ``mesh``.

  ``J_block`` has ``block·C`` rows, sharded along them over ``mesh``; the
  rows past ``(end - start)·C`` belong to padding samples.
  """
  x = jnp.asarray(x)
  fn = jac_block_fn(apply_fn)
  params_r = replicate(mesh, params)
  block, _, _ = resolve_block(
      apply_fn, params, x, block_size, "jac", fn,
      lambda xb: (params_r, shard_rows(mesh, xb)), mesh=mesh)
  for s, e in iter_blocks(x.shape[0], block):
    yield s, e, fn(params_r, shard_rows(mesh, pad_block(x[s:e], block)))


def _jac_blocks(apply_fn, params, x, block_size, *, mesh: Mesh | None = None):
  """Yields ``(start, end, J_block)``, ``J_block`` of ``(end - start)·C`` rows.

  Full blocks stay sharded along their rows over ``mesh`` (None:
  :func:`default_mesh`); a short last block is cut from its padded block,
  which gathers it onto every device.
  """
  mesh = resolve_mesh(mesh)
  c = num_outputs(apply_fn, params, x)
  for s, e, jb in _padded_jac_blocks(apply_fn, params, x, block_size, mesh):
    rows = (e - s) * c
    yield s, e, (jb if rows == jb.shape[0] else jb[:rows])


def jacobian(apply_fn: ApplyFn, params, x, *, block_size: int | None = None,
             mesh: Mesh | None = None) -> jax.Array:
  """The explicit Jacobian ``J`` of shape ``(N·C, P)``, sample-major rows.

  ``block_size``: samples per block; None fits a compiled probe block's
  working memory to :data:`DEFAULT_BLOCK_BYTES`, and on CPU devices takes at
  most :data:`CPU_BLOCK_PER_DEVICE` samples per device.
  ``mesh``: devices to shard the blocks of samples over (module docstring).
  """
  return jnp.concatenate(
      [j for _, _, j in _jac_blocks(apply_fn, params, x, block_size,
                                    mesh=mesh)], axis=0)


@per_apply_fn
def _gram_block_fn(apply_fn, residual_fn, mesh: Mesh | None,
                   weighted: bool = False):
  """Jitted pass over one block: logits, Jacobian rows and their Gram terms.

  ``(params, x_b, t_b, keep_b[, l_b]) -> (f_b, J_bᵀ diag(keep) J_b,
  J_bᵀ diag(keep) r_b)`` where ``f_b`` are the block's logits (from the same
  forward pass as its Jacobian), ``r_b = residual_fn(f_b, t_b)`` (or ``t_b``
  itself when ``residual_fn`` is None) and ``keep`` zeroes the padding
  samples exactly. With ``weighted``, the Gram term is
  ``Σ_i keep_i J_iᵀ L_i L_iᵀ J_i`` for per-sample ``L_i`` (``l_b``,
  ``(B, C, C)``): a generalised Gauss-Newton matrix.

  The two products carry a leading axis of one term per device
  (``(D, P, P)``, ``(D, P)``, sharded along it): each device contracts its
  own rows and nothing is communicated (:func:`gram` adds the terms to
  per-device sums and reduces those once, at the end). They are formed in the
  Jacobian's dtype at full precision: their rounding is of the order that
  the Jacobian's entries already carry.
  """
  hi = jax.lax.Precision.HIGHEST

  def body(params, xb, tb, keep, *lb):
    flat, unravel = ravel_pytree(params)

    def one(xi):
      out, pull = jax.vjp(lambda w: apply_fn(unravel(w), xi[None])[0], flat)
      rows = jax.vmap(pull)(jnp.eye(out.shape[0], dtype=out.dtype))[0]
      return out, rows

    out, jac = jax.vmap(one)(xb)  # (B, C), (B, C, P)
    r = tb if residual_fn is None else residual_fn(out, tb)
    c = out.shape[1]
    rows = jac
    if weighted:  # rows L_iᵀ J_i
      rows = jnp.einsum("bcd,bcp->bdp", lb[0].astype(jac.dtype), jac,
                        precision=hi)
    jac = jac.reshape(-1, flat.shape[0])
    rows = rows.reshape(-1, flat.shape[0])
    keep_rows = jnp.repeat(keep.astype(jac.dtype), c)[:, None]
    g = jnp.matmul((rows * keep_rows).T, rows, precision=hi)
    gb = jnp.matmul((jac * keep_rows).T, r.reshape(-1).astype(jac.dtype),
                    precision=hi)
    return out, g[None], gb[None]

  if mesh is None:
    return jax.jit(body)
  rows = P(DATA_AXIS)
  n_in = 5 if weighted else 4
  return jax.jit(jax.shard_map(body, mesh=mesh,
                               in_specs=(P(),) + (rows,) * (n_in - 1),
                               out_specs=(rows, rows, rows), check_vma=False))


@functools.cache
def _add_terms_fn(mesh: Mesh | None):
  """Jitted ``(A, b) += (G, g)``, per device, in the sums' dtype.

  A jit of its own so that float64 sums never put the model's trace under
  :func:`jax.enable_x64`; elementwise on the per-device axis, so local.
  """
  def add(acc_a, acc_b, g, gb):
    return acc_a + g.astype(acc_a.dtype), acc_b + gb.astype(acc_b.dtype)
  if mesh is None:
    return jax.jit(add, donate_argnums=(0, 1))
  rows = NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(add, donate_argnums=(0, 1), out_shardings=(rows, rows))


@functools.cache
def _sum_partials_fn(mesh: Mesh | None):
  """Sums the per-device partial ``(A, b)`` once; ``A`` (or each of a stack
  of them) symmetrised."""
  def total(acc_a, acc_b):
    a = jnp.sum(acc_a, axis=0)
    return 0.5 * (a + jnp.swapaxes(a, -1, -2)), jnp.sum(acc_b, axis=0)
  if mesh is None:
    return jax.jit(total)
  whole = NamedSharding(mesh, P())
  return jax.jit(total, out_shardings=(whole, whole))


def dtype_scope(solve_dtype: str | None):
  """A context in which arrays of dtype ``solve_dtype`` can exist.

  ``"float64"`` turns on :func:`jax.enable_x64` locally (JAX drops 64-bit
  types otherwise); anything else leaves the configuration as it is.
  """
  if solve_dtype == "float64":
    return jax.enable_x64(True)
  return contextlib.nullcontext()


def _gram_inputs(r, y, weights, solve_dtype, n: int, c: int, dtype):
  """Checks :func:`gram`'s options; returns ``(residual_fn, targets,
  weights)``, the targets per block being ``y`` for a function ``r`` and the
  residual rows otherwise."""
  if solve_dtype not in (None, "float32", "float64"):
    raise ValueError(f"solve_dtype must be None, 'float32' or 'float64', got "
                     f"{solve_dtype!r}.")
  residual_fn = r if callable(r) else None
  if residual_fn is not None:
    if y is None:
      raise ValueError("y: r is a function of (logits, y_block); pass the "
                       "per-sample targets y=... (N rows).")
    # On the host unless already on a device (jnp.asarray of a NumPy array
    # compiles a staging program for every new shape).
    y = y if isinstance(y, jax.Array) else np.asarray(y)
    if y.shape[:1] != (n,):
      raise ValueError(f"y must have one row per sample of x ({n}), got "
                       f"shape {y.shape}.")
    targets = y
  elif y is not None:
    raise ValueError("y is only used with a function r(logits, y_block); "
                     "pass residuals as r=array (N, C) instead.")
  else:
    targets = (jnp.zeros((n, c), dtype) if r is None
               else jnp.asarray(r, dtype).reshape(n, c))
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.shape != (n, c, c):
      raise ValueError(f"weights must have shape (N, C, C) = {(n, c, c)}, got "
                       f"{weights.shape}.")
  return residual_fn, targets, weights


def gram(apply_fn: ApplyFn, params, x, r=None, *, y=None,
         block_size: int | None = None, mesh: Mesh | None = None,
         solve_dtype: str | None = None, return_outputs: bool = False,
         weights=None, stable_shape: bool = False):
  """Parameter-space Gram matrix and gradient, accumulated over blocks.

  One pass over ``x``: each block's forward pass gives both its logits and
  (by ``C`` backward passes) its Jacobian rows, so residuals that depend on
  the logits at ``params`` need no separate pass (``r`` a function).

  Args:
    apply_fn: ``apply_fn(params, x) -> (N, C)``.
    params: the PEFT pytree (P scalars).
    x: inputs ``(N, ...)``.
    r: residuals: None; an array ``(N, C)``; or a jittable function
      ``r(logits, y_block) -> (B, C)`` applied to each block's logits at
      ``params`` and the matching rows of ``y`` (e.g. ``logits − onehot(y)``).
      Pass the same function object across calls to reuse compilations.
    y: per-sample targets ``(N, ...)`` for a function ``r``.
    block_size: samples per block (None: automatic, see :func:`jacobian`).
    mesh: devices to shard the blocks of samples over (module docstring);
      None means :func:`default_mesh`. Each device sums its own rows; the
      per-device partial sums are added once, at the end.
    solve_dtype: dtype of the sums, ``"float64"`` or ``"float32"``; None: the
      parameters' dtype. Jacobian blocks and their products stay in the
      model's dtype (at full precision) and are added to sums in
      ``solve_dtype`` (float64 sums keep full-dataset Grams, whose condition
      number grows with N, usable).
    return_outputs: also return the logits ``apply_fn(params, x)``.
    weights: optional per-sample factors ``L_i``, ``(N, C, C)``: the first
      output is then ``Σ_i J_iᵀ L_i L_iᵀ J_i`` (a generalised Gauss-Newton
      matrix, e.g. with :meth:`fastntk_jax.core.objective.Loss.hess_factor`); the
      gradient ``Jᵀ r`` is unchanged.
    stable_shape: blocks whose size depends on ``N`` only through a
      power-of-two bucket, capped by the automatic (or given) block; a
      short input is padded, and NumPy inputs are sliced on the host
      (:func:`fastntk_jax.core.blocking.resolve_block`). With ``r`` a
      function and no ``weights``, inputs of many sizes then run a few
      compiled programs (on CPU one, that of a large pass); for small
      inputs that recur in many sizes, such as deletion requests.

  Returns:
    ``(JᵀJ, Jᵀ r)`` of shapes ``(P, P)`` and ``(P,)`` (the second is None
    when ``r`` is None), replicated over ``mesh``; with ``return_outputs``,
    ``(JᵀJ, Jᵀ r, logits)``, the logits ``(N, C)`` in the model's dtype.
    Memory, per device: a ``P²`` sum in ``solve_dtype``, a block's ``P²`` term
    in the model's dtype, and a block's Jacobian rows.
  """
  # Stable shapes keep a NumPy input on the host (sliced and padded there):
  # jnp.asarray would compile a staging program for every new size.
  if not stable_shape:
    x = jnp.asarray(x)
  elif not isinstance(x, jax.Array):
    x = np.asarray(x)
  n = x.shape[0]
  mesh = resolve_mesh(mesh)
  flat, _ = ravel_pytree(params)
  p = flat.shape[0]
  c = num_outputs(apply_fn, params, x)
  residual_fn, t, weights = _gram_inputs(r, y, weights, solve_dtype, n, c,
                                         flat.dtype)
  fn = _gram_block_fn(apply_fn, residual_fn, mesh, weights is not None)
  a, b, logits = _block_sums(apply_fn, params, x, t, weights, fn, (p, p), c,
                             mesh, block_size, solve_dtype, return_outputs,
                             stable_shape)
  b = None if r is None else b
  if return_outputs:
    return a, b, logits
  return a, b


def _block_sums(apply_fn, params, x, t, extra, fn, shape_a, c, mesh,
                block_size, solve_dtype, return_outputs, stable=False):
  """The pass over blocks that :func:`gram` and :func:`sketched_gram` share.

  ``fn(params, x_b, t_b, keep_b[, extra_b]) -> (f_b, A_b, b_b)`` with
  per-device terms; returns the totals ``(A, b)`` (``A`` of ``shape_a``,
  symmetrised) and the logits (None unless ``return_outputs``).
  """
  n = x.shape[0]
  flat, _ = ravel_pytree(params)
  dt = flat.dtype if solve_dtype is None else np.dtype(solve_dtype)
  add = _add_terms_fn(mesh)
  params_r = replicate(mesh, params)
  block, _, _ = resolve_block(
      apply_fn, params, x, block_size, "jac", jac_block_fn(apply_fn),
      lambda xb: (params_r, shard_rows(mesh, xb)), mesh=mesh, stable=stable)
  d = n_devices(mesh)
  if stable:  # slices and padding on the host: nothing compiled per size
    x, t = np.asarray(x), np.asarray(t)
    extra = None if extra is None else np.asarray(extra)
  with dtype_scope(solve_dtype):
    acc_a, acc_b = shard_rows(mesh, (jnp.zeros((d, *shape_a), dt),
                                      jnp.zeros((d, flat.shape[0]), dt)))
  outs, sizes = [], []
  for s, e in iter_blocks(n, block):
    # Stable shapes pad a short last block only to a quarter-block bucket.
    size = tail_block(e - s, block, d) if stable else block
    keep = (np.arange(size) < (e - s)).astype(flat.dtype)
    args = shard_rows(mesh, (pad_block(x[s:e], size), pad_block(t[s:e], size),
                             keep) + (() if extra is None
                                      else (pad_block(extra[s:e], size),)))
    out, g, gb = fn(params_r, *args)
    with dtype_scope(solve_dtype):
      acc_a, acc_b = add(acc_a, acc_b, g, gb)
    if return_outputs:
      outs.append(out)
      sizes.append(e - s)
  with dtype_scope(solve_dtype):
    a, b = _sum_partials_fn(mesh)(acc_a, acc_b)
  logits = None
  if return_outputs:
    logits = (_rows_of_blocks(mesh, outs, sizes, host=stable) if outs
              else jnp.zeros((0, c), flat.dtype))
  return a, b, logits


def _check_sketch(cotangents, r) -> None:
  """The sketches' shared checks: ``s`` an int ≥ 1, residuals given."""
  validate.check_int("cotangents", cotangents, 1)
  if r is None:
    raise ValueError("r: the sketch returns the exact gradient Jᵀ r; pass "
                     "residuals (an (N, C) array or a function of logits).")


def sketch_cotangents(key, n: int, c: int, s: int, dtype=jnp.float32):
  """Random cotangents for :func:`sketched_gram`: ``(N, C, s)`` Rademacher
  signs, so that ``E[Z_i Z_iᵀ] = s·I``.

  Sample ``i``'s draw comes from ``fold_in(key, i)``: it does not depend on
  the block size or the number of devices.
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
  return jax.vmap(lambda k: jax.random.rademacher(k, (c, s), dtype))(keys)


@per_apply_fn
def _sketch_block_fn(apply_fn, residual_fn, mesh: Mesh | None, groups: int):
  """Jitted pass over one block: logits, ``s + 1`` reverse passes per sample.

  ``(params, x_b, t_b, keep_b, v_b) -> (f_b, G_b, J_bᵀ r_b)``: the rows
  ``v_{ik}ᵀ J_i`` of the ``s`` cotangent columns of ``v_b`` ``(B, C, s)``
  give ``groups`` partial Grams ``(groups, P, P)`` (columns split into
  ``groups`` equal runs), and one more reverse pass with the residual
  ``r_i`` gives the exact gradient. ``residual_fn`` is applied to one
  sample's logits at a time (it must act row by row, as ``logits − Y``
  does). Per-device terms as in :func:`_gram_block_fn`.
  """
  hi = jax.lax.Precision.HIGHEST

  def body(params, xb, tb, keep, vb):
    flat, unravel = ravel_pytree(params)
    p, s = flat.shape[0], vb.shape[-1]

    def one(xi, ti, vi):
      out, pull = jax.vjp(lambda w: apply_fn(unravel(w), xi[None])[0], flat)
      ri = ti if residual_fn is None else residual_fn(out[None], ti[None])[0]
      cot = jnp.concatenate([vi.T.astype(out.dtype),
                             ri[None].astype(out.dtype)], axis=0)
      return out, jax.vmap(pull)(cot)[0]  # (C,), (s + 1, P)

    out, rows = jax.vmap(one)(xb, tb, vb)
    rows = rows * keep.astype(rows.dtype)[:, None, None]
    sk = rows[:, :s].reshape(rows.shape[0], groups, s // groups, p)
    g = jnp.stack([jnp.matmul(sk[:, k].reshape(-1, p).T,
                              sk[:, k].reshape(-1, p), precision=hi)
                   for k in range(groups)])
    return out, g[None], jnp.sum(rows[:, s], axis=0)[None]

  if mesh is None:
    return jax.jit(body)
  rows = P(DATA_AXIS)
  return jax.jit(jax.shard_map(body, mesh=mesh,
                               in_specs=(P(),) + (rows,) * 4,
                               out_specs=(rows, rows, rows), check_vma=False))


class SketchedGram(NamedTuple):
  """What :func:`sketched_gram` returns.

  Attributes:
    gram: the estimate of ``Σ_i J_iᵀ L_i L_iᵀ J_i`` (``L_i = I`` without
      weights), the mean of ``groups``, ``(P, P)``.
    groups: the independent estimates it averages, ``(g, P, P)``; two when
      the number of cotangents is even, so that their spread estimates the
      error of the mean.
    grad: the exact ``Jᵀ r``, ``(P,)``.
    logits: ``apply_fn(params, x)`` when asked for, else None.
  """
  gram: jax.Array
  groups: jax.Array
  grad: jax.Array
  logits: jax.Array | None


def sketched_gram(apply_fn: ApplyFn, params, x, r, *, key, cotangents: int,
                  y=None, weights=None, block_size: int | None = None,
                  mesh: Mesh | None = None, solve_dtype: str | None = None,
                  return_outputs: bool = False) -> SketchedGram:
  """A random-cotangent sketch of the Gram, with the exact gradient.

  Per sample, ``s = cotangents`` reverse passes with ``v_{ik} = L_i z_{ik} /
  √h`` (Rademacher ``z_{ik}`` from :func:`sketch_cotangents`, ``h`` the
  columns per group) instead of :func:`gram`'s ``C``, plus one with the
  residual: ``E[Σ_k J_iᵀ v_{ik} v_{ik}ᵀ J_i] = J_iᵀ L_i L_iᵀ J_i`` in each
  group, so each group's sum is an unbiased estimate of the Gram (of the
  generalised Gauss-Newton matrix with ``weights``). Approximate: never
  what :func:`gram` does by default.

  Args:
    apply_fn, params, x, r, y, block_size, mesh, solve_dtype,
      return_outputs: as :func:`gram` (``r`` an array ``(N, C)`` or a
      row-wise function of ``(logits, y_block)``; not None).
    key: a ``jax.random`` key for the cotangents.
    cotangents: ``s ≥ 1`` reverse passes per sample for the sketch.
    weights: optional ``L_i``, ``(N, C, C)``.

  Returns:
    :class:`SketchedGram`.
  """
  _check_sketch(cotangents, r)
  x = jnp.asarray(x)
  n = x.shape[0]
  mesh = resolve_mesh(mesh)
  flat, _ = ravel_pytree(params)
  p = flat.shape[0]
  c = num_outputs(apply_fn, params, x)
  residual_fn, t, weights = _gram_inputs(r, y, weights, solve_dtype, n, c,
                                         flat.dtype)
  groups = 2 if cotangents % 2 == 0 else 1
  v = sketch_cotangents(key, n, c, cotangents, flat.dtype) / np.sqrt(
      cotangents // groups).astype(flat.dtype)
  if weights is not None:
    v = jnp.einsum("ncd,nds->ncs", weights.astype(flat.dtype), v)
  fn = _sketch_block_fn(apply_fn, residual_fn, mesh, groups)
  parts, b, logits = _block_sums(apply_fn, params, x, t, v, fn, (groups, p, p),
                                 c, mesh, block_size, solve_dtype,
                                 return_outputs)
  with dtype_scope(solve_dtype):
    a = jnp.mean(parts, axis=0)
  return SketchedGram(a, parts, b, logits)


class SketchedRows(NamedTuple):
  """What :func:`sketched_jacobian` returns.

  Attributes:
    rows: ``(N·s, P)`` in the model's dtype, sample-major: sample ``i``'s
      ``s`` rows ``v_{ik}ᵀ J_i`` with ``v_{ik} = z_{ik} / √s``, so that
      ``rowsᵀ rows`` is the sketched Gram that :func:`sketched_gram` forms
      from the same ``key`` (one group).
    grad: the exact ``Jᵀ r``, ``(P,)`` in ``solve_dtype``; None when not
      asked for.
    logits: ``apply_fn(params, x)`` when asked for, else None.
    residuals: the residuals seen through the same cotangents,
      ``v_{ik}ᵀ r_i``, ``(N·s,)`` in the model's dtype: ``rowsᵀ residuals``
      is the sketched (unbiased) estimate of ``Jᵀ r``.
  """
  rows: jax.Array
  grad: jax.Array
  logits: jax.Array | None
  residuals: np.ndarray | None = None


@per_apply_fn
def _sketch_rows_block_fn(apply_fn, residual_fn, exact_grad: bool = True):
  """Jitted ``(params, x_b, t_b, keep_b, v_b) -> (f_b, rows_b, g_b, ρ_b)``:
  the ``s`` sketch rows of each sample, each sample's exact gradient
  ``J_iᵀ r_i`` (``s + 1`` reverse passes per sample) and the residuals
  through the cotangents, ``ρ_{ik} = v_{ik}ᵀ r_i`` (padding samples
  zeroed)."""
  def body(params, xb, tb, keep, vb):
    flat, unravel = ravel_pytree(params)
    s = vb.shape[-1]

    def one(xi, ti, vi):
      out, pull = jax.vjp(lambda w: apply_fn(unravel(w), xi[None])[0], flat)
      ri = ti if residual_fn is None else residual_fn(out[None], ti[None])[0]
      cot = vi.T.astype(out.dtype)
      if exact_grad:  # one more reverse pass, with the residual
        cot = jnp.concatenate([cot, ri[None].astype(out.dtype)], axis=0)
      proj = vi.T.astype(out.dtype) @ ri.astype(out.dtype)
      return out, jax.vmap(pull)(cot)[0], proj  # (C,), (s [+ 1], P), (s,)

    out, rows, proj = jax.vmap(one)(xb, tb, vb)
    keep = keep.astype(rows.dtype)
    rows = rows * keep[:, None, None]
    # Per-sample gradient rows (summed on the host): no collective in the
    # block program when the block is sharded over several devices.
    return (out, rows[:, :s].reshape(-1, flat.shape[0]),
            rows[:, s] if exact_grad else None,
            (proj * keep[:, None]).reshape(-1))
  return jax.jit(body)


def sketched_jacobian(apply_fn: ApplyFn, params, x, r, *, key,
                      cotangents: int, y=None, block_size: int | None = None,
                      mesh: Mesh | None = None,
                      solve_dtype: str | None = None,
                      return_outputs: bool = False,
                      exact_gradient: bool = True) -> SketchedRows:
  """The rows of a random-cotangent sketch of ``J``, with the exact ``Jᵀ r``.

  :func:`sketched_gram`'s estimator (``s = cotangents`` Rademacher
  cotangents per sample, drawn by :func:`sketch_cotangents`), kept as
  ``N·s`` explicit rows instead of their ``P×P`` Gram: for models whose
  ``P²`` does not fit but whose ``N·s·P`` does (e.g. ViT-Base prompts,
  ``P ≈ 10⁵``), where kernel-space solves on the rows replace the
  parameter-space ones (:class:`fastntk_jax.SketchedKernel`). Approximate:
  ``E[rowsᵀ rows] = JᵀJ``.

  Args:
    apply_fn, params, x, r, y, block_size, mesh, return_outputs: as
      :func:`gram` (``r`` an ``(N, C)`` array or a row-wise function of
      ``(logits, y_block)``; not None).
    key: a ``jax.random`` key for the cotangents.
    cotangents: ``s ≥ 1`` reverse passes per sample for the sketch.
    solve_dtype: dtype of the gradient's sum (None: the model's).
    exact_gradient: also compute the exact ``Jᵀ r`` (one more reverse pass
      a sample); False leaves ``grad`` None.

  Returns:
    :class:`SketchedRows`; the rows live in host memory as one array.
  """
  _check_sketch(cotangents, r)
  x = jnp.asarray(x)
  n = x.shape[0]
  mesh = resolve_mesh(mesh)
  flat, _ = ravel_pytree(params)
  p, s = flat.shape[0], cotangents
  c = num_outputs(apply_fn, params, x)
  residual_fn, t, _ = _gram_inputs(r, y, None, solve_dtype, n, c, flat.dtype)
  v = sketch_cotangents(key, n, c, s, flat.dtype) / np.sqrt(s).astype(
      flat.dtype)
  fn = _sketch_rows_block_fn(apply_fn, residual_fn, bool(exact_gradient))
  params_r = replicate(mesh, params)
  block, _, _ = resolve_block(
      apply_fn, params, x, block_size, "jac", jac_block_fn(apply_fn),
      lambda xb: (params_r, shard_rows(mesh, xb)), mesh=mesh)
  rows = np.empty((n * s, p), flat.dtype)
  rho = np.empty((n * s,), flat.dtype)
  grad = np.zeros(p, np.float64)
  outs = []
  for st, e in iter_blocks(n, block):
    keep = (jnp.arange(block) < (e - st)).astype(flat.dtype)
    args = shard_rows(mesh, (pad_block(x[st:e], block),
                             pad_block(t[st:e], block), keep,
                             pad_block(v[st:e], block)))
    out, rb, gb, pb = fn(params_r, *args)
    rows[st * s:e * s] = np.asarray(rb)[:(e - st) * s]
    rho[st * s:e * s] = np.asarray(pb)[:(e - st) * s]
    if exact_gradient:
      grad += np.asarray(gb, np.float64).sum(axis=0)
    if return_outputs:
      outs.append(np.asarray(out)[: e - st])
  dt = flat.dtype if solve_dtype is None else np.dtype(solve_dtype)
  g = None
  if exact_gradient:
    with dtype_scope(solve_dtype):
      g = jnp.asarray(grad.astype(dt))
  logits = None
  if return_outputs:
    logits = jnp.asarray(np.concatenate(outs, axis=0) if outs
                         else np.zeros((0, c), flat.dtype))
  return SketchedRows(rows, g, logits, rho)


@per_apply_fn
def _jvp_block_fn(apply_fn):
  def f(params, tangent, xb):
    return jax.jvp(lambda p: apply_fn(p, xb), (params,), (tangent,))[1]
  return jax.jit(f)


@per_apply_fn
def _vjp_block_fn(apply_fn):
  def f(params, xb, ct):
    out, pull = jax.vjp(lambda p: apply_fn(p, xb), params)
    return pull(ct.astype(out.dtype))[0]
  return jax.jit(f)


def jvp(apply_fn: ApplyFn, params, x, tangent, *,
        block_size: int | None = None, mesh: Mesh | None = None) -> jax.Array:
  """``J v``: the logits' directional derivative, shape ``(N, C)``.

  ``mesh``: devices to shard the blocks of samples over (module docstring).
  """
  mesh = resolve_mesh(mesh)
  x = jnp.asarray(x)
  fn = _jvp_block_fn(apply_fn)
  params_r, tangent_r = replicate(mesh, (params, tangent))
  block, _, _ = resolve_block(
      apply_fn, params, x, block_size, "jvp", fn,
      lambda xb: (params_r, tangent_r, shard_rows(mesh, xb)), mesh=mesh)
  spans = list(iter_blocks(x.shape[0], block))
  outs = [fn(params_r, tangent_r, shard_rows(mesh, pad_block(x[s:e], block)))
          for s, e in spans]
  return _rows_of_blocks(mesh, outs, [e - s for s, e in spans])


def vjp(apply_fn: ApplyFn, params, x, cotangent, *,
        block_size: int | None = None, mesh: Mesh | None = None):
  """``Jᵀ u`` for cotangents ``u`` of shape ``(N, C)``; a pytree like params.

  ``mesh``: devices to shard the blocks of samples over (module docstring);
  the sum over samples is an XLA all-reduce and the result is replicated.
  """
  mesh = resolve_mesh(mesh)
  x = jnp.asarray(x)
  u = jnp.asarray(cotangent)
  fn = _vjp_block_fn(apply_fn)
  params_r = replicate(mesh, params)
  block, _, _ = resolve_block(
      apply_fn, params, x, block_size, "vjp", fn,
      lambda xb: (params_r, shard_rows(mesh, xb), shard_rows(
          mesh, jnp.zeros((xb.shape[0],) + u.shape[1:], u.dtype))), mesh=mesh)
  total = replicate(mesh, jax.tree_util.tree_map(jnp.zeros_like, params))
  for s, e in iter_blocks(x.shape[0], block):
    ct = pad_block(u[s:e], block)
    if e - s < block:  # padded rows must not contribute
      ct = ct.at[e - s:].set(0)
    g = fn(params_r, shard_rows(mesh, pad_block(x[s:e], block)),
           shard_rows(mesh, ct))
    total = jax.tree_util.tree_map(jnp.add, total, g)
  return total


def _rows_of_blocks(mesh: Mesh | None, outs, sizes,
                    host: bool = False) -> jax.Array:
  """The first ``sizes[k]`` rows of each block output, concatenated.

  On a mesh of several devices (or with ``host``) the blocks come back to
  the host first: cutting and concatenating row-sharded arrays on the
  devices reshards them, with all-to-all collectives dispatched between the
  block programs. Two runs of ``benchmarks/speedup.py`` on two host CPU
  devices stopped on an all-to-all that never completed; these eager
  reshardings are the suspected source (not confirmed). On one device
  they stay there, unless ``host`` (stable shapes: cutting on the device
  compiles a slice and a concatenation for every new input size).
  """
  if mesh is None and not host:
    return jnp.concatenate([o if o.shape[0] == k else o[:k]
                            for o, k in zip(outs, sizes)], axis=0)
  # device_put, not jnp.asarray: the latter compiles a staging program for
  # every new shape.
  return jax.device_put(np.concatenate([np.asarray(o)[:k]
                                        for o, k in zip(outs, sizes)], axis=0))


@per_apply_fn
def _predict_block_fn(apply_fn):
  return jax.jit(apply_fn)


def predict(apply_fn: ApplyFn, params, x, *, block_size: int = 256,
            mesh: Mesh | None = None, stable_shape: bool = False) -> jax.Array:
  """``apply_fn(params, x)`` in blocks of samples, shape ``(N, C)``.

  ``mesh``: devices to shard the blocks of samples over (module docstring);
  ``block_size`` is rounded up to a multiple of their number.
  ``stable_shape``: blocks of ``block_size`` even for fewer samples (padded,
  on the host), so that any number of samples runs one compiled shape.
  """
  mesh = resolve_mesh(mesh)
  # Stable shapes slice and pad on the host: nothing compiled per size.
  x = np.asarray(x) if stable_shape else jnp.asarray(x)
  d = n_devices(mesh)
  want = block_size if stable_shape else min(block_size, x.shape[0])
  block = -(-int(max(1, want)) // d) * d
  fn = _predict_block_fn(apply_fn)
  params_r = replicate(mesh, params)
  spans = list(iter_blocks(x.shape[0], block))
  outs = [fn(params_r, shard_rows(mesh, pad_block(x[s:e], block)))
          for s, e in spans]
  return _rows_of_blocks(mesh, outs, [e - s for s, e in spans],
                         host=stable_shape)
