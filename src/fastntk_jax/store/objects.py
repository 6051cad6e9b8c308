"""Content-addressed, checksummed object files: the store's arrays and trees.

Every object is one immutable file ``objects/<sha256>.<ext>`` whose name is
the SHA-256 of its bytes:

* ``.npy`` — one array in NumPy's ``.npy`` format, read back with
  ``allow_pickle=False`` (object arrays are refused when written);
* ``.msgpack`` — a pytree of arrays (nested string-keyed dicts), Flax's
  msgpack serialisation, which never executes code.

A file is written to a temporary name, fsynced, renamed to its digest and
the folder fsynced (so a crash leaves either no file or the whole file), and
its digest is checked again whenever it is read: a truncated or altered file
raises :class:`CorruptObjectError` instead of being loaded. Writing an object
that exists is free, so unchanged arrays are never written twice.

Example::

  objs = ObjectFiles(root / "objects")
  key = objs.put_array(np.arange(3))
  objs.get_array(key)   # array([0, 1, 2]), digest checked
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

__all__ = ["CorruptObjectError", "ObjectFiles", "fsync_dir", "sha256_bytes"]

_CHUNK = 1 << 22  # 4 MiB
_EXTENSIONS = (".npy", ".msgpack")


class CorruptObjectError(ValueError):
  """An object file whose bytes do not hash to its name, or that is missing."""


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
  """Makes a rename or unlink in ``path`` durable (POSIX; no-op elsewhere)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


class _HashingFile(io.RawIOBase):
  """A write-only file that hashes what passes through it."""

  def __init__(self, f):
    self.f, self.h = f, hashlib.sha256()

  def writable(self):
    return True

  def write(self, b):
    self.h.update(b)
    return self.f.write(b)


class ObjectFiles:
  """The ``objects/`` folder of a store: put, get (checked), keep, remove."""

  def __init__(self, root: str | os.PathLike):
    self.root = Path(root)

  def path(self, key: str) -> Path:
    if not isinstance(key, str) or not key.endswith(_EXTENSIONS):
      raise CorruptObjectError(f"not an object key: {key!r}")
    return self.root / key

  def _put(self, write, ext: str) -> str:
    self.root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".new-", suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        hf = _HashingFile(f)
        write(hf)
        f.flush()
        os.fsync(f.fileno())
      key = hf.h.hexdigest() + ext
      dest = self.root / key
      if dest.exists():
        os.unlink(tmp)
      else:
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
        fsync_dir(self.root)
      return key
    except BaseException:
      Path(tmp).unlink(missing_ok=True)
      raise

  def put_array(self, a) -> str:
    """Writes one array; returns its key ``<sha256>.npy``."""
    a = np.asarray(jax.device_get(a))
    if a.dtype == object:
      raise TypeError("object arrays cannot be stored (they need pickle).")
    return self._put(lambda f: np.lib.format.write_array(
        f, np.ascontiguousarray(a), allow_pickle=False), ".npy")

  def put_tree(self, tree) -> str:
    """Writes a pytree of arrays; returns its key ``<sha256>.msgpack``."""
    state = jax.tree_util.tree_map(np.asarray, serialization.to_state_dict(
        jax.device_get(tree)))
    data = serialization.msgpack_serialize(state)
    return self._put(lambda f: f.write(data), ".msgpack")

  def _check(self, key: str, keep: bool) -> bytes | None:
    path = self.path(key)
    if not path.is_file():
      raise CorruptObjectError(
          f"{path}: object file missing. The store was edited or damaged "
          "outside fastntk_jax; restore the store folder from a backup.")
    h, parts = hashlib.sha256(), []
    with open(path, "rb") as f:
      while chunk := f.read(_CHUNK):
        h.update(chunk)
        if keep:
          parts.append(chunk)
    if h.hexdigest() != key.split(".")[0]:
      raise CorruptObjectError(
          f"{path}: checksum mismatch (the file is truncated or altered); "
          "it was not loaded. Restore the store folder from a backup.")
    return b"".join(parts) if keep else None

  def read_checked(self, key: str) -> bytes:
    """The object's bytes, after checking that they hash to its name."""
    return self._check(key, keep=True)

  def get_array(self, key: str) -> np.ndarray:
    """The array, after checking its digest (one copy in memory: objects
    are immutable, so the file checked is the file read)."""
    self._check(key, keep=False)
    try:
      mm = np.load(self.path(key), mmap_mode="r", allow_pickle=False)
      return np.array(mm)
    except (ValueError, OSError) as err:
      raise CorruptObjectError(f"{self.path(key)}: unreadable array ({err})."
                               ) from err

  def get_tree(self, key: str) -> Any:
    data = self.read_checked(key)
    try:
      return serialization.msgpack_restore(data)
    except Exception as err:  # msgpack raises several unrelated types
      raise CorruptObjectError(f"{self.path(key)}: unreadable tree ({err})."
                               ) from err

  def keys(self) -> list[str]:
    if not self.root.is_dir():
      return []
    return sorted(p.name for p in self.root.iterdir()
                  if p.name.endswith(_EXTENSIONS))

  def remove_except(self, keep: Iterable[str]) -> int:
    """Deletes objects not in ``keep`` and stray temporary files; returns the
    count. Only the store's writer, holding its lock, calls it."""
    keep, n = set(keep), 0
    if not self.root.is_dir():
      return 0
    for p in self.root.iterdir():
      if (p.name.endswith(_EXTENSIONS) and p.name not in keep) or (
          p.name.startswith(".new-") and p.name.endswith(".tmp")):
        p.unlink(missing_ok=True)
        n += 1
    if n:
      fsync_dir(self.root)
    return n
