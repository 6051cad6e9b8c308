import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastntk_jax.io import checkpoint


def _trees():
  rng = np.random.default_rng(0)
  w0 = {"head": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                 "bias": np.zeros(3, np.float32)},
        "bn": {"scale": np.ones(5, np.float32)}}
  frozen = {"batch_stats": {"bn": {"mean": rng.normal(size=5),
                                   "var": rng.uniform(size=5)}},
            "params": {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}}}
  return {"w_0": w0, "w_D": jax.tree_util.tree_map(lambda a: a + 1, w0),
          "frozen": frozen}


def test_round_trip(tmp_path):
  trees = _trees()
  cfg = {"model": "resnet20", "epochs": 3, "classes": [0, 1], "lr": 1e-2}
  path = checkpoint.save(tmp_path / "a" / "m.ckpt", trees, config=cfg,
                         kind="peft")
  ck = checkpoint.load(path, expect_kind="peft")
  assert ck.kind == "peft" and ck.config == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, ck.trees,
                         jax.tree_util.tree_map(np.asarray, trees))
  # dtypes survive (float64 statistics stay float64)
  assert ck.trees["frozen"]["batch_stats"]["bn"]["mean"].dtype == np.float64
  assert ck.trees["w_0"]["head"]["kernel"].dtype == np.float32


def test_optax_state_round_trip(tmp_path):
  params = {"w": jnp.arange(3.0)}
  tx = optax.adam(1e-2)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(3)}, state, params)
  checkpoint.save(tmp_path / "s.ckpt", {"opt": state})
  ck = checkpoint.load(tmp_path / "s.ckpt")
  restored = checkpoint.restore_like(tx.init(params), ck.trees["opt"])
  assert type(restored[0]).__name__ == "ScaleByAdamState"
  np.testing.assert_array_equal(restored[0].mu["w"], state[0].mu["w"])
  assert int(restored[0].count) == 1


def test_wrong_kind_and_garbage(tmp_path):
  checkpoint.save(tmp_path / "b.ckpt", _trees(), kind="backbone")
  with pytest.raises(checkpoint.CheckpointError, match="'backbone'.*expected 'peft'"):
    checkpoint.load(tmp_path / "b.ckpt", expect_kind="peft")
  (tmp_path / "junk.ckpt").write_bytes(b"\x00\x01 not msgpack")
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.load(tmp_path / "junk.ckpt")
  data = (tmp_path / "b.ckpt").read_bytes()
  (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
  with pytest.raises(checkpoint.CheckpointError, match="truncated"):
    checkpoint.load(tmp_path / "trunc.ckpt")
  with pytest.raises(FileNotFoundError):
    checkpoint.load(tmp_path / "missing.ckpt")


def test_failed_write_keeps_last_good_file(tmp_path, monkeypatch):
  path = tmp_path / "m.ckpt"
  checkpoint.save(path, {"w": {"a": np.ones(2)}}, config={"v": 1})
  good = path.read_bytes()

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", boom)
  with pytest.raises(OSError, match="disk full"):
    checkpoint.save(path, {"w": {"a": np.zeros(2)}}, config={"v": 2})
  assert path.read_bytes() == good
  assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]  # no temp left
  with pytest.raises(ValueError, match="JSON"):
    checkpoint.save(path, {"w": {}}, config={"bad": object()})
  assert path.read_bytes() == good


def test_no_pickle_is_loaded(tmp_path):
  # A pickle file (even a harmless one) is refused, never unpickled.
  import pickle
  (tmp_path / "p.ckpt").write_bytes(pickle.dumps({"format": "x"}))
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.load(tmp_path / "p.ckpt")


def test_atomic_json(tmp_path):
  checkpoint.atomic_write_json(tmp_path / "r.json",
                               {"a": np.float32(1.5), "b": np.arange(2),
                                "p": Path("x")})
  import json
  assert json.loads((tmp_path / "r.json").read_text()) == {
      "a": 1.5, "b": [0, 1], "p": "x"}
