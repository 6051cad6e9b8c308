"""``fastntk deletion``: a deletion store on disk (fastntk_jax.store).

Typical month::

  fastntk deletion init model.store --checkpoint run/model.ckpt
  echo "12 907 3301" | fastntk deletion forget model.store --ids - --request-id ticket-1
  fastntk deletion status model.store
  fastntk deletion log model.store
  fastntk deletion verify model.store
  fastntk deletion export model.store --out run/current.ckpt

Sample ids are the positions of the samples in the checkpoint's training set
as ``fastntk`` loads it (its data source, ``ipc``, classes and exclusions), or
the ``ids`` of a ``--samples`` file (``.npz`` with ``x`` uint8 images
``(N, H, W, 3)``, ``y`` labels and ``ids``, read without pickle). The store
keeps no images: each command reads them from that source and checks them
against the SHA-256 recorded per sample at ``init``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fastntk_jax.cli.common import UsageError
from fastntk_jax.cli.common import model_from_checkpoint
from fastntk_jax.cli.common import model_from_config

__all__ = ["cmd_deletion", "read_ids", "store_model", "store_samples"]


def read_ids(text: str) -> np.ndarray:
  """Ids from text: a JSON list, or integers separated by spaces, commas or
  newlines (``#`` starts a comment)."""
  body = "\n".join(line.split("#")[0] for line in text.splitlines()).strip()
  if not body:
    raise UsageError("--ids: no ids given; the request is empty.")
  try:
    vals = json.loads(body) if body.startswith("[") else [
        int(t) for t in body.replace(",", " ").split()]
  except (ValueError, json.JSONDecodeError) as err:
    raise UsageError(f"--ids: not a list of integer ids ({err}).") from None
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
    raise UsageError("--ids: every id must be an integer.")
  return np.asarray(vals, np.int64)


def _ids_arg(path: str) -> np.ndarray:
  if path == "-":
    return read_ids(sys.stdin.read())
  p = Path(path)
  if not p.is_file():
    raise UsageError(f"--ids: no file at {p}; give a file of ids or '-' for "
                     "standard input.")
  return read_ids(p.read_text())


def store_samples(desc: dict):
  """``(x, y, ids)`` of the store's data source (module docstring)."""
  d = desc["data"]
  if d["kind"] == "npz":
    path = Path(d["path"])
    if not path.is_file():
      raise UsageError(f"the store's samples file {path} is gone; pass "
                       "--samples with the file's new place.")
    with np.load(path, allow_pickle=False) as z:
      missing = {"x", "y", "ids"} - set(z.files)
      if missing:
        raise UsageError(f"--samples {path}: missing array(s) "
                         f"{sorted(missing)}; it needs x, y and ids.")
      return z["x"], z["y"].astype(np.int64), z["ids"].astype(np.int64)
  from fastntk_jax import data
  from fastntk_jax.data import splits
  ds = data.load_dataset(d["source"], "train", ipc=d.get("ipc"),
                         classes=d.get("classes"),
                         image_size=d["image_size"])
  x, y = ds.x, ds.y
  if d.get("exclude"):
    keep, _ = splits.apply_forget(splits.parse_forget(d["exclude"]), y,
                                  ds.class_names)
    x, y = x[keep], y[keep]
  return x, y.astype(np.int64), np.arange(len(y), dtype=np.int64)


def _uint8_model(apply_fn, prep):
  return lambda p, x: apply_fn(p, prep(x))


def store_model(store):
  """``apply_fn(peft, uint8 images)`` of the store's model, from the config
  and frozen variables kept in the store (the checkpoint may be gone)."""
  cfg = store.meta["description"]["checkpoint_config"]
  w_0 = store.extra("w_0")
  _, _, apply_fn, prep = model_from_config(cfg, store.extra("frozen"), w_0)
  return _uint8_model(apply_fn, prep)


def _compilation_cache(store_path) -> None:
  """Compiled programs cached in ``STORE/xla-cache``, so that a later
  ``forget`` process skips most of XLA's compile time. Only a writer turns
  it on: ``forget`` as the lock holder, ``init`` after checking that the
  folder is free for a new store (its lock is taken inside
  ``DeletionStore.init``); a ``JAX_COMPILATION_CACHE_DIR`` already set wins.
  JAX recompiles when an entry cannot be read."""
  import os
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") is not None:
    return
  jax.config.update("jax_compilation_cache_dir",
                    str(Path(store_path) / "xla-cache"))
  # Every program: a request's many small ones add up. Tracing is not
  # cached, so a process still pays that.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _open(args, readonly: bool):
  from fastntk_jax.store import DeletionStore
  return DeletionStore.open(args.store, readonly=readonly,
                            allow_other_version=getattr(
                                args, "allow_other_version", False))


def _data_desc(args, cfg, image_size: int) -> dict:
  if args.samples:
    p = Path(args.samples).resolve()
    if not p.is_file():
      raise UsageError(f"--samples: no file at {p}.")
    return {"kind": "npz", "path": str(p)}
  d = cfg["data"]
  return {"kind": "checkpoint", "source": args.data or d["source"],
          "ipc": d.get("ipc"), "classes": d.get("classes"),
          "exclude": cfg.get("exclude"), "image_size": image_size}


def _init(args) -> dict:
  from fastntk_jax.models import zoo
  from fastntk_jax.store import DeletionStore
  if args.damping <= 0:
    raise UsageError("--damping must be > 0 (requests use Cholesky factors).")
  DeletionStore.check_new_path(args.store)
  # init's warm-up request is compiled into the store's cache, so that the
  # first `forget` process finds its programs there.
  _compilation_cache(args.store)
  name, _, apply_fn, ckpt, prep = model_from_checkpoint(args.checkpoint)
  cfg = ckpt.config
  desc = {"checkpoint": str(Path(args.checkpoint).resolve()),
          "checkpoint_config": cfg,
          "data": _data_desc(args, cfg, zoo.spec(name).image_size)}
  x, y, ids = store_samples(desc)
  loss = args.loss or cfg.get("finetune", {}).get("loss", "mse")
  fn = _uint8_model(apply_fn, prep)
  extra = {"frozen": ckpt.trees["frozen"], "w_0": ckpt.trees["w_0"]}
  store = DeletionStore.init(
      args.store, fn, ckpt.trees["w_D"], (x, y), ids=ids,
      anchor=ckpt.trees["w_0"] if args.anchor == "w_0" else None,
      linearize_at=args.linearize_at, damping=args.damping, loss=loss,
      memory_budget=int(args.memory_budget * 2**30), extra=extra,
      keep_rows=args.keep_rows,
      description=desc)
  with store:
    st = store.status()
  print(f"deletion store {args.store}: {name}, {st['num_samples']} samples "
        f"(ids {int(ids.min())}..{int(ids.max())}), loss {loss}, damping "
        f"{args.damping}; prepared in {store.meta['prepare_seconds']:.1f} s.")
  return st


def _forget(args) -> dict:
  slack = args.refresh_slack
  if slack is not None and not (math.isfinite(slack) and slack >= 0):
    raise UsageError(f"--refresh-slack must be a number of seconds >= 0, got "
                     f"{slack}.")
  if slack is not None and args.no_refresh:
    raise UsageError("--refresh-slack and --no-refresh contradict each other; "
                     "give one.")
  tol = args.newton_tol
  if tol is not None and not 0 < tol < 1:
    raise UsageError(f"--newton-tol must be in (0, 1), e.g. 1e-7; got {tol}.")
  if args.compact and args.no_compact:
    raise UsageError("--compact and --no-compact contradict each other; give "
                     "one.")
  ids = _ids_arg(args.ids)
  with _open(args, readonly=False) as store:
    _compilation_cache(args.store)
    fn = store_model(store)
    x, y, sid = store_samples(store.meta["description"])
    from fastntk_jax.store import take
    x_f, y_f = take((x, y, sid), ids, name="--ids")
    r = store.forget(fn, (x_f, y_f), ids=ids, request_id=args.request_id,
                     allow_empty_class=args.allow_empty_class,
                     refresh="off" if args.no_refresh else "after",
                     refresh_slack=slack,
                     compact="off" if args.no_compact else "auto",
                     **({} if tol is None else {"newton_tol": tol}))
    if args.compact:
      c = store.compact()
      if c["status"] == "compacted":
        print(f"compacted: the rows of {c['samples_dropped']} forgotten "
              f"samples dropped ({c['seconds']:.2f} s).")
  row = r.row
  if r.status == "already_applied":
    print(f"request {r.request_id}: already applied on {row['time']} "
          f"({row['num_forget']} samples); nothing changed.")
  else:
    b, a = row["before"], row["after"]
    print(f"request {r.request_id}: forgot {row['num_forget']} samples in "
          f"{row['extra']['request_seconds']:.2f} s; ‖Δw‖ "
          f"{row['delta_norm']:.4g}; accuracy on them {100 * b['accuracy']:.1f}"
          f" % -> {100 * a['accuracy']:.1f} %, loss {b['loss']:.4g} -> "
          f"{a['loss']:.4g}; generation {row['gen_after']}.")
    if r.compact is not None and r.compact["status"] == "compacted":
      print(f"then dropped the rows of {r.compact['samples_dropped']} "
            f"forgotten samples in {r.compact['seconds']:.2f} s (generation "
            f"{r.compact['generation']}).")
    if r.refresh is not None and r.refresh["status"] == "refreshed":
      print(f"then formed the preconditioner again in "
            f"{r.refresh['seconds']:.2f} s (generation "
            f"{r.refresh['generation']}).")
  return {"status": r.status, **row, "refresh_after": r.refresh,
          "compact_after": r.compact}


def _status(args) -> dict:
  with _open(args, readonly=True) as store:
    st = store.status()
  for k in ("path", "written_by", "created", "loss", "damping",
            "num_prepared", "num_samples", "num_forgotten", "num_requests",
            "generation", "params_sha256", "bytes_on_disk"):
    print(f"{k:>16s}: {st[k]}")
  print(f"{'per class':>16s}: {st['per_class']}")
  if st["last_request"]:
    print(f"{'last request':>16s}: {st['last_request']}")
  if st["jacobian_rows_of_forgotten_samples"]:
    print(f"{'note':>16s}: the Jacobian rows of "
          f"{st['jacobian_rows_of_forgotten_samples']} forgotten samples are "
          "still held (unused); `fastntk deletion "
          "compact` drops them.")
  v = st["last_verification"]
  if v:
    print(f"{'last verify':>16s}: {v['time']}, generation {v['gen']}, "
          f"relative difference {v['result']['relative_difference']:.3g}")
  return st


def _log(args) -> dict:
  with _open(args, readonly=True) as store:
    rows = store.log()
  print("| # | request | time | samples | ‖Δw‖ | acc before → after | "
        "seconds |")
  print("|---:|---|---|---:|---:|---|---:|")
  for r in rows:
    print(f"| {r['seq']} | {r['request_id']} | {r['time']} | "
          f"{r['num_forget']} | {r['delta_norm']:.4g} | "
          f"{100 * r['before']['accuracy']:.1f} → "
          f"{100 * r['after']['accuracy']:.1f} % | "
          f"{r['extra']['request_seconds']:.2f} |")
  return {"requests": rows}


def _verify(args) -> dict:
  with _open(args, readonly=True) as store:
    fn = store_model(store)
    samples = store_samples(store.meta["description"])
    v = store.verify(fn, samples)
  fa = v.get("forget_accuracy")
  print(f"generation {v['generation']}: {v['num_forgotten']} forgotten, "
        f"{v['num_retain']} kept; from scratch vs store: relative difference "
        f"{v['relative_difference']:.3g} ({v['relative_to_update']:.3g} of "
        f"the update)" + (f"; accuracy on the forgotten samples: store "
                          f"{100 * fa['store']:.1f} %, from scratch "
                          f"{100 * fa['scratch']:.1f} %" if fa else "")
        + f"; {v['seconds']:.1f} s.")
  return v


def _compact(args) -> dict:
  with _open(args, readonly=False) as store:
    c = store.compact()
  print("nothing to compact." if c["status"] != "compacted" else
        f"dropped the rows of {c['samples_dropped']} forgotten samples "
        f"(generation {c['generation']}, {c['seconds']:.2f} s).")
  return c


def _refresh(args) -> dict:
  with _open(args, readonly=False) as store:
    r = store.refresh()
  if r["status"] == "refreshed":
    print(f"formed the preconditioner again in {r['seconds']:.2f} s "
          f"(generation {r['generation']}).")
  elif r["status"] == "kept":
    print("the new preconditioner was not positive definite in rounding; "
          "the old one is kept.")
  else:
    print("nothing to refresh (an MSE store).")
  return r


def _export(args) -> dict:
  import jax
  from fastntk_jax.io import checkpoint
  with _open(args, readonly=True) as store:
    desc = store.meta["description"]
    cfg = dict(desc["checkpoint_config"])
    cfg["deletion_store"] = {"path": str(Path(args.store).resolve()),
                             "generation": store.head,
                             "num_forgotten": int(store.forgotten_ids.size),
                             "params_sha256": store.generation[
                                 "params_sha256"]}
    trees = {"w_0": store.extra("w_0"), "w_D": jax.device_get(store.params),
             "w_trained": jax.device_get(store.trained_params),
             "frozen": store.extra("frozen")}
    checkpoint.save(args.out, trees, config=cfg, kind="peft")
  print(f"exported generation {cfg['deletion_store']['generation']} "
        f"({cfg['deletion_store']['num_forgotten']} samples forgotten) to "
        f"{args.out}")
  return cfg["deletion_store"]


_SUB = {"init": _init, "forget": _forget, "status": _status, "log": _log,
        "verify": _verify, "export": _export, "compact": _compact,
        "refresh": _refresh}


def cmd_deletion(args) -> dict[str, Any]:
  if args.deletion_command == "forget" and not args.release_memory:
    # Before JAX starts its threads (keep_freed_memory's docstring).
    from fastntk_jax.io.environment import keep_freed_memory
    keep_freed_memory()
  k = getattr(args, "host_devices", None)
  if k is not None:
    if k < 1:
      raise UsageError(f"--host-devices must be >= 1, got {k}.")
    from fastntk_jax.io.environment import request_host_devices
    try:
      request_host_devices(k)
    except RuntimeError as err:  # JAX started earlier in this process
      raise UsageError(f"--host-devices: {err}") from None
  out = _SUB[args.deletion_command](args)
  if getattr(args, "json", None):
    from fastntk_jax.io.checkpoint import atomic_write_json
    atomic_write_json(args.json, out)
  return out
