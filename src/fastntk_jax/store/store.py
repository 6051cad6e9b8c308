"""A deletion store: one folder per deployed model, requests for months.

``DeletionStore.init`` prepares the state once (:func:`fastntk_jax.core.
deletion.prepare`); every later process opens the folder and answers requests
with :func:`fastntk_jax.core.deletion.forget`. The folder holds::

  STORE/store.sqlite   the request log, the generations and the head (log.py)
  STORE/objects/       immutable, checksummed arrays and trees (objects.py)
  STORE/lock           held (flock) by the one process that may write

**A request is applied entirely or not at all.** The new parameters and the
changed state arrays are written as new object files (fsynced, renamed, the
folder fsynced); then one SQLite transaction inserts the new generation and
the request's log row and moves the head. Until that commit the head names
the old generation, whose files are untouched; after it, the new one. Files
of a generation that never committed (a killed process) or that is no longer
the head are deleted by the next writer. Arrays a request does not change
(kept Jacobian rows, the linearisation point) are not written again.

**Idempotent.** A request id is applied once: sending it again, or sending
the same ids under another id, is reported as already applied and changes
nothing. Unknown ids, ids forgotten by an earlier request, duplicates, an
empty request, one that would remove a whole class or all of D, inputs that
are not the samples prepared under those ids (per-sample SHA-256), and a
store of another format or software version are refused before any work,
with the fix.

Example::

  store = DeletionStore.init("model.store", apply_fn, w_D, (x, y), ids=ids,
                             anchor=w_0, loss="ce")
  r = store.forget(apply_fn, (x[k], y[k]), ids=ids[k], request_id="req-1")
  store.close()
  DeletionStore.open("model.store", readonly=True).status()
"""

from __future__ import annotations

import concurrent.futures
import datetime
import fcntl
import hashlib
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax.core import deletion
from fastntk_jax.core import kernels
from fastntk_jax.core import unlearn as unlearn_lib
from fastntk_jax.io.environment import environment
from fastntk_jax.store import log as db
from fastntk_jax.store.objects import CorruptObjectError
from fastntk_jax.store.objects import ObjectFiles
from fastntk_jax.store.objects import fsync_dir

__all__ = ["CorruptStoreError", "DeletionStore", "RequestResult",
           "StoreError", "StoreLockedError", "ids_key", "params_sha256",
           "refresh_due", "sample_digests", "take", "COMPACT_FRACTION"]

_NUMPY_FIELDS = ("ids", "labels", "active", "row_ids")
_SCALAR_FIELDS = ("num_samples", "num_outputs", "damping", "loss",
                  "solve_dtype", "input_shape", "input_dtype", "anchored_at",
                  "linearized_at")


class StoreError(ValueError):
  """A request or a use of the store that is refused; nothing was changed."""


class StoreLockedError(StoreError):
  """Another process is writing to the store."""


class CorruptStoreError(StoreError):
  """The store's files fail their checksums or do not fit together."""


class RequestResult(NamedTuple):
  """What :meth:`DeletionStore.forget` did.

  Attributes:
    request_id: the request's id.
    status: ``"applied"``, or ``"already_applied"`` (nothing changed).
    row: the request's log row (for ``"already_applied"``, the earlier one).
    refresh: what :meth:`DeletionStore.refresh` did right after the request
      was committed (``refresh="after"`` and the rule said it was due), or
      None.
    compact: what :meth:`DeletionStore.compact` did right after the request
      was committed (``compact="auto"`` and a quarter of the rows were
      forgotten samples'), or None.
  """
  request_id: str
  status: str
  row: dict
  refresh: dict | None = None
  compact: dict | None = None


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="milliseconds")


def sample_digests(x, y) -> np.ndarray:
  """``(N, 32)`` uint8: the SHA-256 of each sample's input bytes, shape,
  dtype and label, to check later that a request's inputs are these samples."""
  x, y = np.asarray(x), np.asarray(y)
  head = f"{x.shape[1:]}|{x.dtype.str}|".encode()
  out = np.empty((len(y), 32), np.uint8)
  for i in range(len(y)):
    h = hashlib.sha256(head)
    h.update(np.ascontiguousarray(x[i]).tobytes())
    h.update(np.int64(y[i]).tobytes())
    out[i] = np.frombuffer(h.digest(), np.uint8)
  return out


