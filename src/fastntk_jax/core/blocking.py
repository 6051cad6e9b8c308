"""Devices, meshes and blocks of samples for the kernel and Jacobian work.

A 1-D :class:`jax.sharding.Mesh` with axis ``"data"`` (:data:`DATA_AXIS`)
shards each block of samples along its first axis; parameters are
replicated. Automatic block sizes fit :data:`DEFAULT_BLOCK_BYTES` of XLA
working memory, measured by compiling a probe block; on CPU devices blocks of
Jacobian work also stop at :data:`CPU_BLOCK_PER_DEVICE` samples per device.
Block sizes are rounded up to a multiple of the mesh's devices; a short last
block is padded (:func:`pad_block`) so that one compilation serves all.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
  "CPU_BLOCK_PER_DEVICE",
  "DATA_AXIS",
  "DEFAULT_BLOCK_BYTES",
  "PROBE_SAMPLES",
  "STABLE_MIN_BLOCK",
  "auto_block_size",
  "balanced_block",
  "bytes_per_sample",
  "default_mesh",
  "device_platform",
  "iter_blocks",
  "n_devices",
  "num_outputs",
  "on_one_device",
  "pad_block",
  "per_apply_fn",
  "replicate",
  "resolve_block",
  "resolve_mesh",
  "shard_rows",
  "tail_block",
]

ApplyFn = Callable[..., jax.Array]

#: Working memory one block's Jacobian work may take (XLA temporaries, measured
#: by compiling a small probe block), used to choose the block size.
DEFAULT_BLOCK_BYTES = 2 * 2**30
PROBE_SAMPLES = 8

#: On CPU devices, the most samples per device that an automatic block of
#: Jacobian work takes: larger blocks run slower there (their activations fall
#: out of the caches; ``benchmarks/profile_jacobian.py`` times block sizes).
#: Accelerators take the largest block that fits :data:`DEFAULT_BLOCK_BYTES`.
CPU_BLOCK_PER_DEVICE = 16

#: The smallest block, in samples a device, of :func:`resolve_block`'s
#: ``stable`` blocks (small inputs are padded to it).
STABLE_MIN_BLOCK = 16

#: The mesh axis that blocks of samples are sharded along.
DATA_AXIS = "data"


def default_mesh() -> Mesh | None:
  """A 1-D mesh over :func:`jax.local_devices` with axis ``"data"``.

  Returns:
    The mesh, or None when this process sees a single device (then the
    kernels run unsharded, exactly as without a mesh).
  """
  devices = jax.local_devices()
  if len(devices) < 2:
    return None
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def resolve_mesh(mesh) -> Mesh | None:
  """Validates ``mesh`` at the public boundary; None -> :func:`default_mesh`."""
  if mesh is None:
    return default_mesh()
  if not isinstance(mesh, Mesh):
    raise TypeError(
        f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}. "
        "Pass None for all local devices, or build one with "
        "jax.sharding.Mesh(np.array(jax.local_devices()), ('data',)).")
  if tuple(mesh.axis_names) != (DATA_AXIS,):
    raise ValueError(
        f"mesh must be 1-D with the single axis name {DATA_AXIS!r}, got axis "
        f"names {tuple(mesh.axis_names)}. Build it as "
        f"jax.sharding.Mesh(devices, ({DATA_AXIS!r},)).")
  here = jax.process_index()
  if any(d.process_index != here for d in mesh.devices.flat):
    raise ValueError(
        "mesh must hold only this process's devices (jax.local_devices()): "
        "blocks of samples are placed from host memory. In a multi-host run, "
        "give each process a mesh over its own local devices.")
  return mesh


def n_devices(mesh: Mesh | None) -> int:
  return 1 if mesh is None else int(mesh.size)


def device_platform(mesh: Mesh | None) -> str:
  if mesh is None:
    return jax.local_devices()[0].platform
  return mesh.devices.flat[0].platform


def shard_rows(mesh: Mesh | None, x):
  """Places ``x`` split along its first (sample) axis over ``mesh``."""
  if mesh is None:
    return x
  return jax.device_put(x, NamedSharding(mesh, P(DATA_AXIS)))


def replicate(mesh: Mesh | None, tree):
  """Places a pytree whole on every device of ``mesh``."""
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, P()))


def per_apply_fn(builder):
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


def bytes_per_sample(kind: str, jitted, args_for, params, x,
                      fallback: float, mesh: Mesh | None = None) -> float:
  """Working memory per sample of ``jitted``, from XLA's memory analysis of a
  compiled probe block of :data:`PROBE_SAMPLES` samples (cached per shape).

  ``args_for(probe)`` places the probe block as the real blocks are placed;
  with a ``mesh`` the probe is rounded up to a multiple of its devices and the
  analysis is per device, so the budget holds per device and the blocks grow
  with the number of devices.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  key = (kind, tuple(np.shape(x)[1:]), str(jnp.result_type(x)), treedef,
         tuple((np.shape(l), str(jnp.result_type(l))) for l in leaves), mesh)
  try:
    cache = _BYTES_PER_SAMPLE.setdefault(jitted, {})
  except TypeError:
    cache = {}
  if key not in cache:
    d = n_devices(mesh)
    n_probe = -(-PROBE_SAMPLES // d) * d
    probe = jnp.zeros((n_probe,) + tuple(np.shape(x)[1:]), jnp.result_type(x))
    analysis = jitted.lower(*args_for(probe)).compile().memory_analysis()
    if analysis is None:  # a backend without memory analysis
      total = fallback * n_probe / d
    else:
      total = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    cache[key] = total / n_probe
  return cache[key]


def balanced_block(n: int, block: int, devices: int = 1) -> int:
  """The smallest block that covers ``n`` samples in as many blocks of at
  most ``block`` samples as before, rounded up to a multiple of ``devices``.

  The last block is padded to the block size; balancing keeps that padding
  under one sample a block (and a device) instead of up to a whole block.
  100 images in blocks of 16 compute 112 Jacobian rows; in blocks of 15,
  105. ``n >= block²`` always keeps ``block`` (and its compiled shape).
  Small inputs of many sizes (deletion requests) take
  :func:`resolve_block`'s ``stable`` blocks instead: a little more padding,
  no compilation per size.
  """
  n, block, devices = max(int(n), 1), max(int(block), 1), max(int(devices), 1)
  k = -(-n // block)
  b = -(-n // k)
  b = -(-b // devices) * devices
  return int(min(b, -(-block // devices) * devices))


def on_one_device(mesh: Mesh | None, tree):
  """Places ``tree`` whole on the first device of ``mesh``.

  For the small dense algebra after a pass over blocks (P×P factorisations
  and solves): replicated over a mesh of CPU devices, every device would
  repeat it on the same cores (``benchmarks/deletion_request_profile.py``
  measures both placements).
  """
  if mesh is None:
    return tree
  return jax.device_put(tree, mesh.devices.flat[0])


def tail_block(rows: int, block: int, devices: int = 1) -> int:
  """The padded size of a block of ``rows`` samples in ``stable`` passes
  (:func:`resolve_block`): ``block`` when full, else the next multiple of a
  quarter block (rounded to the devices). A short last block then costs
  under a quarter block of padding, at four compiled shapes at most: 100
  images in blocks of 32 on two devices compute 104 samples' rows, not 128.
  """
  d = max(int(devices), 1)
  q = -(-max(int(block) // 4, 1) // d) * d
  return int(min(block, -(-int(rows) // q) * q))


def iter_blocks(n: int, block: int) -> Iterator[tuple[int, int]]:
  for start in range(0, n, block):
    yield start, min(start + block, n)


def pad_block(x, block: int):
  """Pads a last, short block to ``block`` rows (one compilation per shape;
  a NumPy array is padded on the host, which compiles nothing)."""
  n = x.shape[0]
  if n == block:
    return x
  xp = np if isinstance(x, np.ndarray) else jnp
  reps = xp.broadcast_to(x[:1], (block - n,) + x.shape[1:])
  return xp.concatenate([x, reps], axis=0)


def resolve_block(apply_fn, params, x, block_size, kind=None, jitted=None,
                   args_for=None, mesh=None, stable: bool = False):
  """(samples per block, C, P); the block is a multiple of mesh's devices.

  ``stable``: the block depends on ``len(x)`` only through a bucket — the
  power of two at or above ``len(x)``, at least :data:`STABLE_MIN_BLOCK`
  samples a device — capped by the block a large input gets (or the given
  ``block_size``); a short last block is padded to a quarter-block bucket
  (:func:`tail_block`): inputs of many sizes run a few compiled shapes. On
  CPU, where a large input's block is :data:`CPU_BLOCK_PER_DEVICE` a
  device, the full blocks have the shape a large pass over the same model
  compiled (deletion requests after ``prepare``), and the last block one of
  four.
  """
  c = num_outputs(apply_fn, params, x)
  p = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(params))
  if block_size is None:
    if jitted is None:
      block_size = len(x)
    else:
      # Without XLA's analysis: two Jacobians and ~8x their size in temporaries.
      fallback = 16.0 * c * p * 4
      per = bytes_per_sample(kind, jitted, args_for, params, x, fallback,
                              mesh=mesh)
      block_size = auto_block_size(2**62 if stable else len(x), per)
      if kind == "jac" and device_platform(mesh) == "cpu":
        block_size = min(block_size, CPU_BLOCK_PER_DEVICE * n_devices(mesh))
      if not stable:
        block_size = balanced_block(len(x), block_size, n_devices(mesh))
  if int(block_size) < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}.")
  d = n_devices(mesh)
  if stable:
    bucket = max(STABLE_MIN_BLOCK * d, 1 << max(0, len(x) - 1).bit_length())
    block = int(min(block_size, bucket))
  else:
    block = int(min(block_size, max(len(x), 1)))
  return -(-block // d) * d, c, p
