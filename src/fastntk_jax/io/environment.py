"""The device and library versions, recorded with every result file."""

from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["environment", "request_host_devices"]

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
