"""Where files live: the package's assets and the shared offline data folder."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ASSET_DIR", "SHARED_DATA_ENV", "shared_data_dir"]

#: Files shipped inside the package (embedded CIFAR-10 subset, ResNet-20).
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets"
#: Environment variable naming the shared data folder when it is elsewhere.
SHARED_DATA_ENV = "FASTNTK_SHARED_DATA"


def shared_data_dir() -> Path | None:
  """Locates the offline data folder shared beside the project.

  Looks first for ``../shared/data`` relative to the repository root (the
  folder holding ``src/``), then for the folder named by the environment
  variable ``FASTNTK_SHARED_DATA``.

  Returns:
    The folder as an absolute ``Path``, or ``None`` when neither exists.
  """
  repo_root = Path(__file__).resolve().parents[3]
  candidate = (repo_root.parent / "shared" / "data").resolve()
  if candidate.is_dir():
    return candidate
  env = os.environ.get(SHARED_DATA_ENV)
  if env:
    path = Path(env).expanduser().resolve()
    if path.is_dir():
      return path
  return None
