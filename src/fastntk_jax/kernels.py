"""Kernels and Jacobian products over the PEFT pytree only.

Everything here sees a model only as ``apply_fn(params, x) -> logits`` of
shape ``(N, C)``, where ``params`` is the PEFT pytree. Outputs are flattened
*sample-major*: row ``n * C + c`` is logit ``c`` of sample ``n``.

* :func:`ntk` — the empirical NTK with every logit kept,
  ``Θ(X1, X2) = J(X1) J(X2)ᵀ`` of shape ``(N1·C, N2·C)``, through
  neural-tangents, jitted, in blocks of samples so that memory stays bounded.
* :func:`jacobian` — the explicit ``(N·C, P)`` Jacobian (blocked).
* :func:`gram` — the parameter-space counterparts ``JᵀJ`` (P×P) and
  ``Jᵀ r`` accumulated over blocks of samples.
* :func:`jvp`, :func:`vjp` — ``J v`` and ``Jᵀ u`` over blocks.

All of them vectorise over samples (``vmap_axes=0`` in neural-tangents), which
assumes that a sample's logits do not depend on the other samples of the
batch. Keep BatchNorm in inference mode (running statistics, as
:func:`fastntk_jax.peft.make_apply_fn` does): in training mode its batch
statistics couple the samples and these kernels would be wrong.

Parameters are flattened with :func:`jax.flatten_util.ravel_pytree`; the
columns of :func:`jacobian` and the rows of :func:`gram` follow that order.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax import _nt

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "auto_block_size",
    "gram",
    "jacobian",
    "jvp",
    "ntk",
    "num_outputs",
    "predict",
    "vjp",
]

ApplyFn = Callable[..., jax.Array]

#: Working memory one block's Jacobian work may take (XLA temporaries, measured
#: by compiling a small probe block), used to choose the block size.
DEFAULT_BLOCK_BYTES = 2 * 2**30
_PROBE = 8


def _per_apply_fn(builder):
  """Caches ``builder(apply_fn, *key)`` without keeping ``apply_fn`` alive.

  Jitted functions are reused across calls with the same ``apply_fn``; the
  cache entry goes when the caller drops ``apply_fn`` (and the frozen
  parameters it closes over). Callables that cannot be weakly referenced are
  not cached.
  """
  cache = weakref.WeakKeyDictionary()

  @functools.wraps(builder)
  def get(apply_fn, *key):
    try:
      per_fn = cache.setdefault(apply_fn, {})
    except TypeError:
      return builder(apply_fn, *key)
    if key not in per_fn:
      per_fn[key] = builder(apply_fn, *key)
    return per_fn[key]

  return get


def num_outputs(apply_fn: ApplyFn, params, x) -> int:
  """C, the number of logits, from a shape-only evaluation."""
  out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct(
      (1,) + tuple(np.shape(x)[1:]), jnp.result_type(x)))
  if len(out.shape) != 2:
    raise ValueError(
        f"apply_fn must return logits of shape (N, C); got {out.shape} for a "
        "batch of one. Flatten or select the outputs inside apply_fn.")
  return int(out.shape[1])


def auto_block_size(n: int, bytes_per_sample: float,
                    block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
  """Samples per block so that a block's working memory fits ``block_bytes``.

  All of ``n`` when it fits; otherwise the largest power of two that fits (so
  that different ``n`` share compiled block shapes), and at least 1.
  """
  fit = int(block_bytes // max(bytes_per_sample, 1.0))
  if fit >= n:
    return int(max(n, 1))
  return int(2 ** max(0, fit.bit_length() - 1)) if fit >= 1 else 1


_BYTES_PER_SAMPLE = weakref.WeakKeyDictionary()  # jitted fn -> {shapes: bytes}


def _bytes_per_sample(kind: str, jitted, args_for, params, x,
                      fallback: float) -> float:
  """Working memory per sample of ``jitted``, from XLA's memory analysis of a
  compiled probe block of :data:`_PROBE` samples (cached per shape)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  key = (kind, tuple(np.shape(x)[1:]), str(jnp.result_type(x)), treedef,
         tuple((np.shape(l), str(jnp.result_type(l))) for l in leaves))
  try:
    cache = _BYTES_PER_SAMPLE.setdefault(jitted, {})
  except TypeError:
    cache = {}
  if key not in cache:
    probe = jnp.zeros((_PROBE,) + tuple(np.shape(x)[1:]), jnp.result_type(x))
    analysis = jitted.lower(*args_for(probe)).compile().memory_analysis()
    if analysis is None:  # a backend without memory analysis
      total = fallback * _PROBE
    else:
      total = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    cache[key] = total / _PROBE
  return cache[key]


