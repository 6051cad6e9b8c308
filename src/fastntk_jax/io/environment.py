"""The device and library versions, recorded with every result file."""

from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["environment", "keep_freed_memory", "request_host_devices"]

_HOST_FLAG = "--xla_force_host_platform_device_count"


def request_host_devices(k: int) -> int:
  """Asks XLA for ``k`` CPU devices (one XLA program per device).

  Sets ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, which JAX
  reads when it starts its backends; call it before any JAX computation.
  With one device per core, :func:`fastntk_jax.core.kernels.default_mesh` shards
  the Jacobian work over the cores (docs/scale.md). Devices of a GPU backend
  are unaffected.

  Returns:
    ``k``, once JAX reports that many CPU devices.

  Raises:
    ValueError: ``k < 1``.
    RuntimeError: JAX had already started with another number of devices.
  """
  if int(k) < 1:
    raise ValueError(f"host devices must be >= 1, got {k}.")
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith(_HOST_FLAG)]
  os.environ["XLA_FLAGS"] = " ".join(kept + [f"{_HOST_FLAG}={int(k)}"])
  import jax
  got = len(jax.devices("cpu"))
  if got != int(k):
    raise RuntimeError(
        f"asked for {k} CPU devices but JAX had already started with {got}; "
        f"call request_host_devices before any JAX computation, or set "
        f"XLA_FLAGS={_HOST_FLAG}={k} before starting Python.")
  return got


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def keep_freed_memory() -> bool:
  """Asks glibc to keep memory this process frees for its next allocations.

  By default glibc serves large blocks with ``mmap`` and hands them back on
  ``free``, and shrinks its heaps eagerly. On a VM whose balloon device
  reports free pages (bit 5 of
  ``/sys/bus/virtio/drivers/virtio_balloon/virtio*/features``), memory
  handed back and taken again faults in the host on every first touch: a
  process answering deletion requests spent part of each request there
  (docs/deletion_store.md). This sets, with ``mallopt``, one arena, no
  ``mmap`` blocks and a trim threshold of 2 GiB (``mallopt`` takes an
  ``int``) — what ``GLIBC_TUNABLES=glibc.malloc.arena_max=1:``
  ``glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`` does from the
  environment — so freed memory stays in the process, except free space of
  more than 2 GiB at the top of the heap.

  Call it first thing in a process that answers requests, before JAX starts
  its threads (their arenas are made then). ``fastntk deletion forget``
  calls it unless given ``--release-memory``.

  Returns:
    ``True`` when glibc accepted all three settings; ``False`` where the C
    library is not glibc (musl, macOS: nothing is done) or refused one.
  """
  import ctypes
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  if not hasattr(libc, "gnu_get_libc_version"):
    return False
  ok = [mallopt(k, v) == 1 for k, v in _KEEP]  # every one tried
  return all(ok)


def environment() -> dict[str, Any]:
  """``{"device", "platform", "num_devices", "versions": {...}}``."""
  import flax
  import jax
  import optax
  import fastntk_jax
  return {
      "device": str(jax.devices()[0].device_kind),
      "platform": jax.default_backend(),
      "num_devices": jax.device_count(),
      "versions": {"fastntk_jax": fastntk_jax.__version__,
                   "jax": jax.__version__, "flax": flax.__version__,
                   "optax": optax.__version__,
                   "python": platform.python_version()},
  }
