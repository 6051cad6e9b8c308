"""Tests of ``fastntk deletion`` (fastntk_jax.cli.deletion)."""

import json

import numpy as np
import pytest

from fastntk_jax.cli import commands as cli
from fastntk_jax.cli.common import UsageError
from fastntk_jax.cli.deletion import read_ids
from fastntk_jax.io import checkpoint


@pytest.fixture(autouse=True)
def kept(monkeypatch):
  """Records ``keep_freed_memory`` calls instead of changing this test
  process's malloc (the kill test's subprocesses make the real call)."""
  calls = []
  monkeypatch.setattr("fastntk_jax.io.environment.keep_freed_memory",
                      lambda: calls.append(1) or True)
  return calls


def test_init_passes_keep_rows_to_the_store(tmp_path, monkeypatch):
  from fastntk_jax.store import DeletionStore
  seen = {}

  def init(*a, **kw):
    seen.update(kw)
    raise UsageError("stop here")

  monkeypatch.setattr(DeletionStore, "init", init)
  # Not this test process's compilation cache.
  monkeypatch.setattr("fastntk_jax.cli.deletion._compilation_cache",
                      lambda path: None)
  monkeypatch.setattr("fastntk_jax.cli.deletion.model_from_checkpoint",
                      lambda path: ("resnet20", None, None, _Ckpt(), None))
  monkeypatch.setattr("fastntk_jax.cli.deletion.store_samples",
                      lambda desc: (np.zeros((2, 32, 32, 3), np.uint8),
                                    np.arange(2), np.arange(2)))
  for flags, want in (([], False), (["--keep-rows"], True)):
    assert cli.main(["deletion", "init", str(tmp_path / "s"), "--checkpoint",
                     str(tmp_path / "m.ckpt")] + flags) == 2
    assert seen.pop("keep_rows") is want


class _Ckpt:
  config = {"finetune": {"loss": "mse"}, "data": {"source": "embedded"}}
  trees = {"frozen": {}, "w_0": {}, "w_D": {}}


def test_forget_passes_the_solve_tolerance_to_the_store(tmp_path,
                                                        monkeypatch):
  from fastntk_jax.store import DeletionStore
  seen = []

  class Store:
    meta = {"description": {}}

    def __enter__(self):
      return self

    def __exit__(self, *a):
      return False

    def forget(self, fn, forget_set, **kw):
      seen.append(kw)
      raise UsageError("stop here")

  monkeypatch.setattr(DeletionStore, "open",
                      lambda *a, **kw: Store())
  monkeypatch.setattr("fastntk_jax.cli.deletion._compilation_cache",
                      lambda path: None)
  monkeypatch.setattr("fastntk_jax.cli.deletion.store_model",
                      lambda store: None)
  monkeypatch.setattr("fastntk_jax.cli.deletion.store_samples",
                      lambda desc: (np.zeros((3, 2)), np.arange(3),
                                    np.arange(3)))
  monkeypatch.setattr("fastntk_jax.store.take",
                      lambda data, ids, name: (data[0][ids], data[1][ids]))
  (tmp_path / "ids.txt").write_text("1 2")
  args = ["deletion", "forget", str(tmp_path / "s"), "--ids",
          str(tmp_path / "ids.txt")]
  assert cli.main(args) == 2
  assert cli.main(args + ["--newton-tol", "1e-7"]) == 2
  assert "newton_tol" not in seen[0] and seen[1]["newton_tol"] == 1e-7
  for bad in ("0", "1", "-1e-7", "nan"):
    assert cli.main(args + [f"--newton-tol={bad}"]) == 2
  assert len(seen) == 2  # refused before the store was asked


def test_forget_keeps_freed_memory_unless_told(tmp_path, kept):
  args = ["deletion", "forget", str(tmp_path / "none"), "--ids",
          str(tmp_path / "ids.txt")]
  assert cli.main(args) == 2 and len(kept) == 1
  assert cli.main(args + ["--release-memory"]) == 2 and len(kept) == 1
  assert cli.main(["deletion", "status", str(tmp_path / "none")]) == 2
  assert len(kept) == 1


def test_ids_are_read_from_text_or_json():
  np.testing.assert_array_equal(read_ids("3 1,2\n# a comment\n7 # more\n"),
                                [3, 1, 2, 7])
  np.testing.assert_array_equal(read_ids("[4, 5]"), [4, 5])
  for bad, msg in (("", "empty"), ("# only a comment", "empty"),
                   ("1 x", "integer"), ("[1.5]", "integer"),
                   ("[true]", "integer")):
    with pytest.raises(UsageError, match=msg):
      read_ids(bad)


