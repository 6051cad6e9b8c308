"""The store's SQLite database: the request log, the generations, the head.

Tables (``store.sqlite``):

* ``meta(key, value)`` — the store's format version and its description
  (JSON values), written once by ``init``;
* ``generations(gen, created, objects, num_samples, params_sha256)`` — every
  state the store has held; ``objects`` is the JSON map from state field to
  object key (:mod:`fastntk_jax.store.objects`);
* ``head(gen)`` — one row, the current generation;
* ``requests(...)`` — one row per applied request: its id, time, sample ids
  and their digest, ‖Δw‖, residuals, accuracy and loss on the request before
  and after, the parameters' SHA-256 before and after, the generations, the
  software versions;
* ``verifications(...)`` — one row per ``verify``;
* ``events(...)`` — state changes that are not requests (``compact``).

``requests``, ``verifications`` and ``events`` are append-only: triggers refuse UPDATE
and DELETE. A request's generation, its log row and the new head are one
transaction (:func:`commit_request`), so they become visible together or not
at all. The database runs with ``synchronous=FULL`` in rollback-journal mode,
so a committed request survives a crash or a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path
from collections.abc import Iterator
from typing import Any

__all__ = ["FORMAT", "VERSION", "connect", "commit_request", "create",
           "commit_event", "events", "find_request", "find_request_by_ids",
           "generation", "head", "latest_requests", "meta",
           "record_verification", "requests", "verifications"]

FORMAT = "fastntk_jax.store"
VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE generations (
  gen INTEGER PRIMARY KEY, created TEXT NOT NULL, objects TEXT NOT NULL,
  num_samples INTEGER NOT NULL, params_sha256 TEXT NOT NULL);
CREATE TABLE head (one INTEGER PRIMARY KEY CHECK (one = 0),
  gen INTEGER NOT NULL REFERENCES generations(gen));
CREATE TABLE requests (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  request_id TEXT NOT NULL UNIQUE,
  time TEXT NOT NULL,
  ids TEXT NOT NULL,
  ids_sha256 TEXT NOT NULL,
  num_forget INTEGER NOT NULL,
  delta_norm REAL, relative_residual REAL, forget_residual_norm REAL,
  seconds REAL,
  before TEXT NOT NULL, after TEXT NOT NULL,
  params_sha256_before TEXT NOT NULL, params_sha256_after TEXT NOT NULL,
  gen_before INTEGER NOT NULL, gen_after INTEGER NOT NULL,
  versions TEXT NOT NULL, extra TEXT NOT NULL);
CREATE TABLE verifications (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
  gen INTEGER NOT NULL, result TEXT NOT NULL, versions TEXT NOT NULL);
CREATE TABLE events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
  kind TEXT NOT NULL, gen_before INTEGER NOT NULL, gen_after INTEGER NOT NULL,
  detail TEXT NOT NULL);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
  BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
  BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER requests_no_update BEFORE UPDATE ON requests
  BEGIN SELECT RAISE(ABORT, 'the request log is append-only'); END;
CREATE TRIGGER requests_no_delete BEFORE DELETE ON requests
  BEGIN SELECT RAISE(ABORT, 'the request log is append-only'); END;
CREATE TRIGGER verifications_no_update BEFORE UPDATE ON verifications
  BEGIN SELECT RAISE(ABORT, 'the verification log is append-only'); END;
CREATE TRIGGER verifications_no_delete BEFORE DELETE ON verifications
  BEGIN SELECT RAISE(ABORT, 'the verification log is append-only'); END;
"""

_REQUEST_COLUMNS = ("request_id", "time", "ids", "ids_sha256", "num_forget",
                    "delta_norm", "relative_residual", "forget_residual_norm",
                    "seconds", "before", "after", "params_sha256_before",
                    "params_sha256_after", "gen_before", "gen_after",
                    "versions", "extra")
_JSON_COLUMNS = ("ids", "before", "after", "versions", "extra", "objects",
                 "result", "detail")


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
  """Opens the database; ``readonly`` refuses every statement that writes.

  A read-only connection is still opened read-write at the file level, so
  that SQLite can roll back the journal of a writer killed mid-commit (a
  ``mode=ro`` connection could not, and would fail to read).
  """
  con = sqlite3.connect(Path(path), isolation_level=None, timeout=30.0)
  con.execute("PRAGMA journal_mode=DELETE")
  con.execute("PRAGMA synchronous=FULL")
  if readonly:
    con.execute("PRAGMA query_only=ON")
  con.row_factory = sqlite3.Row
  return con


def create(path: str | Path, meta_items: dict[str, Any],
           gen0: dict[str, Any]) -> None:
  """Writes a new database at ``path``: the tables, the ``meta`` rows and
  generation 0. It is built under a temporary name and renamed, so ``path``
  appears complete or not at all."""
  path = Path(path)
  tmp = path.with_name(path.name + ".new")
  tmp.unlink(missing_ok=True)
  con = sqlite3.connect(tmp)
  try:
    con.executescript(_SCHEMA)
    for k, v in {"format": FORMAT, "version": VERSION, **meta_items}.items():
      con.execute("INSERT INTO meta VALUES (?, ?)", (k, json.dumps(v)))
    _insert_generation(con, 0, gen0)
    con.execute("INSERT INTO head VALUES (0, 0)")
    con.commit()
  finally:
    con.close()
  with open(tmp, "rb") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection):
  """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception."""
  con.execute("BEGIN IMMEDIATE")
  try:
    yield
    con.execute("COMMIT")
  except BaseException:
    con.execute("ROLLBACK")
    raise


