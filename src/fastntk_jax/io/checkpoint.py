"""Checkpoints: pytrees and a JSON config in one msgpack file, written atomically.

A checkpoint is one file holding named pytrees (``w_0``, ``w_D``, the frozen
rest of the variables with the BatchNorm statistics, an optimiser state …) and
a JSON-serialisable ``config`` that says how they were made. The container is
Flax's msgpack serialisation: arrays and nested string-keyed dicts only, so
loading a checkpoint never executes code (no pickle).

Writes go to a temporary file in the destination directory, are flushed to
disk and then renamed over the destination (``os.replace``), so a crash or an
error mid-write leaves the previous good file intact.

Example::

  save("run/model.ckpt", {"w_0": w0, "w_D": wd, "frozen": frozen},
       config={"model": "resnet20", "epochs": 30})
  ckpt = load("run/model.ckpt")
  ckpt.trees["w_D"], ckpt.config["model"]
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import serialization

from fastntk_jax.io.atomic import atomic_write

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_json",
    "load",
    "restore_like",
    "save",
]

FORMAT = "fastntk_jax.io.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
  """A file that is not a readable fastntk_jax checkpoint."""


class Checkpoint(NamedTuple):
  """A loaded checkpoint.

  Attributes:
    kind: what the file holds, e.g. ``"backbone"`` or ``"peft"``.
    trees: name -> pytree of NumPy arrays (nested dicts).
    config: the JSON config saved with it.
  """
  kind: str
  trees: dict
  config: dict


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and ``os.replace``."""
  atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as indented JSON to ``path`` atomically."""
  atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default)
                            + "\n").encode())


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, Path):
    return str(o)
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _to_numpy(tree):
  state = serialization.to_state_dict(tree)
  return jax.tree_util.tree_map(np.asarray, state)


def save(path: str | os.PathLike, trees: Mapping[str, Any], *,
         config: Mapping[str, Any] | None = None,
         kind: str = "peft") -> Path:
  """Saves named pytrees and a JSON config to ``path`` atomically.

  Args:
    path: destination file (parent directories are created).
    trees: name -> pytree (dicts, lists, tuples, NamedTuples such as optax
      states; leaves are arrays or scalars).
    config: JSON-serialisable description of how the trees were made.
    kind: a short tag checked by :func:`load` (``expect_kind``).

  Returns:
    The path written.
  """
  if not isinstance(trees, Mapping) or not all(
      isinstance(k, str) for k in trees):
    raise ValueError("trees must be a mapping from str names to pytrees.")
  try:
    config_json = json.dumps(dict(config or {}), default=_json_default)
  except TypeError as err:
    raise ValueError(f"config is not JSON serialisable: {err}") from err
  payload = {
      "format": FORMAT,
      "version": VERSION,
      "kind": str(kind),
      "config": config_json,
      "trees": {k: _to_numpy(v) for k, v in trees.items()},
  }
  data = serialization.msgpack_serialize(payload)
  atomic_write_bytes(path, data)
  return Path(path)


def load(path: str | os.PathLike, *, expect_kind: str | None = None
         ) -> Checkpoint:
  """Loads a checkpoint written by :func:`save`.

  Args:
    path: the checkpoint file.
    expect_kind: when given, a checkpoint of another kind is an error.

  Returns:
    :class:`Checkpoint` with NumPy leaves.

  Raises:
    FileNotFoundError: no file at ``path``.
    CheckpointError: not a fastntk_jax checkpoint, a newer format, a
      truncated or corrupt file, or the wrong kind.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no checkpoint file at {path}.")
  data = path.read_bytes()
  try:
    payload = serialization.msgpack_restore(data)
  except Exception as err:  # msgpack raises several unrelated types
    raise CheckpointError(
        f"{path} is not a readable checkpoint (truncated or not written by "
        f"fastntk_jax): {type(err).__name__}: {err}") from err
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    raise CheckpointError(f"{path} is not a fastntk_jax checkpoint.")
  if int(payload.get("version", -1)) > VERSION:
    raise CheckpointError(
        f"{path} has checkpoint format version {payload['version']}; this "
        f"fastntk_jax reads up to {VERSION}. Upgrade fastntk_jax.")
  kind = payload.get("kind", "")
  if expect_kind is not None and kind != expect_kind:
    raise CheckpointError(
        f"{path} holds a {kind!r} checkpoint, expected {expect_kind!r}.")
  try:
    config = json.loads(payload.get("config", "{}"))
  except json.JSONDecodeError as err:
    raise CheckpointError(f"{path}: corrupt config ({err}).") from err
  return Checkpoint(kind, dict(payload.get("trees", {})), config)


def restore_like(target, state):
  """Restores a saved state dict into the structure of ``target``.

  Use it for pytrees with NamedTuples (optax states): ``restore_like(
  tx.init(params), ckpt.trees["opt_state"])``.
  """
  try:
    return serialization.from_state_dict(target, state)
  except (KeyError, ValueError, TypeError) as err:
    raise CheckpointError(
        f"saved state does not match the expected structure: {err}") from err
