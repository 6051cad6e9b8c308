"""Atomic file writes: a temporary file in the destination folder, then rename.

A crash or an error mid-write leaves the previous file intact and no
temporary file behind. Used for checkpoints, results, caches and assets.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]
                 ) -> Path:
  """Calls ``write(f)`` on a temporary file, fsyncs it and renames it to ``path``.

  The file gets the usual mode (``0o666`` minus the umask) rather than the
  ``0o600`` of ``mkstemp``. Parent folders are created.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path