def _insert_generation(con, gen: int, g: dict) -> None:
  con.execute("INSERT INTO generations VALUES (?, ?, ?, ?, ?)",
              (gen, g["created"], json.dumps(g["objects"]),
               int(g["num_samples"]), g["params_sha256"]))


def meta(con: sqlite3.Connection) -> dict[str, Any]:
  return {r["key"]: json.loads(r["value"])
          for r in con.execute("SELECT key, value FROM meta")}


def _row(r) -> dict[str, Any]:
  out = dict(r)
  for k in _JSON_COLUMNS:
    if k in out and isinstance(out[k], str):
      out[k] = json.loads(out[k])
  return out


def head(con: sqlite3.Connection) -> int:
  r = con.execute("SELECT gen FROM head").fetchone()
  if r is None:
    raise ValueError("the store database has no head row.")
  return int(r["gen"])


def generation(con: sqlite3.Connection, gen: int) -> dict[str, Any]:
  r = con.execute("SELECT * FROM generations WHERE gen = ?", (gen,)).fetchone()
  if r is None:
    raise ValueError(f"the store database has no generation {gen}.")
  return _row(r)


def commit_request(con: sqlite3.Connection, row: dict[str, Any],
                   gen: dict[str, Any]) -> None:
  """Inserts the new generation and the request's log row and moves the head,
  in one transaction; a conflict (another writer moved the head) rolls back."""
  with _transaction(con):
    if head(con) != row["gen_before"]:
      raise RuntimeError("the store's head moved during the request (another "
                         "writer?); nothing was applied.")
    _insert_generation(con, row["gen_after"], gen)
    vals = [json.dumps(row[k]) if k in _JSON_COLUMNS else row[k]
            for k in _REQUEST_COLUMNS]
    con.execute(f"INSERT INTO requests ({', '.join(_REQUEST_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_REQUEST_COLUMNS))})", vals)
    con.execute("UPDATE head SET gen = ?", (row["gen_after"],))


def requests(con: sqlite3.Connection) -> list[dict[str, Any]]:
  return [_row(r) for r in con.execute("SELECT * FROM requests ORDER BY seq")]


#: Rows a page of :func:`latest_requests` reads.
PAGE = 64


def latest_requests(con: sqlite3.Connection) -> Iterator[dict[str, Any]]:
  """The requests newest first, read in pages of :data:`PAGE` as they are
  consumed (a caller that stops early does not parse the whole log; no
  statement stays open between pages)."""
  offset = 0
  while True:
    page = con.execute("SELECT * FROM requests ORDER BY seq DESC LIMIT ? "
                       "OFFSET ?", (PAGE, offset)).fetchall()
    for r in page:
      yield _row(r)
    if len(page) < PAGE:
      return
    offset += PAGE


def find_request(con: sqlite3.Connection, request_id: str
                 ) -> dict[str, Any] | None:
  r = con.execute("SELECT * FROM requests WHERE request_id = ?",
                  (request_id,)).fetchone()
  return None if r is None else _row(r)


def record_verification(con: sqlite3.Connection, gen: int,
                        result: dict[str, Any], versions: dict, time: str
                        ) -> None:
  with _transaction(con):
    con.execute("INSERT INTO verifications (time, gen, result, versions) "
                "VALUES (?, ?, ?, ?)", (time, gen, json.dumps(result),
                                        json.dumps(versions)))


def verifications(con: sqlite3.Connection) -> list[dict[str, Any]]:
  return [_row(r) for r in con.execute(
      "SELECT * FROM verifications ORDER BY seq")]


def find_request_by_ids(con: sqlite3.Connection, ids_sha256: str
                        ) -> dict[str, Any] | None:
  """The first request whose sorted ids hash to ``ids_sha256``."""
  r = con.execute("SELECT * FROM requests WHERE ids_sha256 = ? ORDER BY seq",
                  (ids_sha256,)).fetchone()
  return None if r is None else _row(r)


def commit_event(con: sqlite3.Connection, kind: str, gen_before: int,
                 gen: dict[str, Any], detail: dict[str, Any]) -> None:
  """A new generation that is not a request (e.g. ``compact``), its event
  row and the new head, in one transaction."""
  with _transaction(con):
    if head(con) != gen_before:
      raise RuntimeError("the store's head moved (another writer?); nothing "
                         "was changed.")
    _insert_generation(con, gen_before + 1, gen)
    con.execute("INSERT INTO events (time, kind, gen_before, gen_after, "
                "detail) VALUES (?, ?, ?, ?, ?)",
                (gen["created"], kind, gen_before, gen_before + 1,
                 json.dumps(detail)))
    con.execute("UPDATE head SET gen = ?", (gen_before + 1,))


def events(con: sqlite3.Connection) -> list[dict[str, Any]]:
  return [_row(r) for r in con.execute("SELECT * FROM events ORDER BY seq")]
