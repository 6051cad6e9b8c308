"""The tuning protocol: disjoint validation data, equal budgets, the fixed
criterion, resumable runs, and the chosen values read back by configs."""

import hashlib
import json

import numpy as np
import pytest

from fastntk_jax import experiments
from fastntk_jax.experiments import runner
from fastntk_jax.experiments import tuning
from fastntk_jax.experiments.config import ConfigError


def _digests(x):
  return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest()
          for im in x}


def _cfg(**data):
  return experiments.resolve({
      "name": "t", "seeds": [0, 1], "methods": ["full", "retrain", "fast_ntk"],
      "data": {"source": "embedded", "ipc": 5, "test_ipc": 5, **data},
      "finetune": {"epochs": 1, "batch_size": 50}})


@pytest.mark.parametrize("layout", ["one_split", "two_splits"])
def test_validation_images_are_disjoint_from_every_evaluation_image(layout):
  split = ({"train_split": "test", "test_split": "test"}
           if layout == "one_split" else {})
  cfg = _cfg(**split)
  x_tr, _, x_te, _, _, _ = runner.load_data(cfg)
  vx_tr, vy_tr, vx_te, vy_te, _, _ = runner.load_data(
      tuning.validation_config(cfg))
  used = _digests(x_tr) | _digests(x_te)
  val = _digests(vx_tr) | _digests(vx_te)
  assert len(val) == len(vx_tr) + len(vx_te)  # no image twice
  assert not used & val
  assert np.bincount(vy_tr).tolist() == [5] * 10
  assert np.bincount(vy_te).tolist() == [5] * 10
  if layout == "two_splits":  # no image of the test split at all
    v = tuning.validation_config(cfg)
    assert v["data"]["train_split"] == v["data"]["test_split"] == "train"


def test_every_method_gets_the_same_budget():
  for m, g in tuning.GRIDS.items():
    trials = tuning.grid(m)
    assert len(trials) == tuning.TRIALS, m
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == len(trials)


def test_tuning_seeds_must_not_be_reported_seeds():
  cfg = _cfg()
  cfg["tune"]["seeds"] = [1]
  with pytest.raises(ConfigError, match="tune.seeds"):
    tuning.validation_config(cfg)
  with pytest.raises(ConfigError, match="tune.seeds"):
    experiments.resolve({"name": "t", "tune": {"seeds": []}})


# About 35 s (ResNet-20 fine-tuning, the reference Retrain and six trials);
# slow-marked to keep the default suite under 10 minutes. The protocol's parts
# (disjoint validation data, equal budgets, seed checks, the tuned-file
# errors) are tested by default above and below.
@pytest.mark.slow
def test_tune_picks_the_smallest_validation_gap_and_resumes(tmp_path, capsys):
  cfg = _cfg(train_split="test", test_split="test")
  cfg["tune"]["methods"] = ["max_loss"]
  out = tmp_path / "tune"
  lines = []
  # Through the command line: `fastntk tune CONFIG --write PATH`.
  path = tmp_path / "t.toml"
  path.write_text('name = "t"\nseeds = [0, 1]\nmethods = ["full", "retrain", '
                  '"fast_ntk"]\n[data]\nsource = "embedded"\nipc = 5\n'
                  'test_ipc = 5\ntrain_split = "test"\ntest_split = "test"\n'
                  '[finetune]\nepochs = 1\nbatch_size = 50\n')
  from fastntk_jax.cli import main
  assert main(["tune", str(path), "--out", str(out), "--methods", "max_loss",
               "--write", str(tmp_path / "tuned" / "t.toml"), "--quiet"]) == 0
  assert "max_loss: {'learning_rate':" in capsys.readouterr().out
  rec = json.loads((out / "tuning.json").read_text())
  assert (tmp_path / "tuned" / "t.toml").read_text() == (
      out / "chosen.toml").read_text()
  assert json.loads((tmp_path / "tuned" / "t.json").read_text()) == rec
  gaps = [t["avg_d"] for t in rec["trials"]["max_loss"]]
  assert len(gaps) == tuning.TRIALS
  best = tuning.grid("max_loss")[int(np.argmin(gaps))]
  assert rec["chosen"] == {"max_loss": best}
  # Resumed: no trial is run again (the files are not rewritten).
  stamps = {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("*.json")}
  rec2 = tuning.tune(cfg, out, log=lines.append)
  assert rec2["chosen"] == rec["chosen"]
  # Both runs are on record: the first wrote the six trials, the second none.
  assert [x["records_new_or_changed"] for x in rec2["sittings"]] == [6, 0]
  assert rec2["sittings"][0] == rec["sittings"][0]
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
  # The chosen values are what a config naming them runs with.
  (tmp_path / "chosen.toml").write_text((out / "chosen.toml").read_text())
  (tmp_path / "exp.toml").write_text(
      'name = "e"\ntuned = "chosen.toml"\n[method.ga]\nepochs = 3\n')
  loaded = experiments.load_config(tmp_path / "exp.toml")
  assert loaded["method"]["max_loss"] == best
  assert loaded["method"]["ga"] == {"epochs": 3}
  # Another configuration in the same directory is refused.
  other = _cfg(train_split="test", test_split="test", ipc=4)
  with pytest.raises(ConfigError, match="another configuration"):
    tuning.tune(other, out)


def test_a_diverged_trial_ranks_last_instead_of_stopping_the_run(monkeypatch):
  """SFR-on at lr 0.03 × 1,500 steps diverged on the CE protocol: its NaN
  logits must make that trial lose, not end the tuning run."""
  import types
  from fastntk_jax.evaluation import mia
  from fastntk_jax.experiments import report

  class Fake:
    def __init__(self, seed):
      self.seed, self.problem, self.reference = seed, None, {"acc_forget": 0.0}

    def evaluate(self, params):
      if not np.isfinite(params):
        mia.output_features(np.array([[np.nan, 0.0]]), np.array([0]))
      return {"acc_forget": params}

  monkeypatch.setattr(tuning.methods_lib, "run_method", lambda m, prob, seed,
                      **hp: types.SimpleNamespace(params=hp["x"], seconds=0.0))
  monkeypatch.setattr(tuning, "_GAP_KEYS", ("acc_forget",))
  recs = [report.json_safe(tuning._run_trial([Fake(0), Fake(1)], "m",
                                             {"x": x}))
          for x in (3.0, float("nan"), 1.0)]
  assert recs[1]["avg_d"] is None
  assert "logits contain NaN or inf" in recs[1]["per_seed"][0]["diverged"]
  assert recs[0]["avg_d"] == pytest.approx(3.0)
  assert tuning._best(recs) == 2


def test_missing_tuned_file_names_the_fix(tmp_path):
  (tmp_path / "exp.toml").write_text('name = "e"\ntuned = "nope.toml"\n')
  with pytest.raises(ConfigError, match="fastntk tune"):
    experiments.load_config(tmp_path / "exp.toml")