def params_sha256(params) -> str:
  """SHA-256 of a pytree's leaves (paths, dtypes, shapes and bytes)."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  for path, leaf in leaves:
    a = np.ascontiguousarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def ids_key(ids: np.ndarray) -> str:
  """The default request id: a digest of the sorted sample ids."""
  return "ids-" + hashlib.sha256(np.sort(ids).astype("<i8").tobytes()
                                 ).hexdigest()[:24]


class _Lock:
  """An exclusive ``flock`` on ``STORE/lock``, released when the process dies."""

  def __init__(self, path: Path):
    self.path = path
    self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
      os.close(self.fd)
      raise StoreLockedError(
          f"{path.parent}: another process is writing to this store "
          f"({holder or 'holder unknown'}); wait for it to finish, or use a "
          "read-only command (status, log). One writer at a time.") from None
    os.ftruncate(self.fd, 0)
    os.pwrite(self.fd, f"pid {os.getpid()} since {_now()}".encode(), 0)

  def release(self) -> None:
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None


# ------------------------------------------------------------ serialisation
def _write_state(objs: ObjectFiles, state: deletion.PreparedState,
                 previous: Mapping[str, tuple]) -> tuple[dict, dict]:
  """Writes the state's arrays; a field that is the object loaded (or last
  written) under a key is not written again. Returns ``(keys, scalars)``."""
  keys = {}
  for f in deletion.PreparedState._fields:
    if f in _SCALAR_FIELDS:
      continue
    v = getattr(state, f)
    old = previous.get(f)
    if v is None:
      keys[f] = None
    elif old is not None and old[0] is v:
      keys[f] = old[1]
    else:
      keys[f] = objs.put_tree(v) if f == "lin_params" else objs.put_array(v)
  scalars = {f: getattr(state, f) for f in _SCALAR_FIELDS}
  scalars["input_shape"] = [int(d) for d in state.input_shape]
  for f in ("num_samples", "num_outputs"):
    scalars[f] = int(scalars[f])
  scalars["damping"] = float(scalars["damping"])
  return keys, scalars


def _read_state(objs: ObjectFiles, keys: Mapping, scalars: Mapping
                ) -> tuple[deletion.PreparedState, dict]:
  vals = {}
  with kernels.dtype_scope("float64"):  # keep float64 arrays float64
    for f, k in keys.items():
      if k is None:
        vals[f] = None
      elif f == "lin_params":
        vals[f] = jax.tree_util.tree_map(jnp.asarray, objs.get_tree(k))
      elif f in _NUMPY_FIELDS:
        vals[f] = objs.get_array(k)
      else:
        vals[f] = jnp.asarray(objs.get_array(k))
  sc = dict(scalars)
  sc["input_shape"] = tuple(sc["input_shape"])
  state = deletion.PreparedState(**vals, **sc)
  return state, {f: (vals[f], keys[f]) for f in keys if keys[f] is not None}


def _tree(objs: ObjectFiles, key: str):
  return jax.tree_util.tree_map(jnp.asarray, objs.get_tree(key))


def take(samples, wanted, digests=None, name: str = "samples"):
  """``(x, y)`` of the samples with ids ``wanted``, in that order.

  Args:
    samples: ``(x, y, ids)`` holding at least every wanted id.
    wanted: int ids.
    digests: optional ``(ids_sorted, digests)`` of the prepared samples: the
      taken ones must match (:func:`sample_digests`).
  """
  x, y, sid = samples
  sid = np.asarray(sid)
  order = np.argsort(sid, kind="stable")
  pos = np.searchsorted(sid, wanted, sorter=order)
  pos = np.minimum(pos, len(sid) - 1)
  rows = order[pos]
  bad = sid[rows] != wanted
  if bad.any():
    raise StoreError(f"{name}: {int(bad.sum())} requested ids are not in the "
                     f"data given (e.g. {np.asarray(wanted)[bad][:5].tolist()}"
                     "); pass the dataset the store was prepared from.")
  xs, ys = np.asarray(x)[rows], np.asarray(y)[rows]
  if digests is not None:
    ref_ids, ref = digests
    got = sample_digests(xs, ys)
    want = ref[np.searchsorted(ref_ids, wanted)]
    diff = np.any(got != want, axis=1)
    if diff.any():
      raise StoreError(
          f"{name}: {int(diff.sum())} samples differ from those prepared "
          f"under their ids (e.g. id {int(np.asarray(wanted)[diff][0])}); "
          "pass each sample with its own id, as given to init.")
  return xs, ys


def refresh_due(iterations, step_seconds: float, refresh_seconds: float,
                slack_seconds: float | None = None) -> bool:
  """Whether a cross-entropy store should form ``M`` again now.

  ``iterations``: the solve steps of every request since ``M`` was last
  formed, the current one last. With a fresh ``M`` a request takes about
  ``min(iterations)`` steps; the steps over that are what a stale ``M`` has
  cost so far. The rule refreshes once that cost, in seconds, reaches the
  cost of a refresh: the ski-rental rule, whose total is at most twice that
  of the best schedule chosen with hindsight (when a refresh brings the
  steps back to the minimum). Steps and refreshes are both measured on this
  machine, so the rule needs no tuning.

  ``slack_seconds`` adds a latency rule: also due once the current request
  took more than that many seconds longer than a fresh ``M`` would have
  (its steps over the fewest, times ``step_seconds``). The refresh runs
  after the request's commit, so this trades refresh work, off the request
  path, for requests that stay near their fresh-``M`` time.
  """
  its = [int(i) for i in iterations]
  if not its:
    return False
  if (slack_seconds is not None
      and (its[-1] - min(its)) * float(step_seconds) > float(slack_seconds)):
    return True
  if not math.isfinite(float(refresh_seconds)):
    return False
  excess = sum(i - min(its) for i in its)
  return excess * float(step_seconds) >= float(refresh_seconds)


def _time_refresh(state: deletion.PreparedState) -> float | None:
  """Seconds a refresh of ``state``'s ``M`` would take (``"ce"``), from a
  timed refresh over up to 1,000 samples scaled to all (the work is linear
  in the samples); None for ``"mse"``."""
  if state.loss != "ce":
    return None
  n = int(state.num_samples)
  rows = np.arange(min(n, 1000))
  deletion.refresh_preconditioner(state, rows)  # compiles
  t = time.perf_counter()
  jax.block_until_ready(deletion.refresh_preconditioner(state, rows).chol)
  return (time.perf_counter() - t) * n / len(rows)


#: The share of a state's rows held for forgotten samples at which
#: ``forget(compact="auto")`` drops them: every cross-entropy solve step reads
#: all rows, so at a quarter a step does a third more work than it needs,
#: while a compaction costs about one pass and a rewrite of the rows (an MSE
#: state with ``keep_rows`` reads only a request's rows; there compaction
#: frees memory and disk, on the same rule).
COMPACT_FRACTION = 0.25


def _compact_due(state) -> bool:
  """Whether ``forget(compact="auto")`` compacts ``state`` now."""
  if state.jacobian is None or state.active is None:
    return False
  return float(np.mean(~np.asarray(state.active))) >= COMPACT_FRACTION


def _check_after(refresh, slack, compact, forget_kw) -> float | None:
  """:meth:`DeletionStore.forget`'s ``refresh``, ``refresh_slack`` and
  ``compact`` checked together; the slack as a float."""
  if compact not in ("auto", "off"):
    raise ValueError(f"compact must be 'auto' or 'off', got {compact!r}.")
  if refresh not in ("after", "off"):
    raise ValueError(f"refresh must be 'after' or 'off', got {refresh!r}.")
  if slack is None:
    return None
  if not (isinstance(slack, numbers.Real) and not isinstance(slack, bool)
          and math.isfinite(slack) and slack >= 0):
    raise ValueError("refresh_slack must be a finite number of seconds >= 0 "
                     f"or None, got {slack!r}.")
  if refresh == "off" or "refresh_steps" in forget_kw:
    raise ValueError("refresh_slack is a rule for refresh='after'; it cannot "
                     "apply with refresh='off' or refresh_steps. Give one of "
                     "them.")
  return float(slack)


def _warm_up(state, apply_fn, params, x, y, ids, forget_kw) -> float | None:
  """Seconds of a one-sample request run and discarded right after
  ``prepare``: it compiles the request path (on CPU, every request's Gram
  pass; a cross-entropy request's bucket of up to 16 samples, and one
  Newton-CG step, the solve's fallback), so that the
  first real request after ``init`` does not pay for it, nor, through the
  CLI's compilation cache, later processes. None with a single sample, or
  when the request fails (a warning says why; the store is still written,
  and a real request would report the same failure)."""
  if len(ids) < 2:
    return None
  t = time.perf_counter()
  try:
    res = deletion.forget(state, apply_fn, params, (x[:1], y[:1]),
                          ids=np.asarray(ids[:1]), **forget_kw)
  except (unlearn_lib.UnlearningError, ValueError) as err:
    warnings.warn(f"init: the warm-up request (one sample, discarded) "
                  f"failed, so the first request will compile: {err}",
                  RuntimeWarning, stacklevel=3)
    return None
  _request_metrics(apply_fn, res.params, x[:1], y[:1], state.loss)
  deletion.warm_up_newton_cg(state)  # a request's fallback, compiled too
  return time.perf_counter() - t


#: Samples per block of the request metrics' forward pass (one compiled
#: shape for every request size).
_METRICS_BLOCK = 32


def _request_metrics(apply_fn, params, x, y, loss: str) -> dict:
  """Accuracy and mean loss on a request (``"mse"``: ½‖f − onehot‖²)."""
  z = np.asarray(kernels.predict(apply_fn, params, x, block_size=_METRICS_BLOCK,
                                 stable_shape=True), np.float64)
  y = np.asarray(y)
  acc = float(np.mean(np.argmax(z, -1) == y))
  if loss == "ce":
    m = z.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(z - m).sum(-1)))
    value = float(np.mean(lse - z[np.arange(len(y)), y]))
  else:
    value = float(np.mean(0.5 * np.sum((z - np.eye(z.shape[1])[y]) ** 2, -1)))
  return {"accuracy": acc, "loss": value}


def _check_ids(name: str, ids) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.size == 0:
    raise StoreError(f"{name}: expected a non-empty 1-D list of sample ids, "
                     f"got shape {ids.shape}.")
  if not np.issubdtype(ids.dtype, np.integer):
    raise StoreError(f"{name}: ids must be integers, got dtype {ids.dtype}.")
  uniq, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise StoreError(f"{name}: ids repeat (e.g. {uniq[counts > 1][:5].tolist()}"
                     "); list each sample once.")
  return ids.astype(np.int64)


def _ids_sha(ids: np.ndarray) -> str:
  return hashlib.sha256(np.sort(ids).astype("<i8").tobytes()).hexdigest()


def _check_request_id(request_id) -> str:
  if not isinstance(request_id, str) or not request_id.strip() or len(
      request_id) > 200:
    raise StoreError(f"request_id must be a non-empty string of at most 200 "
                     f"characters, got {request_id!r}.")
  return request_id


class DeletionStore:
  """A deletion store folder (module docstring). Use :meth:`init` or
  :meth:`open`; close it (or use ``with``) to release the writer's lock."""

  def __init__(self, root: Path, con, lock: _Lock | None):
    self.root, self.con, self._lock = root, con, lock
    self.objects = ObjectFiles(root / "objects")
    self.meta = db.meta(con)

  # ------------------------------------------------------------- opening
  @staticmethod
  def check_new_path(path) -> Path:
    """``path`` as a :class:`~pathlib.Path` if :meth:`init` may write a store
    there: a folder that does not exist, or is empty, or holds only what an
    unfinished ``init`` leaves (and the CLI's ``xla-cache``); else
    :class:`StoreError`."""
    root = Path(path)
    if (root / "store.sqlite").exists():
      raise StoreError(f"path: {root} already holds a deletion store; open it "
                       "(fastntk deletion status) or choose another folder.")
    if root.exists() and not root.is_dir():
      raise StoreError(f"path: {root} is a file; choose a new folder for the "
                       "store.")
    # What an init that did not finish leaves may be there.
    if root.exists() and any(p.name not in ("objects", "lock",
                                            "store.sqlite.new", "xla-cache")
                             for p in root.iterdir()):
      raise StoreError(f"path: {root} exists and is not empty; choose a new "
                       "folder for the store.")
    return root

  @classmethod
  def init(cls, path, apply_fn: Callable, params, data, *, ids, anchor=None,
           extra: Mapping[str, Any] | None = None,
           description: Mapping[str, Any] | None = None,
           **prepare_kw) -> "DeletionStore":
    """Prepares the state over ``data`` and writes a new store at ``path``.

    Args:
      path: a folder that does not exist, or is empty (or left by an ``init``
        that did not finish).
      apply_fn, params, data, anchor, prepare_kw: as in
        :func:`fastntk_jax.core.deletion.prepare` (``memory_budget`` there
        refuses a state that would not fit, before any work).
      ids: a unique integer id per sample of ``data``.
      extra: named pytrees kept with the store (e.g. the frozen variables and
        ``w_0`` a checkpoint needs); :meth:`extra` returns them.
      description: JSON kept in ``meta`` (e.g. the checkpoint's config and
        where the data comes from).
    """
    root = cls.check_new_path(path)
    x, y = data
    ids = _check_ids("ids", ids)
    if len(ids) != len(np.asarray(y)):
      raise StoreError(f"ids: {len(ids)} ids for {len(np.asarray(y))} samples;"
                       " give one id per sample.")
    root.mkdir(parents=True, exist_ok=True)
    lock = _Lock(root / "lock")
    try:
      return cls._create(root, lock, apply_fn, params, (x, y), ids, anchor,
                         dict(extra or {}), dict(description or {}),
                         prepare_kw)
    except BaseException:
      lock.release()
      raise

  @classmethod
  def _create(cls, root, lock, apply_fn, params, data, ids, anchor, extra,
              description, prepare_kw):
    objs = ObjectFiles(root / "objects")
    objs.remove_except(())  # what a killed init left
    t0 = time.perf_counter()
    state = deletion.prepare(apply_fn, params, data, anchor=anchor, ids=ids,
                             **prepare_kw)
    seconds = time.perf_counter() - t0
    refresh_estimate = _time_refresh(state)
    order = np.argsort(ids)
    x, y = np.asarray(data[0]), np.asarray(data[1])
    keys, scalars = _write_state(objs, state, {})
    # The warm-up runs on the state as every later process reads it (on
    # several devices, prepare's arrays are sharded; read back, they are on
    # one), so that it compiles the programs those requests run.
    del state
    state, previous = _read_state(objs, keys, scalars)
    warm_up = _warm_up(state, apply_fn, params, x, y, ids,
                       {k: prepare_kw[k] for k in ("block_size", "mesh")
                        if k in prepare_kw})
    fixed = {"trained": objs.put_tree(params),
             "sample_ids": objs.put_array(ids[order]),
             "digests": objs.put_array(sample_digests(x[order], y[order])),
             "sample_labels": objs.put_array(y[order].astype(np.int64)),
             "anchor": None if anchor is None else objs.put_tree(anchor),
             "extra": {k: objs.put_tree(v) for k, v in extra.items()}}
    gen0 = {"created": _now(), "num_samples": int(len(ids)),
            "params_sha256": params_sha256(params),
            "objects": {"params": fixed["trained"], "state": keys,
                        "scalars": scalars, "fixed": fixed}}
    env = environment()
    meta = {"created": gen0["created"],
            "fastntk_jax": env["versions"]["fastntk_jax"], "environment": env,
            "prepare": {k: v for k, v in prepare_kw.items()
                        if isinstance(v, (int, float, str, bool, type(None)))},
            "prepare_seconds": seconds, "description": description,
            "refresh_seconds_estimate": refresh_estimate,
            "warm_up_seconds": warm_up}
    db.create(root / "store.sqlite", meta, gen0)
    fsync_dir(root)
    # The state just read back is the head's: not read a second time.
    return cls._load(root, db.connect(root / "store.sqlite"), lock,
                     read=(state, previous))

  @classmethod
  def open(cls, path, *, readonly: bool = False,
           allow_other_version: bool = False) -> "DeletionStore":
    """Opens a store. ``readonly`` takes no lock and writes nothing (status,
    log, verify); otherwise this process becomes the one writer.

    A store written by another fastntk_jax version is refused unless
    ``allow_other_version`` (the numerics of a request could differ from
    those of the requests before it); a newer store format always is.
    """
    root = Path(path)
    if not (root / "store.sqlite").is_file():
      raise StoreError(f"path: no deletion store at {root}; create one with "
                       "`fastntk deletion init` (DeletionStore.init).")
    lock = None if readonly else _Lock(root / "lock")
    try:
      con = db.connect(root / "store.sqlite", readonly=readonly)
      meta = db.meta(con)
      _check_format(root, meta, allow_other_version)
      store = cls._load(root, con, lock)
      if lock is not None:  # files of uncommitted or old generations
        store.objects.remove_except(store._live_keys())
      return store
    except BaseException:
      if lock is not None:
        lock.release()
      raise

  @classmethod
  def _load(cls, root, con, lock, read=None) -> "DeletionStore":
    """``read``: the head generation's ``(state, previous)`` from
    :func:`_read_state`, when the caller has just read it (``init``)."""
    store = cls(root, con, lock)
    for attempt in range(3):
      store.head = db.head(con)
      store.generation = db.generation(con, store.head)
      try:
        store._read_generation(read)
        return store
      except CorruptObjectError as err:
        # A writer may have moved on and removed this generation's files
        # while a read-only reader was reading them: read the new head.
        if lock is not None or db.head(con) == store.head or attempt == 2:
          raise CorruptStoreError(str(err)) from None
    raise AssertionError("unreachable")

  def _read_generation(self, read=None) -> None:
    o, objs = self.generation["objects"], self.objects
    fixed = o["fixed"]
    self.state, self._previous = (read if read is not None else _read_state(
        objs, o["state"], o["scalars"]))
    self.params = _tree(objs, o["params"])
    self.trained_params = _tree(objs, fixed["trained"])
    self.anchor = None if fixed["anchor"] is None else _tree(
        objs, fixed["anchor"])
    self.sample_ids = objs.get_array(fixed["sample_ids"])
    self.sample_labels = objs.get_array(fixed["sample_labels"])
    self.digests = objs.get_array(fixed["digests"])
    if params_sha256(self.params) != self.generation["params_sha256"]:
      raise CorruptStoreError(
          f"{self.root}: the parameters of generation {self.head} do not "
          "match their recorded SHA-256; restore the store from a backup.")
    if self.state.ids is None or len(self.state.ids) != self.state.num_samples:
      raise CorruptStoreError(f"{self.root}: the state's ids and sample count "
                              "disagree; restore the store from a backup.")

  def _live_keys(self) -> set[str]:
    o = self.generation["objects"]
    keys = {o["params"], *[k for k in o["state"].values() if k]}
    fixed = o["fixed"]
    keys |= {v for k, v in fixed.items() if k != "extra" and v}
    return keys | set(fixed["extra"].values())

  def extra(self, name: str):
    """A pytree given to :meth:`init` as ``extra[name]``."""
    keys = self.generation["objects"]["fixed"]["extra"]
    if name not in keys:
      raise StoreError(f"extra: the store has no {name!r}; it has "
                       f"{sorted(keys)}.")
    return self.objects.get_tree(keys[name])

  @property
  def forgotten_ids(self) -> np.ndarray:
    return np.setdiff1d(self.sample_ids, self.state.ids, assume_unique=True)

  def close(self) -> None:
    self.con.close()
    if self._lock is not None:
      self._lock.release()
      self._lock = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


  # ------------------------------------------------------------ requests
  def forget(self, apply_fn: Callable, forget_set, *, ids,
             request_id: str | None = None, allow_empty_class: bool = False,
             refresh: str = "after", refresh_slack: float | None = None,
             compact: str = "auto", **forget_kw) -> RequestResult:
    """Applies one deletion request, entirely or not at all.

    Args:
      apply_fn: the ``apply_fn`` the store was prepared with.
      forget_set: ``(x_f, y_f)``, the samples with ids ``ids``, in that order
        (checked against their SHA-256 from ``init``).
      ids: the samples' ids.
      request_id: the request's name in the log (default: a digest of the
        sorted ids). A request id already in the log with the same ids, or
        the same ids under any id, returns ``status="already_applied"`` and
        changes nothing.
      allow_empty_class: allow a request that removes the last samples of a
        class (refused by default: it is usually a wrong id list).
      refresh: cross-entropy stores. ``"after"`` (default): when the rule
        says the preconditioner ``M`` is due to be formed again
        (:func:`refresh_due`), :meth:`refresh` runs right after the request
        is committed, as its own generation: the request is durable, and
        its answer final, before that work starts (a kill during it loses
        only the refresh, which the next request then finds due).
        ``"off"``: never here; call :meth:`refresh` (``fastntk deletion
        refresh``) at a quiet time. The parameters are the same either way.
      refresh_slack: cross-entropy stores: seconds a stale ``M`` may add to
        a request before a refresh is due regardless of the cost rule
        (:func:`refresh_due`'s latency rule; default None: cost rule only).
        Needs ``refresh="after"``; an MSE store has nothing to refresh and
        ignores it.
      compact: stores that keep rows (cross-entropy; MSE with
        ``keep_rows``). ``"auto"`` (default): once forgotten samples hold
        :data:`COMPACT_FRACTION` of the rows, :meth:`compact` drops them
        right after the
        request is committed (before a due refresh, which then reads fewer
        rows), as its own generation. ``"off"``: only on demand.
      forget_kw: passed to :func:`fastntk_jax.core.deletion.forget`.

    Raises:
      StoreError: a refused request (nothing changed).
    """
    if self._lock is None:
      raise StoreError("this store was opened read-only; open it with "
                       "readonly=False to apply requests.")
    refresh_slack = _check_after(refresh, refresh_slack, compact, forget_kw)
    ids = _check_ids("ids", ids)
    rid = ids_key(ids) if request_id is None else _check_request_id(
        request_id)
    done = self._already_applied(rid, ids)
    if done is not None:
      return RequestResult(done["request_id"], "already_applied", done)
    self._check_applicable(ids, allow_empty_class)
    x_f, y_f = take((forget_set[0], forget_set[1], ids), ids,
                    (self.sample_ids, self.digests), name="forget_set")
    t0 = time.perf_counter()
    loss = self.state.loss
    before = _request_metrics(apply_fn, self.params, x_f, y_f, loss)
    # A long-lived cross-entropy store forms M again when the steps it has
    # cost since the last refresh would have paid for one (refresh_due),
    # unless the caller sets deletion.forget's own refresh_steps rule.
    own_rule = loss == "ce" and "refresh_steps" not in forget_kw
    res = deletion.forget(self.state, apply_fn, self.params, (x_f, y_f),
                          ids=ids, **forget_kw)
    rule = (self._refresh_rule(res, refresh_slack)
            if own_rule and res.solve is not None else None)
    # The new files are written (and fsynced) while the request's "after"
    # metrics run; nothing is visible until _commit's SQLite row, and files
    # no generation names are removed when the store next opens.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      written = pool.submit(self._write_objects, res)
      after = _request_metrics(apply_fn, res.params, x_f, y_f, loss)
      written = written.result()
    row = self._commit(rid, ids, res, before, after, t0, written, rule,
                       forget_kw.get("newton_tol"))
    # After the commit, each its own generation: compaction, then a refresh.
    packed = (self.compact() if compact == "auto"
              and _compact_due(self.state) else None)
    done = (self.refresh() if rule is not None and rule["due"]
            and refresh == "after" else None)
    return RequestResult(rid, "applied", row, done, packed)

  def _refresh_rule(self, res, slack) -> dict:
    """The refresh rule's inputs and verdict after a solve (:func:`refresh_due`)."""
    its = self._iterations_since_refresh() + [int(res.solve.iterations)]
    # Seconds a step, an upper bound (the request's fixed work is in it):
    # refreshes come a little early rather than late.
    step = res.seconds / max(int(res.solve.iterations), 1)
    cost = self._refresh_cost()
    return {"iterations_since": its, "step_seconds": step,
            "refresh_seconds_estimate": cost, "slack_seconds": slack,
            "due": refresh_due(its, step, cost, slack)}

  def refresh(self) -> dict:
    """Forms the cross-entropy preconditioner ``M`` again at the current
    solution (:func:`fastntk_jax.core.deletion.refresh_preconditioner`, about
    ``N·C·P²`` flops) as a new generation, logged in ``events`` with its
    seconds. Later requests converge in fewer steps; the parameters and the
    answers do not change. A no-op for MSE stores."""
    if self._lock is None:
      raise StoreError("this store was opened read-only; open it with "
                       "readonly=False to refresh it.")
    if self.state.loss != "ce":
      return {"status": "nothing_to_refresh"}
    t0 = time.perf_counter()
    new = deletion.refresh_preconditioner(self.state)
    jax.block_until_ready(new.chol)
    sec = time.perf_counter() - t0
    if new is self.state:  # M + λI not positive definite in rounding: kept
      return {"status": "kept", "seconds": sec}
    t = time.perf_counter()
    return {"status": "refreshed", **self._commit_state(
        "refresh", new, lambda: {"seconds": sec,
                                 "write_seconds": time.perf_counter() - t})}

  def _last_refresh(self) -> dict | None:
    """The newest ``refresh`` event, or None."""
    for e in reversed(db.events(self.con)):
      if e["kind"] == "refresh":
        return e
    return None

  def _iterations_since_refresh(self) -> list[int]:
    """Solve steps of the requests since M was last formed (init or a
    refresh), oldest first."""
    last = self._last_refresh()
    its = []
    for r in db.latest_requests(self.con):
      if last is not None and r["gen_after"] <= last["gen_before"]:
        break
      extra = r.get("extra") or {}
      # Stores before refresh events refreshed inside the request.
      if (extra.get("refresh") or {}).get("seconds") is not None:
        break
      solve = extra.get("solve") or {}
      if "iterations" in solve:
        its.append(int(solve["iterations"]))
    return its[::-1]

  def _refresh_cost(self) -> float:
    """Seconds a refresh takes: the last one measured, else init's estimate,
    else (a store from before the estimate was kept) one timed now on up to
    1,000 samples, once per process."""
    last = self._last_refresh()
    if last is not None:
      return float(last["detail"]["seconds"])
    for r in db.latest_requests(self.con):
      sec = ((r.get("extra") or {}).get("refresh") or {}).get("seconds")
      if sec is not None:
        return float(sec)
    if "refresh_seconds_estimate" not in self.meta:
      self.meta["refresh_seconds_estimate"] = _time_refresh(self.state)
    est = self.meta["refresh_seconds_estimate"]
    return float("inf") if est is None else float(est)

  def _write_objects(self, res) -> dict:
    """The request's new immutable files: state, parameters, their digest."""
    t = time.perf_counter()
    keys, scalars = _write_state(self.objects, res.state, self._previous)
    pkey = self.objects.put_tree(res.params)
    return {"keys": keys, "scalars": scalars, "params": pkey,
            "params_sha256": params_sha256(res.params),
            "seconds": time.perf_counter() - t}

  def _already_applied(self, rid: str, ids: np.ndarray) -> dict | None:
    prev = db.find_request(self.con, rid)
    sha = _ids_sha(ids)
    if prev is not None:
      if prev["ids_sha256"] == sha:
        return prev
      raise StoreError(
          f"request_id {rid!r} was applied on {prev['time']} to other ids "
          f"({prev['num_forget']} samples); a request id names one request. "
          "Send this one under a new id.")
    return db.find_request_by_ids(self.con, sha)

  def _check_applicable(self, ids: np.ndarray, allow_empty_class: bool):
    unknown = np.setdiff1d(ids, self.sample_ids)
    if unknown.size:
      raise StoreError(f"ids: {unknown.size} ids were never in this store's "
                       f"training set (e.g. {unknown[:5].tolist()}); check "
                       "the id list.")
    gone = np.intersect1d(ids, self.forgotten_ids)
    if gone.size:
      by = sorted({r["request_id"] for r in db.requests(self.con)
                   if np.intersect1d(r["ids"], gone).size})
      raise StoreError(
          f"ids: {gone.size} of these samples were already forgotten, by "
          f"request(s) {by[:5]} (e.g. id {int(gone[0])}); send only the ids "
          "not yet forgotten.")
    if ids.size >= self.state.num_samples:
      raise StoreError(f"ids: the request would forget all {ids.size} samples "
                       "left; at least one must remain. To forget everything, "
                       "go back to the pretrained model w_0.")
    labels = self.sample_labels[np.searchsorted(self.sample_ids,
                                                self.state.ids)]
    left = np.setdiff1d(self.state.ids, ids, assume_unique=True)
    left_labels = self.sample_labels[np.searchsorted(self.sample_ids, left)]
    emptied = sorted(set(labels.tolist()) - set(left_labels.tolist()))
    if emptied and not allow_empty_class:
      raise StoreError(
          f"ids: the request would remove every remaining sample of class(es) "
          f"{emptied}; if that is intended, pass allow_empty_class=True "
          "(--allow-empty-class).")

  def _commit(self, rid, ids, res, before, after, t0, written,
              refresh=None, newton_tol=None) -> dict:
    keys, scalars, pkey = (written["keys"], written["scalars"],
                           written["params"])
    sha_before = self.generation["params_sha256"]
    sha_after = written["params_sha256"]
    new_gen = {"created": _now(), "num_samples": int(res.state.num_samples),
               "params_sha256": sha_after,
               "objects": {**self.generation["objects"], "params": pkey,
                           "state": keys, "scalars": scalars}}
    solve = None if res.solve is None else {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v))
        for k, v in res.solve._asdict().items()}
    if solve is not None:  # the tolerance asked for (None: the default)
      solve["newton_tol"] = None if newton_tol is None else float(newton_tol)
    row = {"request_id": rid, "time": new_gen["created"],
           "ids": sorted(int(i) for i in ids), "ids_sha256": _ids_sha(ids),
           "num_forget": int(res.num_forget),
           "delta_norm": float(res.delta_norm),
           "relative_residual": float(res.relative_residual),
           "forget_residual_norm": float(res.forget_residual_norm),
           "seconds": float(res.seconds), "before": before, "after": after,
           "params_sha256_before": sha_before,
           "params_sha256_after": sha_after, "gen_before": self.head,
           "gen_after": self.head + 1,
           "versions": {**environment()["versions"],
                        "store_written_by": self.meta.get("fastntk_jax")},
           "extra": {"solve": solve,
                     "write_seconds": written["seconds"],
                     "refresh": refresh,
                     "request_seconds": time.perf_counter() - t0}}
    db.commit_request(self.con, row, new_gen)
    # Visible from here on; the old generation's changed files are removed.
    self.params = res.params
    self._advance(res.state, keys)
    return db.find_request(self.con, rid)

  def _advance(self, state, keys) -> None:
    """After a commit: the new head in memory, and the files it no longer
    names deleted."""
    self.head, self.generation = self.head + 1, db.generation(
        self.con, self.head + 1)
    self.state = state
    self._previous = {f: (getattr(state, f), k) for f, k in keys.items()
                      if k is not None}
    self.objects.remove_except(self._live_keys())

  def compact(self) -> dict:
    """Drops the rows of forgotten samples from a state that keeps rows
    (cross-entropy, or MSE prepared with ``keep_rows``;
    :func:`fastntk_jax.core.deletion.compact`) as a new generation, logged
    in ``events``; the old rows' files are then deleted. Then compiles the
    request for the new number of rows (:func:`fastntk_jax.core.deletion.
    warm_up`, ``warm_up_seconds``), so the next request does not. A no-op
    for MSE stores without rows and when nothing is held."""
    if self._lock is None:
      raise StoreError("this store was opened read-only; open it with "
                       "readonly=False to compact it.")
    held = 0 if self.state.active is None else int(np.sum(~self.state.active))
    t0 = time.perf_counter()
    new = deletion.compact(self.state)
    if new is self.state:
      return {"status": "nothing_to_compact", "rows_dropped": 0}
    out = {"status": "compacted", **self._commit_state(
        "compact", new, lambda: {"samples_dropped": held,
                                 "seconds": time.perf_counter() - t0})}
    # N changed: compile the solve for it now rather than in the next
    # request (a one-sample request on the new state, discarded).
    out["warm_up_seconds"] = deletion.warm_up(self.state, self.params)
    return out

  def _commit_state(self, kind: str, new: deletion.PreparedState,
                    detail: Callable[[], dict]) -> dict:
    """``new`` (same parameters) as the next generation: its files, then
    the ``events`` row (``detail()``, called once the files are written)
    and the new head in one transaction. Returns the detail and the
    generation."""
    keys, scalars = _write_state(self.objects, new, self._previous)
    gen = {"created": _now(), "num_samples": int(new.num_samples),
           "params_sha256": self.generation["params_sha256"],
           "objects": {**self.generation["objects"], "state": keys,
                       "scalars": scalars}}
    info = detail()
    db.commit_event(self.con, kind, self.head, gen, info)
    self._advance(new, keys)
    return {**info, "generation": self.head}

  # ------------------------------------------------------------- reading
  def log(self) -> list[dict]:
    """Every applied request, oldest first (the log's rows)."""
    return db.requests(self.con)

  def status(self) -> dict:
    """The store at a glance: sizes, counts, the last request and audit."""
    st = self.state
    labels = self.sample_labels[np.searchsorted(self.sample_ids, st.ids)]
    reqs = db.requests(self.con)
    ver = db.verifications(self.con)
    held = 0 if st.active is None else int(np.sum(~st.active))
    size = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
    return {
        "path": str(self.root), "format": self.meta.get("version"),
        "written_by": self.meta.get("fastntk_jax"),
        "created": self.meta.get("created"), "loss": st.loss,
        "damping": st.damping, "solve_dtype": st.solve_dtype,
        "linearized_at": st.linearized_at, "anchored_at": st.anchored_at,
        "num_prepared": int(len(self.sample_ids)),
        "num_samples": int(st.num_samples),
        "num_forgotten": int(len(self.sample_ids) - st.num_samples),
        "per_class": {int(c): int(n) for c, n in zip(
            *np.unique(labels, return_counts=True))},
        "num_requests": len(reqs), "generation": self.head,
        "params_sha256": self.generation["params_sha256"],
        "last_request": None if not reqs else {
            k: reqs[-1][k] for k in ("request_id", "time", "num_forget")},
        "last_verification": None if not ver else ver[-1],
        "jacobian_rows_of_forgotten_samples": held,
        "bytes_on_disk": int(size)}

  # ---------------------------------------------------------------- audit
  def verify(self, apply_fn: Callable, samples, *, record: bool = True,
             **unlearn_kw) -> dict:
    """Recomputes the current model from scratch and compares (the audit).

    ``unlearn(w_trained, D_r, D_f)`` with the store's settings, ``D_r`` the
    samples still in the store and ``D_f`` every forgotten one, against the
    store's parameters: the relative difference ``‖w_store − w_scratch‖ /
    ‖w_scratch‖``, the same relative to the update ``‖w_scratch − w_D‖``,
    and the accuracy of both on the forgotten samples and on ``D_r``.

    Args:
      apply_fn: the ``apply_fn`` the store was prepared with.
      samples: ``(x, y, ids)`` holding at least every prepared sample
        (checked against their SHA-256).
      record: append the result to the store's verification log.
      unlearn_kw: passed to :func:`fastntk_jax.core.unlearn.unlearn`.
    """
    t0 = time.perf_counter()
    st = self.state
    kept, gone = st.ids, self.forgotten_ids
    dig = (self.sample_ids, self.digests)
    x_r, y_r = take(samples, kept, dig, name="samples")
    if gone.size:
      x_f, y_f = take(samples, gone, dig, name="samples")
      res = unlearn_lib.unlearn(
          apply_fn, self.trained_params, (x_r, y_r), (x_f, y_f),
          anchor=self.anchor if st.anchored_at == "w_0" else None,
          linearize_at=st.linearized_at, damping=st.damping, loss=st.loss,
          **unlearn_kw)
      scratch = res.params
    else:
      scratch = self.trained_params
    flat = lambda t: np.asarray(ravel_pytree(t)[0], np.float64)
    ws, wx, wd = flat(self.params), flat(scratch), flat(self.trained_params)
    diff = float(np.linalg.norm(ws - wx))
    out = {
        "generation": self.head, "num_retain": int(kept.size),
        "num_forgotten": int(gone.size),
        "relative_difference": diff / max(float(np.linalg.norm(wx)), 1e-30),
        "relative_to_update": (diff / float(np.linalg.norm(wx - wd))
                               if gone.size else 0.0),
        "retain_accuracy": {
            "store": _request_metrics(apply_fn, self.params, x_r, y_r,
                                      st.loss)["accuracy"],
            "scratch": _request_metrics(apply_fn, scratch, x_r, y_r,
                                        st.loss)["accuracy"]},
        "seconds": None}
    if gone.size:
      out["forget_accuracy"] = {
          k: _request_metrics(apply_fn, p, x_f, y_f, st.loss)["accuracy"]
          for k, p in (("store", self.params), ("scratch", scratch),
                       ("trained", self.trained_params))}
    out["seconds"] = time.perf_counter() - t0
    if record:
      con = db.connect(self.root / "store.sqlite")
      try:
        db.record_verification(con, self.head, out, environment()["versions"],
                               _now())
      finally:
        con.close()
    return out

  def verifications(self) -> list[dict]:
    return db.verifications(self.con)

def _check_format(root: Path, meta: Mapping, allow_other_version: bool):
  __version__ = environment()["versions"]["fastntk_jax"]
  if meta.get("format") != db.FORMAT:
    raise CorruptStoreError(f"{root}: store.sqlite is not a fastntk_jax "
                            "deletion store.")
  if int(meta.get("version", -1)) != db.VERSION:
    raise StoreError(
        f"{root}: store format {meta.get('version')}, but this fastntk_jax "
        f"({__version__}) reads format {db.VERSION}. Install fastntk_jax=="
        f"{meta.get('fastntk_jax')} to use it, or export the model with that "
        "version and init a new store.")
  if meta.get("fastntk_jax") != __version__ and not allow_other_version:
    raise StoreError(
        f"{root}: written by fastntk_jax {meta.get('fastntk_jax')}, this is "
        f"{__version__}. Install fastntk_jax=={meta.get('fastntk_jax')}, or "
        "pass allow_other_version=True (--allow-other-version) to go on "
        "(it is recorded in each request's log row).")
