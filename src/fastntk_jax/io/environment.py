"""The device and library versions, recorded with every result file."""

from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["environment", "request_host_devices"]

_HOST_FLAG = "--xla_force_host_platform_device_count"
#: With several host devices, XLA:CPU aborts the whole process when one
#: device's thread reaches a collective 40 s after the others (a rendezvous
#: "termination timeout"). On a loaded 2-core machine that happened to a
#: benchmark in the middle of a long run, so the waits are raised to an hour
#: (and the "stuck" warning to 10 minutes) unless XLA_FLAGS already sets them.
_COLLECTIVE_FLAGS = {
    "--xla_cpu_collective_call_terminate_timeout_seconds": 3600,
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds": 600,
}


def request_host_devices(k: int) -> int:
  """Asks XLA for ``k`` CPU devices (one XLA program per device).

  Sets ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, which JAX
  reads when it starts its backends; call it before any JAX computation.
  With ``k > 1`` it also raises XLA:CPU's collective timeouts
  (:data:`_COLLECTIVE_FLAGS`), so that a device starved of CPU time by
  other processes slows a run down instead of aborting it.
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
  extra = [f"{name}={value}" for name, value in _COLLECTIVE_FLAGS.items()
           if int(k) > 1 and not any(f.startswith(name + "=") for f in kept)]
  os.environ["XLA_FLAGS"] = " ".join(kept + extra + [f"{_HOST_FLAG}={int(k)}"])
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