def test_bad_inputs_are_reported_before_work(tmp_path, capsys):
  assert cli.main(["deletion", "status", str(tmp_path / "none")]) == 2
  assert "no deletion store" in capsys.readouterr().err
  assert cli.main(["deletion", "forget", str(tmp_path / "none"), "--ids",
                   str(tmp_path / "ids.txt")]) == 2
  assert "--ids: no file" in capsys.readouterr().err
  assert cli.main(["deletion", "init", str(tmp_path / "s"), "--checkpoint",
                   str(tmp_path / "m.ckpt"), "--damping", "0"]) == 2
  assert "--damping must be > 0" in capsys.readouterr().err
  # A folder in use is refused before anything is written into it (the
  # compilation cache included).
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  assert cli.main(["deletion", "init", str(tmp_path / "busy"), "--checkpoint",
                   str(tmp_path / "m.ckpt")]) == 2
  assert "not empty" in capsys.readouterr().err
  assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
  assert cli.main(["deletion", "forget", str(tmp_path / "none"), "--ids",
                   "-", "--host-devices", "0"]) == 2
  assert "--host-devices must be >= 1" in capsys.readouterr().err
  for bad in ("-1", "nan"):
    assert cli.main(["deletion", "forget", str(tmp_path / "none"), "--ids",
                     "-", "--refresh-slack", bad]) == 2
    assert "--refresh-slack must be" in capsys.readouterr().err
  assert cli.main(["deletion", "forget", str(tmp_path / "none"), "--ids",
                   "-", "--refresh-slack", "0.5", "--no-refresh"]) == 2
  assert "contradict" in capsys.readouterr().err
  assert cli.main(["deletion", "forget", str(tmp_path / "none"), "--ids",
                   "-", "--compact", "--no-compact"]) == 2
  assert "contradict" in capsys.readouterr().err
  # This process's JAX has started with one CPU device: asking for two here
  # is refused with the fix (a new process, or XLA_FLAGS before Python).
  import jax
  n = len(jax.devices("cpu"))
  assert cli.main(["deletion", "forget", str(tmp_path / "none"), "--ids",
                   "-", "--host-devices", str(n + 1)]) == 2
  err = capsys.readouterr().err
  assert "--host-devices" in err and "XLA_FLAGS" in err
  # The count it already has is accepted; the next error is the store's.
  assert cli.main(["deletion", "status", str(tmp_path / "none")]) == 2
  assert cli.main(["deletion", "verify", str(tmp_path / "none"),
                   "--host-devices", str(n)]) == 2
  assert "no deletion store" in capsys.readouterr().err


@pytest.mark.slow  # fine-tunes a ResNet-20 and compiles its Jacobians: ~2 min
def test_a_month_of_requests_through_the_cli(tmp_path, capsys, monkeypatch):
  ck, st = tmp_path / "m.ckpt", tmp_path / "m.store"
  assert cli.main(["train", "--model", "resnet20", "--data", "embedded",
                   "--ipc", "4", "--test-ipc", "2", "--epochs", "2",
                   "--out", str(ck), "--quiet"]) == 0
  assert cli.main(["deletion", "init", str(st), "--checkpoint", str(ck),
                   "--json", str(tmp_path / "init.json")]) == 0
  assert json.loads((tmp_path / "init.json").read_text())["num_samples"] == 40
  (tmp_path / "r1.txt").write_text("5 6\n")
  assert cli.main(["deletion", "forget", str(st), "--ids",
                   str(tmp_path / "r1.txt"), "--request-id", "ticket-1",
                   "--no-refresh", "--json", str(tmp_path / "r1.json")]) == 0
  r1 = json.loads((tmp_path / "r1.json").read_text())
  assert r1["status"] == "applied" and r1["ids"] == [5, 6]
  # The same ids again, from standard input, under no request id.
  import io
  monkeypatch.setattr("sys.stdin", io.StringIO("[6, 5]"))
  assert cli.main(["deletion", "forget", str(st), "--ids", "-"]) == 0
  assert "already applied" in capsys.readouterr().out
  (tmp_path / "r2.txt").write_text("6 7")
  assert cli.main(["deletion", "forget", str(st), "--ids",
                   str(tmp_path / "r2.txt")]) == 2
  assert "already forgotten" in capsys.readouterr().err
  assert cli.main(["deletion", "log", str(st)]) == 0
  assert "| 1 | ticket-1 |" in capsys.readouterr().out
  # An MSE store has no preconditioner to form again; nothing changes.
  assert cli.main(["deletion", "refresh", str(st), "--json",
                   str(tmp_path / "rf.json")]) == 0
  assert "nothing to refresh" in capsys.readouterr().out
  assert json.loads((tmp_path / "rf.json").read_text())["status"] == (
      "nothing_to_refresh")
  assert cli.main(["deletion", "verify", str(st), "--json",
                   str(tmp_path / "v.json")]) == 0
  v = json.loads((tmp_path / "v.json").read_text())
  assert v["relative_difference"] < 1e-4 and v["num_forgotten"] == 2
  out = tmp_path / "now.ckpt"
  assert cli.main(["deletion", "export", str(st), "--out", str(out)]) == 0
  c = checkpoint.load(out, expect_kind="peft")
  assert c.config["deletion_store"]["generation"] == 1
  assert cli.main(["deletion", "status", str(st), "--json",
                   str(tmp_path / "s.json")]) == 0
  s = json.loads((tmp_path / "s.json").read_text())
  assert s["params_sha256"] == c.config["deletion_store"]["params_sha256"]
  assert s["num_forgotten"] == 2 and s["last_verification"]["gen"] == 1
  # The exported model is what the other commands read.
  assert cli.main(["evaluate", "--checkpoint", str(out), "--data", "embedded",
                   "--split", "train", "--ipc", "4"]) == 0
