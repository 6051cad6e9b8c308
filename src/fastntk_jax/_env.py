"""The device and library versions, recorded with every result file."""

from __future__ import annotations

import platform
from typing import Any

__all__ = ["environment"]


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