def _blocks(n: int, block: int) -> Iterator[tuple[int, int]]:
  for start in range(0, n, block):
    yield start, min(start + block, n)


def _pad(x, block: int):
  """Pads a last, short block to ``block`` rows (one compilation per shape)."""
  n = x.shape[0]
  if n == block:
    return x
  reps = jnp.broadcast_to(x[:1], (block - n,) + x.shape[1:])
  return jnp.concatenate([x, reps], axis=0)


def _resolve_block(apply_fn, params, x, block_size, kind=None, jitted=None,
                   args_for=None):
  c = num_outputs(apply_fn, params, x)
  p = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(params))
  if block_size is None:
    if jitted is None:
      block_size = len(x)
    else:
      # Without XLA's analysis: two Jacobians and ~8x their size in temporaries.
      fallback = 16.0 * c * p * 4
      per = _bytes_per_sample(kind, jitted, args_for, params, x, fallback)
      block_size = auto_block_size(len(x), per)
  if int(block_size) < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}.")
  return int(min(block_size, max(len(x), 1))), c, p


@_per_apply_fn
def _ntk_block_fn(apply_fn, implementation: int):
  fn = _nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0,
                            implementation=implementation)
  return jax.jit(fn)


def ntk(apply_fn: ApplyFn, params, x1, x2=None, *, block_size: int | None = None,
        implementation: int = 1) -> jax.Array:
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

  Returns:
    ``Θ`` of shape ``(N1·C, N2·C)``, sample-major:
    ``Θ[n·C + c, m·C + d] = ∂f_c(x1_n)/∂w · ∂f_d(x2_m)/∂w``.
  """
  symmetric = x2 is None
  x1 = jnp.asarray(x1)
  x2 = x1 if symmetric else jnp.asarray(x2)
  fn = _ntk_block_fn(apply_fn, int(implementation))
  block, c, _ = _resolve_block(apply_fn, params, x1, block_size, "ntk", fn,
                               lambda xb: (xb, xb, params))
  n1, n2 = x1.shape[0], x2.shape[0]
  dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
  out = np.empty((n1 * c, n2 * c), dtype=dtype)
  for i0, i1 in _blocks(n1, block):
    a = _pad(x1[i0:i1], block)
    for j0, j1 in _blocks(n2, block):
      if symmetric and j0 < i0:
        continue
      b = _pad(x2[j0:j1], block)
      k = fn(a, b, params)[: i1 - i0, : j1 - j0]  # (bi, bj, C, C)
      k = np.asarray(jnp.transpose(k, (0, 2, 1, 3)).reshape(
          (i1 - i0) * c, (j1 - j0) * c))
      out[i0 * c:i1 * c, j0 * c:j1 * c] = k
      if symmetric and j0 > i0:
        out[j0 * c:j1 * c, i0 * c:i1 * c] = k.T
  return jnp.asarray(out)


@_per_apply_fn
def _jac_block_fn(apply_fn):
  def one(params, xi):
    return apply_fn(params, xi[None])[0]

  def block_jac(params, xb):
    flat, unravel = ravel_pytree(params)
    jac = jax.vmap(jax.jacrev(lambda w, xi: one(unravel(w), xi)),
                   in_axes=(None, 0))(flat, xb)  # (B, C, P)
    return jac.reshape(-1, flat.shape[0])

  return jax.jit(block_jac)


def _jac_blocks(apply_fn, params, x, block_size):
  x = jnp.asarray(x)
  fn = _jac_block_fn(apply_fn)
  block, c, _ = _resolve_block(apply_fn, params, x, block_size, "jac", fn,
                               lambda xb: (params, xb))
  for s, e in _blocks(x.shape[0], block):
    yield s, e, fn(params, _pad(x[s:e], block))[: (e - s) * c]


def jacobian(apply_fn: ApplyFn, params, x, *,
             block_size: int | None = None) -> jax.Array:
  """The explicit Jacobian ``J`` of shape ``(N·C, P)``, sample-major rows."""
  return jnp.concatenate(
      [j for _, _, j in _jac_blocks(apply_fn, params, x, block_size)], axis=0)


@jax.jit
def _accumulate(acc_a, acc_b, jb, rb):
  return acc_a + jb.T @ jb, acc_b + jb.T @ rb


def gram(apply_fn: ApplyFn, params, x, r=None, *,
         block_size: int | None = None) -> tuple[jax.Array, jax.Array | None]:
  """Parameter-space Gram matrix and gradient, accumulated over blocks.

  Args:
    apply_fn: ``apply_fn(params, x) -> (N, C)``.
    params: the PEFT pytree (P scalars).
    x: inputs ``(N, ...)``.
    r: optional residuals ``(N, C)``.
    block_size: samples per block.

  Returns:
    ``(JᵀJ, Jᵀ r)`` of shapes ``(P, P)`` and ``(P,)`` (the second is None
    when ``r`` is None). Memory: ``P²`` plus one block's Jacobian.
  """
  flat, _ = ravel_pytree(params)
  p = flat.shape[0]
  a = jnp.zeros((p, p), flat.dtype)
  b = jnp.zeros((p,), flat.dtype)
  rr = None if r is None else jnp.asarray(r, flat.dtype).reshape(-1)
  c = None
  for s, e, jb in _jac_blocks(apply_fn, params, x, block_size):
    c = jb.shape[0] // (e - s)
    rb = jnp.zeros((jb.shape[0],), flat.dtype) if rr is None else rr[s * c:e * c]
    a, b = _accumulate(a, b, jb, rb)
  return a, (None if r is None else b)


@_per_apply_fn
def _jvp_block_fn(apply_fn):
  def f(params, tangent, xb):
    return jax.jvp(lambda p: apply_fn(p, xb), (params,), (tangent,))[1]
  return jax.jit(f)


@_per_apply_fn
def _vjp_block_fn(apply_fn):
  def f(params, xb, ct):
    out, pull = jax.vjp(lambda p: apply_fn(p, xb), params)
    return pull(ct.astype(out.dtype))[0]
  return jax.jit(f)


def jvp(apply_fn: ApplyFn, params, x, tangent, *,
        block_size: int | None = None) -> jax.Array:
  """``J v``: the logits' directional derivative, shape ``(N, C)``."""
  x = jnp.asarray(x)
  fn = _jvp_block_fn(apply_fn)
  block, _, _ = _resolve_block(apply_fn, params, x, block_size, "jvp", fn,
                               lambda xb: (params, tangent, xb))
  outs = [fn(params, tangent, _pad(x[s:e], block))[: e - s]
          for s, e in _blocks(x.shape[0], block)]
  return jnp.concatenate(outs, axis=0)


