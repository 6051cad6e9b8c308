"""Tests of fastntk_jax.store: the deletion store on disk.

A two-layer MLP stands in for the network (the store sees only
``apply_fn``); the ResNet path through the CLI is in test_deletion_cli.py.
"""

import os
import sqlite3

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.core import deletion
from fastntk_jax.core import unlearn as unlearn_lib
from fastntk_jax.store import CorruptStoreError
from fastntk_jax.store import DeletionStore
from fastntk_jax.store import StoreError
from fastntk_jax.store import StoreLockedError
from fastntk_jax.store import params_sha256
from fastntk_jax.store import log as db
from fastntk_jax.store import store as store_lib


def apply_fn(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"]


def _problem():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  p = {"w1": 0.5 * jax.random.normal(k[0], (6, 8)), "b1": jnp.zeros(8),
       "w2": 0.5 * jax.random.normal(k[1], (8, 3)), "b2": jnp.zeros(3)}
  w0 = jax.tree_util.tree_map(lambda a: 0.9 * a, p)
  x = np.asarray(jax.random.normal(k[2], (30, 6)), np.float32)
  y = np.arange(30) % 3
  ids = np.arange(1000, 1030)  # not positions: ids are names
  return p, w0, x, y, ids


P, W0, X, Y, IDS = _problem()
REQS = [[1000, 1004], [1010, 1011], [1020, 1025]]  # one request shape


def _init(path, loss, **kw):
  return DeletionStore.init(path, apply_fn, P, (X, Y), ids=IDS, anchor=W0,
                            loss=loss, damping=0.5, **kw)


def _sel(ids):
  pos = np.searchsorted(IDS, ids)
  return X[pos], Y[pos]


def _flat(t):
  return np.concatenate([np.ravel(np.asarray(a, np.float64))
                         for a in jax.tree_util.tree_leaves(t)])


@pytest.mark.parametrize("variant", ["mse", "mse-rows", "ce"])
def test_requests_across_processes_equal_in_memory_and_from_scratch(
    tmp_path, variant):
  loss, rows = variant[:3], {"keep_rows": variant == "mse-rows"}
  # In memory: prepare + forget, the reference.
  state = deletion.prepare(apply_fn, P, (X, Y), anchor=W0, ids=IDS,
                           loss=loss, damping=0.5, **rows)
  params = P
  for r in REQS:
    res = deletion.forget(state, apply_fn, params, _sel(r), ids=np.array(r))
    state, params = res.state, res.params
  # The store: closed and reopened between requests, as separate processes
  # would.
  s = _init(tmp_path / "s", loss, **rows)
  s.close()
  for i, r in enumerate(REQS):
    with DeletionStore.open(tmp_path / "s") as s:
      out = s.forget(apply_fn, _sel(r), ids=np.array(r), request_id=f"r{i}")
      assert out.status == "applied"
  with DeletionStore.open(tmp_path / "s", readonly=True) as s:
    # The rows, when kept, are read back (checksummed) with the state.
    assert (s.state.jacobian is not None) == (variant != "mse")
    if loss == "mse":
      np.testing.assert_array_equal(_flat(s.params), _flat(params))
    else:  # the store may refresh M (refresh_due): the same minimiser
      np.testing.assert_allclose(_flat(s.params), _flat(params), rtol=1e-7,
                                 atol=1e-9)
      for row in s.log():
        assert set(row["extra"]["refresh"]) == {
            "iterations_since", "step_seconds", "refresh_seconds_estimate",
            "slack_seconds", "due"}
      assert s.meta["refresh_seconds_estimate"] > 0
    np.testing.assert_array_equal(s.state.ids, state.ids)
    # A refresh after a request is a generation of its own (events).
    refreshes = [e for e in db.events(s.con) if e["kind"] == "refresh"]
    assert loss == "ce" or not refreshes
    assert s.head == 3 + len(refreshes) and len(s.log()) == 3
    log = s.log()
    assert [r["request_id"] for r in log] == ["r0", "r1", "r2"]
    assert log[0]["params_sha256_before"] == params_sha256(P)
    assert log[-1]["params_sha256_after"] == params_sha256(s.params)
    assert log[1]["params_sha256_before"] == log[0]["params_sha256_after"]
    assert log[0]["ids"] == [1000, 1004]
    for row in log:
      assert set(row["before"]) == {"accuracy", "loss"}
      assert row["versions"]["jax"] == jax.__version__
    # The audit: from scratch on what is left.
    v = s.verify(apply_fn, (X, Y, IDS))
    gone = np.concatenate([np.array(r) for r in REQS])
    keep = np.setdiff1d(IDS, gone)
    ref = unlearn_lib.unlearn(apply_fn, P, _sel(keep), _sel(np.sort(gone)),
                              anchor=W0, loss=loss, damping=0.5)
    np.testing.assert_allclose(_flat(s.params), _flat(ref.params),
                               rtol=1e-4, atol=1e-5)
    assert v["relative_difference"] < 1e-4
    assert v["num_forgotten"] == 6 and v["num_retain"] == 24
    assert s.verifications()[-1]["result"]["relative_difference"] == (
        v["relative_difference"])
    # The audit sees a store whose parameters are off.
    s.params = jax.tree_util.tree_map(lambda a: a + 1e-2, s.params)
    bad = s.verify(apply_fn, (X, Y, IDS), record=False)
    assert bad["relative_difference"] > 100 * max(v["relative_difference"],
                                                  1e-6)
    assert len(s.verifications()) == 1  # record=False writes nothing


def test_a_request_tolerance_reaches_the_solve_and_the_log(tmp_path,
                                                          monkeypatch):
  seen, real = [], deletion.forget

  def spy(*a, **kw):
    seen.append(kw.get("newton_tol"))
    return real(*a, **kw)

  monkeypatch.setattr(deletion, "forget", spy)
  with _init(tmp_path / "s", "ce") as s:
    del seen[:]  # init's warm-up request
    s.forget(apply_fn, _sel(REQS[0]), ids=np.array(REQS[0]), newton_tol=1e-4,
             refresh="off")
    s.forget(apply_fn, _sel(REQS[1]), ids=np.array(REQS[1]), refresh="off")
    solves = [r["extra"]["solve"] for r in s.log()]
  assert seen == [1e-4, None]
  assert [q["newton_tol"] for q in solves] == [1e-4, None]
  assert solves[0]["grad_norm"] <= 1e-4 and solves[1]["grad_norm"] <= 1e-9


def test_resending_a_request_changes_nothing(tmp_path):
  with _init(tmp_path / "s", "mse") as s:
    a = s.forget(apply_fn, _sel(REQS[0]), ids=np.array(REQS[0]),
                 request_id="t-1")
    sha, gen = s.generation["params_sha256"], s.head
    again = s.forget(apply_fn, _sel(REQS[0]), ids=np.array(REQS[0]),
                     request_id="t-1")
    assert again.status == "already_applied" and again.row == a.row
    # The same ids under another request id (in another order).
    other = s.forget(apply_fn, _sel(REQS[0][::-1]),
                     ids=np.array(REQS[0][::-1]), request_id="t-2")
    assert other.status == "already_applied" and other.request_id == "t-1"
    # The same request id for other ids is refused.
    with pytest.raises(StoreError, match="names one request"):
      s.forget(apply_fn, _sel([1001]), ids=np.array([1001]), request_id="t-1")
    assert s.generation["params_sha256"] == sha and s.head == gen
    assert len(s.log()) == 1
    # Without a request id, the ids name the request.
    b = s.forget(apply_fn, _sel([1002]), ids=np.array([1002]))
    assert b.status == "applied" and b.request_id.startswith("ids-")
    assert s.forget(apply_fn, _sel([1002]), ids=np.array([1002])
                    ).status == "already_applied"


def test_bad_requests_are_refused_and_change_nothing(tmp_path):
  with _init(tmp_path / "s", "mse") as s:
    s.forget(apply_fn, _sel([1000]), ids=np.array([1000]))
    sha = s.generation["params_sha256"]
    cases = [
        ([999], "never in this store"),
        ([1000, 1001], "already forgotten"),
        ([], "non-empty"),
        ([1001, 1001], "repeat"),
    ]
    for ids, msg in cases:
      with pytest.raises(StoreError, match=msg):
        s.forget(apply_fn, _sel(np.array(ids, int)), ids=np.array(ids, int))
    # A whole class (class 1: ids 1001, 1004, ...), then everything.
    cls1 = IDS[Y == 1]
    with pytest.raises(StoreError, match=r"class\(es\) \[1\]"):
      s.forget(apply_fn, _sel(cls1), ids=cls1)
    rest = np.setdiff1d(IDS, [1000])
    with pytest.raises(StoreError, match="at least one must remain"):
      s.forget(apply_fn, _sel(rest), ids=rest)
    # Inputs that are not the samples prepared under these ids.
    x_f, y_f = _sel([1001, 1002])
    with pytest.raises(StoreError, match="differ from those prepared"):
      s.forget(apply_fn, (x_f[::-1], y_f), ids=np.array([1001, 1002]))
    with pytest.raises(StoreError, match="differ from those prepared"):
      s.forget(apply_fn, (x_f + 1e-3, y_f), ids=np.array([1001, 1002]))
    assert s.generation["params_sha256"] == sha and len(s.log()) == 1
    # allow_empty_class lets the class go.
    assert s.forget(apply_fn, _sel(cls1), ids=cls1,
                    allow_empty_class=True).status == "applied"
  with DeletionStore.open(tmp_path / "s", readonly=True) as s:
    with pytest.raises(StoreError, match="read-only"):
      s.forget(apply_fn, _sel([1002]), ids=np.array([1002]))


def test_one_writer_at_a_time(tmp_path):
  s = _init(tmp_path / "s", "mse")
  with pytest.raises(StoreLockedError, match="another process"):
    DeletionStore.open(tmp_path / "s")
  with DeletionStore.open(tmp_path / "s", readonly=True) as r:
    assert r.status()["num_samples"] == 30  # readers are not blocked
  s.close()
  DeletionStore.open(tmp_path / "s").close()


def test_init_refuses_an_existing_store_and_a_full_folder(tmp_path):
  _init(tmp_path / "s", "mse").close()
  with pytest.raises(StoreError, match="already holds a deletion store"):
    _init(tmp_path / "s", "mse")
  (tmp_path / "f").mkdir()
  (tmp_path / "f" / "notes.txt").write_text("x")
  with pytest.raises(StoreError, match="not empty"):
    _init(tmp_path / "f", "mse")
  with pytest.raises(StoreError, match="no deletion store"):
    DeletionStore.open(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="memory_budget"):
    _init(tmp_path / "m", "ce", memory_budget=1000)
  assert not (tmp_path / "m" / "store.sqlite").exists()
  # What an init killed midway leaves is cleared by the next init.
  (tmp_path / "m" / "objects").mkdir(exist_ok=True)
  (tmp_path / "m" / "objects" / ".new-x.tmp").write_bytes(b"partial")
  (tmp_path / "m" / "store.sqlite.new").write_bytes(b"partial")
  with _init(tmp_path / "m", "mse") as s:
    assert s.head == 0
  assert not (tmp_path / "m" / "objects" / ".new-x.tmp").exists()


def test_corrupt_or_missing_files_are_detected_not_loaded(tmp_path):
  with _init(tmp_path / "s", "ce") as s:
    s.forget(apply_fn, _sel([1000]), ids=np.array([1000]))
    keys = sorted(s._live_keys())
  objs = tmp_path / "s" / "objects"
  for i, how in enumerate(("flip", "truncate", "remove")):
    f = objs / keys[i]
    data = f.read_bytes()
    os.chmod(f, 0o644)
    if how == "flip":
      f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif how == "truncate":
      f.write_bytes(data[: len(data) // 2])
    else:
      f.unlink()
    with pytest.raises(CorruptStoreError, match="checksum|missing"):
      DeletionStore.open(tmp_path / "s", readonly=True)
    f.write_bytes(data)  # put it back
  with DeletionStore.open(tmp_path / "s") as s:
    assert s.head == 1


def test_another_format_or_version_is_refused_with_the_fix(tmp_path):
  _init(tmp_path / "s", "mse").close()
  con = sqlite3.connect(tmp_path / "s" / "store.sqlite")
  con.execute("UPDATE meta SET value = '\"0.0.1\"' WHERE key = 'fastntk_jax'")
  con.commit()
  with pytest.raises(StoreError, match="fastntk_jax==0.0.1"):
    DeletionStore.open(tmp_path / "s")
  with DeletionStore.open(tmp_path / "s", allow_other_version=True) as s:
    r = s.forget(apply_fn, _sel([1000]), ids=np.array([1000]))
    assert r.row["versions"]["store_written_by"] == "0.0.1"
  con.execute("UPDATE meta SET value = '99' WHERE key = 'version'")
  con.commit()
  con.close()
  with pytest.raises(StoreError, match="store format 99"):
    DeletionStore.open(tmp_path / "s", allow_other_version=True)


def test_the_request_log_is_append_only(tmp_path):
  with _init(tmp_path / "s", "mse") as s:
    s.forget(apply_fn, _sel([1000]), ids=np.array([1000]))
  con = sqlite3.connect(tmp_path / "s" / "store.sqlite")
  for sql in ("UPDATE requests SET num_forget = 0",
              "DELETE FROM requests"):
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
      con.execute(sql)
  con.close()


def test_a_failure_before_the_commit_leaves_the_old_state(tmp_path,
                                                          monkeypatch):
  with _init(tmp_path / "s", "mse") as s:
    sha0 = s.generation["params_sha256"]

    def crash(*a, **k):
      raise KeyboardInterrupt("killed between the files and the commit")

    monkeypatch.setattr(db, "commit_request", crash)
    with pytest.raises(KeyboardInterrupt):
      s.forget(apply_fn, _sel([1000]), ids=np.array([1000]))
    monkeypatch.undo()
  n_files = len(list((tmp_path / "s" / "objects").iterdir()))
  with DeletionStore.open(tmp_path / "s") as s:  # the writer cleans up
    assert s.head == 0 and s.generation["params_sha256"] == sha0
    assert len(list((tmp_path / "s" / "objects").iterdir())) < n_files
    assert s.forget(apply_fn, _sel([1000]), ids=np.array([1000])
                    ).status == "applied"


def test_a_failure_during_the_refresh_after_a_request_keeps_the_request(
    tmp_path, monkeypatch):
  """The request is committed before the refresh starts: a crash between
  the refresh's files and its commit leaves the request applied, no stray
  file after reopening, and the refresh due again at the next request."""
  with _init(tmp_path / "s", "ce") as s:
    s.meta["refresh_seconds_estimate"] = 0.0  # due after every request

    def crash(*a, **k):
      raise KeyboardInterrupt("killed between the refresh's files and commit")

    monkeypatch.setattr(db, "commit_event", crash)
    with pytest.raises(KeyboardInterrupt):
      s.forget(apply_fn, _sel([1000]), ids=np.array([1000]))
    monkeypatch.undo()
  with DeletionStore.open(tmp_path / "s") as s:
    assert [r["request_id"] for r in s.log()] == [
        store_lib.ids_key(np.array([1000]))]
    assert s.head == 1 and not db.events(s.con)
    assert set(s.objects.keys()) == s._live_keys()  # its files removed
    # No refresh was logged: the steps since init still count, and the next
    # request's refresh (init's estimate is again the cost) goes through.
    assert len(s._iterations_since_refresh()) == 1
    s.meta["refresh_seconds_estimate"] = 0.0
    out = s.forget(apply_fn, _sel([1001]), ids=np.array([1001]))
    assert out.refresh["status"] == "refreshed" and s.head == 3


def test_latest_requests_are_newest_first_in_pages(tmp_path, monkeypatch):
  with _init(tmp_path / "s", "mse") as s:
    for i, r in enumerate(REQS):
      s.forget(apply_fn, _sel(r), ids=np.array(r), request_id=f"r{i}")
    for page in (1, 2, 3, 64):
      monkeypatch.setattr(db, "PAGE", page)
      assert [r["request_id"] for r in db.latest_requests(s.con)] == [
          "r2", "r1", "r0"]
    it = db.latest_requests(s.con)
    assert next(it)["request_id"] == "r2"  # stopping early is fine:
    s.forget(apply_fn, _sel([1001]), ids=np.array([1001]))  # commits work


def test_refresh_rule_is_ski_rental():
  due = store_lib.refresh_due
  assert not due([], 0.1, 1.0) and not due([9], 0.1, 0.0 + 1e-9)
  assert not due([9, 13, 14], 0.1, 1.0)  # 9 steps over the minimum: 0.9 s
  assert due([9, 13, 14, 15], 0.1, 1.0)  # 15 steps: 1.5 s >= 1 s
  assert due([12, 9, 10], 1.0, 4.0)  # the minimum, not the first, is the base
  assert not due([9, 30, 40], 0.1, float("inf"))  # no estimate: never
  assert due([9], 0.1, 0.0)  # free refreshes are always taken
  # The latency rule: the current request's steps over the fewest, in
  # seconds, against the slack; the cost rule still applies beside it.
  assert due([9, 13], 0.1, float("inf"), 0.3)  # 0.4 s > 0.3 s
  assert not due([9, 11], 0.1, float("inf"), 0.3)  # 0.2 s
  assert not due([9, 13], 0.1, float("inf"))  # no slack: cost rule only
  assert not due([8, 11, 11, 11], 0.125, 10.0, 0.375)  # not over the slack
  assert due([8, 12], 0.125, 10.0, 0.375)
  assert not due([9, 19, 9], 0.1, 10.0, 0.5)  # the current one, not the worst
  assert due([9, 19, 9], 0.1, 1.0, 0.5)  # ... while the cost rule sums them
  assert not due([], 0.1, 1.0, 0.0)


def test_a_cross_entropy_store_refreshes_when_it_pays(tmp_path, monkeypatch):
  with _init(tmp_path / "s", "ce") as s:
    assert s.meta["refresh_seconds_estimate"] > 0
    # The timed subset: M over those rows alone, as a mask would give it.
    mask = np.zeros(len(IDS), bool)
    mask[[2, 5, 7]] = True
    sub = deletion.refresh_preconditioner(s.state, np.array([2, 5, 7]))
    ref = deletion.refresh_preconditioner(s.state._replace(active=mask))
    np.testing.assert_allclose(np.asarray(sub.gram), np.asarray(ref.gram),
                               rtol=1e-10, atol=1e-12)
    s.meta["refresh_seconds_estimate"] = float("inf")  # never
    out0 = s.forget(apply_fn, _sel([1000]), ids=np.array([1000]))
    r0 = out0.row
    assert not r0["extra"]["refresh"]["due"] and out0.refresh is None
    assert s._iterations_since_refresh() == [
        r0["extra"]["solve"]["iterations"]]
    stale = s.state
    s.meta["refresh_seconds_estimate"] = 0.0  # always
    head = s.head
    out1 = s.forget(apply_fn, _sel([1001]), ids=np.array([1001]))
    r1 = out1.row
    assert r1["extra"]["refresh"]["due"]
    assert r1["extra"]["refresh"]["iterations_since"] == [
        r0["extra"]["solve"]["iterations"], r1["extra"]["solve"]["iterations"]]
    # The request was committed first (its own generation, M as the solve
    # left it), then the refresh as the next generation, logged in events.
    assert r1["gen_after"] == head + 1 and s.head == head + 2
    assert out1.refresh["status"] == "refreshed"
    assert out1.refresh["seconds"] > 0 and out1.refresh["generation"] == s.head
    ev = [e for e in db.events(s.con) if e["kind"] == "refresh"]
    assert len(ev) == 1 and ev[0]["gen_before"] == r1["gen_after"]
    assert s.generation["params_sha256"] == r1["params_sha256_after"]
    assert s._iterations_since_refresh() == []  # M is fresh again
    # The refreshed M is the Gauss-Newton matrix at the new solution over the
    # kept rows (not the downdated one the request started from).
    want = deletion.refresh_preconditioner(s.state)
    np.testing.assert_allclose(np.asarray(s.state.gram), np.asarray(want.gram),
                               rtol=1e-12, atol=1e-12)
    assert not np.allclose(np.asarray(s.state.gram), np.asarray(stale.gram),
                           rtol=1e-6, atol=0)
    # The measured refresh replaces init's estimate.
    assert s._refresh_cost() == out1.refresh["seconds"]
    # refresh="off": due, not run; the steps keep counting; refresh() on
    # demand resets them.
    monkeypatch.setattr(store_lib, "refresh_due", lambda *a: True)
    out2 = s.forget(apply_fn, _sel([1002]), ids=np.array([1002]),
                    refresh="off")
    assert out2.row["extra"]["refresh"]["due"] and out2.refresh is None
    assert s._iterations_since_refresh() == [
        out2.row["extra"]["solve"]["iterations"]]
    assert s.refresh()["status"] == "refreshed"
    assert s._iterations_since_refresh() == []
    with pytest.raises(ValueError, match="refresh must be"):
      s.forget(apply_fn, _sel([1003]), ids=np.array([1003]), refresh="later")
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
      with pytest.raises(ValueError, match="refresh_slack must be"):
        s.forget(apply_fn, _sel([1003]), ids=np.array([1003]),
                 refresh_slack=bad)
    with pytest.raises(ValueError, match="cannot apply with refresh='off'"):
      s.forget(apply_fn, _sel([1003]), ids=np.array([1003]), refresh="off",
               refresh_slack=0.5)
    assert out2.row["extra"]["refresh"]["slack_seconds"] is None
    # The slack reaches the rule and the log.
    seen = []
    monkeypatch.setattr(store_lib, "refresh_due",
                        lambda *a: seen.append(a) or False)
    out3 = s.forget(apply_fn, _sel([1003]), ids=np.array([1003]),
                    refresh_slack=np.float32(0.25))
    assert seen[-1][3] == 0.25 and out3.refresh is None
    assert out3.row["extra"]["refresh"]["slack_seconds"] == 0.25
    assert not out3.row["extra"]["refresh"]["due"]
    assert s.refresh()["status"] == "refreshed"
    cost = s._refresh_cost()
  with DeletionStore.open(tmp_path / "s") as s:  # the schedule survives
    assert s._iterations_since_refresh() == []
    assert s._refresh_cost() == cost
    # The reopened state is the refreshed one (its files, read back).
    np.testing.assert_allclose(np.asarray(s.state.gram),
                               np.asarray(deletion.refresh_preconditioner(
                                   s.state).gram), rtol=1e-12, atol=1e-12)
  with DeletionStore.open(tmp_path / "s", readonly=True) as s:
    with pytest.raises(StoreError, match="read-only"):
      s.refresh()
  # A store written before init kept an estimate, with no refresh logged:
  # the cost is timed once in this process, not taken as infinite.
  with _init(tmp_path / "old", "ce") as s:
    del s.meta["refresh_seconds_estimate"]
    cost = s._refresh_cost()
    assert 0 < cost < float("inf")
    assert s.meta["refresh_seconds_estimate"] == cost


@pytest.mark.parametrize("variant", ["ce", "mse-rows"])
def test_unchanged_arrays_are_not_written_again(tmp_path, monkeypatch,
                                                variant):
  with _init(tmp_path / "s", variant[:3],
             keep_rows=variant == "mse-rows") as s:
    written = []
    real = store_lib.ObjectFiles.put_array
    monkeypatch.setattr(store_lib.ObjectFiles, "put_array",
                        lambda self, a: (written.append(np.shape(a)),
                                         real(self, a))[1])
    s.forget(apply_fn, _sel([1000]), ids=np.array([1000]))
    jac = s.state.jacobian.shape
  assert jac not in written  # the N·C × P Jacobian rows stay where they are
  assert (30,) in written  # the mask is new (and the factor, ids, ...)


# ------------------------------------------------------------- kill test
# A child process answers requests k0, k1, ... from the store until killed.
# In the 20-trial test the model is wide enough (P = 3,003: two 72 MB P×P
# matrices a request) that writing the state is a real share of a request,
# so kills land in the compute, the writes and the commit alike.
_CHILD = """
import sys
import jax.numpy as jnp
import numpy as np
from fastntk_jax.store import DeletionStore
import kill_problem as kp
store = DeletionStore.open(sys.argv[1])
for i, r in enumerate(kp.REQUESTS):
  store.forget(kp.apply_fn, kp.sel(r), ids=np.array(r), request_id=f"k{i}")
print("all applied", flush=True)
"""

_PROBLEM = """
HIDDEN = {hidden}
import jax
import jax.numpy as jnp
import numpy as np

def apply_fn(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

k = jax.random.split(jax.random.PRNGKey(1), 3)
PARAMS = {{"w1": 0.3 * jax.random.normal(k[0], (6, HIDDEN)),
          "b1": jnp.zeros(HIDDEN),
          "w2": 0.1 * jax.random.normal(k[1], (HIDDEN, 3)),
          "b2": jnp.zeros(3)}}
X = np.asarray(jax.random.normal(k[2], (60, 6)), np.float32)
Y = np.arange(60) % 3
IDS = np.arange(60)
REQUESTS = [[2 * i, 2 * i + 1] for i in range(25)]

def sel(ids):
  return X[np.asarray(ids)], Y[np.asarray(ids)]
"""


def _kill_trials(tmp_path, trials, seed, hidden, loss="mse"):
  import runpy
  import subprocess
  import sys
  import time
  import types
  (tmp_path / "kill_problem.py").write_text(_PROBLEM.format(hidden=hidden))
  (tmp_path / "child.py").write_text(_CHILD)
  kp = types.SimpleNamespace(**runpy.run_path(str(tmp_path /
                                                 "kill_problem.py")))
  path = tmp_path / "s"
  DeletionStore.init(path, kp.apply_fn, kp.PARAMS, (kp.X, kp.Y), ids=kp.IDS,
                     damping=1.0, loss=loss).close()
  # The reference chain: the parameters after 0, 1, 2, ... requests. MSE:
  # their SHA-256 (bit for bit). CE: the store refreshes M when its rule says
  # so (after a request's commit), which changes the solve's path and the
  # parameters by rounding only: compared to 1e-7.
  state = deletion.prepare(kp.apply_fn, kp.PARAMS, (kp.X, kp.Y), ids=kp.IDS,
                           damping=1.0, loss=loss)
  params, chain = kp.PARAMS, [params_sha256(kp.PARAMS)]
  flats = [_flat(params)]
  for r in kp.REQUESTS:
    res = deletion.forget(state, kp.apply_fn, params, kp.sel(r),
                          ids=np.array(r))
    state, params = res.state, res.params
    chain.append(params_sha256(params))
    flats.append(_flat(params))

  def at(s, n):  # the store holds the chain's n-th parameters
    if loss == "mse":
      return s.generation["params_sha256"] == chain[n]
    return (s.generation["params_sha256"] == params_sha256(s.params)
            and np.allclose(_flat(s.params), flats[n], rtol=1e-7, atol=1e-9))

  rng = np.random.default_rng(seed)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
  seen = []
  for _ in range(trials):
    with DeletionStore.open(path, readonly=True) as s:
      done = len(s.log())
    if done == len(kp.REQUESTS):
      break
    child = subprocess.Popen([sys.executable, str(tmp_path / "child.py"),
                              str(path)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    time.sleep(rng.uniform(1.0, 3.0))
    child.kill()  # SIGKILL
    err = child.communicate()[1].decode()
    assert child.returncode in (-9, 0), err
    # A reader first (SQLite rolls back a killed commit's journal for it),
    # then the writer: both see exactly some prefix of the chain.
    with DeletionStore.open(path, readonly=True) as s:
      assert at(s, len(s.log()))
    with DeletionStore.open(path) as s:
      n = len(s.log())
      ev = db.events(s.con)  # refreshes after commits (CE)
      assert all(e["kind"] == "refresh" for e in ev)
      assert loss == "ce" or not ev
      assert s.head == n + len(ev)
      assert at(s, n) and params_sha256(s.params) == s.generation[
          "params_sha256"]
      assert s.state.num_samples == len(kp.IDS) - 2 * n
      assert [r["request_id"] for r in s.log()] == [f"k{i}" for i in range(n)]
      live = s._live_keys()
      assert set(s.objects.keys()) == live  # nothing stray left
    seen.append(n - done)
  return seen, len(kp.REQUESTS)


def test_sigkill_at_random_moments_leaves_a_consistent_store(tmp_path):
  seen, total = _kill_trials(tmp_path, trials=4, seed=0, hidden=40)
  assert len(seen) >= 3


def test_sigkill_a_cross_entropy_store(tmp_path):
  """The same for a cross-entropy store, whose requests may be followed by
  a refresh of M as a generation of its own: a kill in either leaves a
  consistent store at some prefix of the requests."""
  seen, total = _kill_trials(tmp_path, trials=4, seed=2, hidden=40,
                             loss="ce")
  assert len(seen) >= 3


@pytest.mark.slow  # 20 child processes with a P = 3,003 model: minutes
def test_sigkill_twenty_times(tmp_path):
  seen, total = _kill_trials(tmp_path, trials=20, seed=1, hidden=300)
  assert len(seen) >= 12


@pytest.mark.slow  # the same for a cross-entropy store: minutes
def test_sigkill_a_cross_entropy_store_twenty_times(tmp_path):
  seen, total = _kill_trials(tmp_path, trials=20, seed=3, hidden=300,
                             loss="ce")
  assert len(seen) >= 12


def test_compaction_drops_forgotten_rows_and_changes_no_answer(tmp_path):
  a, b = _init(tmp_path / "a", "ce"), _init(tmp_path / "b", "ce")
  for s in (a, b):
    s.forget(apply_fn, _sel(REQS[0]), ids=np.array(REQS[0]))
  rows = a.state.jacobian.shape[0]
  c = a.compact()
  assert c["status"] == "compacted" and c["samples_dropped"] == 2
  assert a.state.jacobian.shape[0] == rows - 2 * 3  # C = 3 rows a sample
  assert not np.isin(REQS[0], a.state.row_ids).any()
  assert a.status()["jacobian_rows_of_forgotten_samples"] == 0
  assert a.compact()["status"] == "nothing_to_compact"
  for s in (a, b):
    s.forget(apply_fn, _sel(REQS[1]), ids=np.array(REQS[1]))
  np.testing.assert_allclose(_flat(a.params), _flat(b.params), rtol=1e-6,
                             atol=1e-9)
  a.close()
  b.close()
  with DeletionStore.open(tmp_path / "a", readonly=True) as s:
    # The second request's rows are masked again until the next compaction.
    assert s.state.jacobian.shape[0] == rows - 2 * 3
    assert s.status()["jacobian_rows_of_forgotten_samples"] == 2
    ev = [e for e in db.events(s.con) if e["kind"] == "compact"]
    assert len(ev) == 1 and ev[0]["gen_after"] == c["generation"]
  # An MSE store without rows has nothing to compact; one with rows drops
  # them, by the same rule (8 of 30 samples forgotten: a quarter and more).
  with _init(tmp_path / "m", "mse") as s:
    assert s.compact()["status"] == "nothing_to_compact"
  with _init(tmp_path / "r", "mse", keep_rows=True) as s:
    r8 = [1000, 1001, 1002, 1003, 1004, 1005, 1010, 1011]
    out = s.forget(apply_fn, _sel(r8), ids=np.array(r8))
    assert out.compact["status"] == "compacted"
    assert s.state.jacobian.shape[0] == 22 * 3 and s.state.active.all()
    ref = deletion.forget(deletion.prepare(
        apply_fn, P, (X, Y), anchor=W0, ids=IDS, damping=0.5), apply_fn, P,
        _sel(r8), ids=np.array(r8))
    diff = np.linalg.norm(_flat(s.params) - _flat(ref.params))
    assert diff < 1e-5 * np.linalg.norm(_flat(ref.params))  # float32 rows


@pytest.mark.parametrize("variant", ["mse", "mse-rows", "ce"])
def test_the_first_request_after_init_compiles_nothing(tmp_path, variant,
                                                     lowered_programs):
  """init runs a one-sample request and discards it, so that the request
  path is compiled before the first real request (of any size in the
  smallest bucket)."""
  with _init(tmp_path / "s", variant[:3],
             keep_rows=variant == "mse-rows") as s:
    assert s.meta["warm_up_seconds"] > 0
    head = s.head
    with lowered_programs() as new:
      out = s.forget(apply_fn, _sel(REQS[0]), ids=np.array(REQS[0]),
                     refresh="off")
    assert out.status == "applied" and s.head == head + 1
    assert new == []


def test_a_failed_warm_up_does_not_stop_init(tmp_path, monkeypatch):
  def fail(*a, **k):
    raise unlearn_lib.UnlearningError("not positive definite (injected)")

  monkeypatch.setattr(deletion, "forget", fail)
  with pytest.warns(RuntimeWarning, match="warm-up request.*injected"):
    s = _init(tmp_path / "s", "mse")
  with s:
    assert s.meta["warm_up_seconds"] is None and s.head == 0
  monkeypatch.undo()
  with DeletionStore.open(tmp_path / "s") as s:  # and it answers requests
    assert s.forget(apply_fn, _sel(REQS[0]),
                    ids=np.array(REQS[0])).status == "applied"


def test_a_cross_entropy_store_drops_forgotten_rows_at_a_quarter(
    tmp_path, lowered_programs):
  """compact="auto": once the held rows of forgotten samples are a quarter
  of the rows, they are dropped after the request's commit, as their own
  generation; the answers do not change."""
  a, b, c = [1000, 1001, 1002, 1003, 1004, 1005], [1010, 1011], [1020]
  state = deletion.prepare(apply_fn, P, (X, Y), anchor=W0, ids=IDS,
                           loss="ce", damping=0.5)
  params, chain = P, []
  for r in (a, b, c):
    res = deletion.forget(state, apply_fn, params, _sel(r), ids=np.array(r))
    state, params = res.state, res.params
    chain.append(params)
  with _init(tmp_path / "s", "ce") as s:
    out_a = s.forget(apply_fn, _sel(a), ids=np.array(a), refresh="off")
    assert out_a.compact is None and int(np.sum(~s.state.active)) == 6
    head = s.head
    out_b = s.forget(apply_fn, _sel(b), ids=np.array(b), refresh="off")
    assert out_b.compact["status"] == "compacted"  # 8 of 30 held
    assert out_b.compact["samples_dropped"] == 8
    assert out_b.row["gen_after"] == head + 1 and s.head == head + 2
    assert out_b.compact["generation"] == s.head
    assert s.state.active.all() and s.state.jacobian.shape[0] == 22 * 3
    assert [e["kind"] for e in db.events(s.con)] == ["compact"]
    # The solve was compiled for the new N after the compaction, not in the
    # next request.
    assert out_b.compact["warm_up_seconds"] > 0
    with lowered_programs() as new:
      s.forget(apply_fn, _sel(c), ids=np.array(c), refresh="off")
    assert new == []
    np.testing.assert_allclose(_flat(s.params), _flat(chain[-1]), rtol=1e-9,
                               atol=1e-12)
    with pytest.raises(ValueError, match="compact must be"):
      s.forget(apply_fn, _sel([1021]), ids=np.array([1021]), compact="yes")
  with DeletionStore.open(tmp_path / "s", readonly=True) as s:
    assert s.state.jacobian.shape[0] == 22 * 3  # compacted, then one masked
    assert int(np.sum(s.state.active)) == 21
  with _init(tmp_path / "t", "ce") as t:  # compact="off" keeps them
    for r in (a, b):
      assert t.forget(apply_fn, _sel(r), ids=np.array(r), refresh="off",
                      compact="off").compact is None
    assert int(np.sum(~t.state.active)) == 8 and not db.events(t.con)


def test_init_reads_the_state_back_once(tmp_path, monkeypatch):
  """init warms up on the state as read back from its files and opens the
  store with that same state, not a second read of the rows."""
  calls = []
  real = store_lib._read_state
  monkeypatch.setattr(store_lib, "_read_state",
                      lambda *a: (calls.append(1), real(*a))[1])
  with _init(tmp_path / "s", "ce") as s:
    assert len(calls) == 1 and s.state.jacobian is not None
  with DeletionStore.open(tmp_path / "s", readonly=True):
    assert len(calls) == 2  # an open reads it