def vjp(apply_fn: ApplyFn, params, x, cotangent, *,
        block_size: int | None = None):
  """``Jᵀ u`` for cotangents ``u`` of shape ``(N, C)``; a pytree like params."""
  x = jnp.asarray(x)
  u = jnp.asarray(cotangent)
  fn = _vjp_block_fn(apply_fn)
  block, _, _ = _resolve_block(
      apply_fn, params, x, block_size, "vjp", fn,
      lambda xb: (params, xb, jnp.zeros((xb.shape[0],) + u.shape[1:], u.dtype)))
  total = jax.tree_util.tree_map(jnp.zeros_like, params)
  for s, e in _blocks(x.shape[0], block):
    ct = _pad(u[s:e], block)
    if e - s < block:  # padded rows must not contribute
      ct = ct.at[e - s:].set(0)
    g = fn(params, _pad(x[s:e], block), ct)
    total = jax.tree_util.tree_map(jnp.add, total, g)
  return total


@_per_apply_fn
def _predict_block_fn(apply_fn):
  return jax.jit(apply_fn)


def predict(apply_fn: ApplyFn, params, x, *, block_size: int = 256) -> jax.Array:
  """``apply_fn(params, x)`` in blocks of samples, shape ``(N, C)``."""
  x = jnp.asarray(x)
  block = int(max(1, min(block_size, x.shape[0])))
  fn = _predict_block_fn(apply_fn)
  outs = [fn(params, _pad(x[s:e], block))[: e - s]
          for s, e in _blocks(x.shape[0], block)]
  return jnp.concatenate(outs, axis=0)
