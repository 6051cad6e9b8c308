"""benchmarks/forget_score.py end to end on a tiny configuration: M models a
side, the scores computed from the stored per-model confidences, resume."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))
import forget_score as bench  # noqa: E402  pylint: disable=wrong-import-position

from fastntk_jax.evaluation import forget_score as fs


# About 25 s (three pipelines of ResNet-20 fine-tuning and Retrain); slow-marked
# to keep the default suite under 10 minutes. The score itself is tested on
# hand-made cases in tests/test_forget_score.py.
@pytest.mark.slow
def test_forget_score_bench_tiny(tmp_path):
  cfg = tmp_path / "tiny.toml"
  cfg.write_text('name = "tiny"\nseeds = [0]\n[data]\nsource = "embedded"\n'
                 'train_split = "test"\ntest_split = "test"\nipc = 3\n'
                 'test_ipc = 3\n[finetune]\nepochs = 1\nbatch_size = 30\n')
  out = tmp_path / "fs.json"
  res = bench.run(str(cfg), 3, ["full", "retrain_other_seed"], out, 200)
  assert res["models_per_side"] == 3
  recs = [json.loads((tmp_path / "fs" / f"model{k}.json").read_text())
          for k in range(3)]
  # The scores are the library's, from the stored confidences.
  ref = np.asarray([r["retrain"]["confidence"] for r in recs])
  for name in ("full", "retrain_other_seed"):
    u = np.asarray([r[name]["confidence"] for r in recs])
    want = fs.forget_score(u, ref).score
    got = res["scores"][name]
    assert got["forget_score"] == pytest.approx(want)
    ra = np.mean([r[name]["acc_retain"] for r in recs])
    ra_r = np.mean([r["retrain"]["acc_retain"] for r in recs])
    ta = np.mean([r[name]["acc_test"] for r in recs])
    ta_r = np.mean([r["retrain"]["acc_test"] for r in recs])
    assert got["final_score"] == pytest.approx(want * ra / ra_r * ta / ta_r)
  assert len(recs[0]["full"]["confidence"]) == 3  # class 0, 3 images
  # Resumed: the stored models are not recomputed.
  stamps = [(tmp_path / "fs" / f"model{k}.json").stat().st_mtime_ns
            for k in range(3)]
  again = bench.run(str(cfg), 3, ["full", "retrain_other_seed"], out, 200)
  assert again["scores"] == res["scores"]
  # The rescoring run keeps the first run's record of what it computed.
  assert again["sittings"][0] == res["sittings"][0]
  assert [x["records_new_or_changed"] for x in again["sittings"]] == [3, 0]
  assert res["computed_this_run"] == ["retrain", "full", "retrain_other_seed"]
  assert again["computed_this_run"] == []
  assert stamps == [(tmp_path / "fs" / f"model{k}.json").stat().st_mtime_ns
                    for k in range(3)]
  # A second run with another method extends the same records: the stored
  # methods are kept as they were, and the result scores all of them.
  more = bench.run(str(cfg), 3, ["ga"], out, 200)
  recs2 = [json.loads((tmp_path / "fs" / f"model{k}.json").read_text())
           for k in range(3)]
  for r, r2 in zip(recs, recs2):
    assert {k: v for k, v in r2.items() if k != "ga"} == r
    assert len(r2["ga"]["confidence"]) == 3
  assert more["methods"] == ["full", "retrain", "retrain_other_seed", "ga"]
  assert more["computed_this_run"] == ["ga"]  # retrain was there
  # Records of another configuration are refused before any work.
  cfg.write_text(cfg.read_text().replace("epochs = 1", "epochs = 2"))
  with pytest.raises(ValueError, match="another configuration"):
    bench.run(str(cfg), 3, ["ga"], out, 200)
  # ... and leave no run on their record: the three runs above only.
  assert len(json.loads((tmp_path / "fs" / "sittings.json").read_text())) == 3
  for name in ("full", "retrain_other_seed"):
    assert more["scores"][name] == res["scores"][name]
  u = np.asarray([r["ga"]["confidence"] for r in recs2])
  assert more["scores"]["ga"]["forget_score"] == pytest.approx(
      fs.forget_score(u, ref).score)


def test_scores_report_the_confidence_gap_to_retrain():
  """The result's confidence_gap is the library's, per method, from the
  stored confidences (no model is run)."""
  rng = np.random.default_rng(0)
  ref = rng.normal(-2.3, 0.03, (4, 5))
  far = ref + 0.5
  recs = [{"retrain": {"confidence": ref[k].tolist(), "acc_retain": 0.9,
                       "acc_test": 0.7, "acc_forget": 0.0, "seconds": 1.0},
           "fast_ntk": {"confidence": far[k].tolist(), "acc_retain": 0.9,
                        "acc_test": 0.7, "acc_forget": 0.0, "seconds": 1.0}}
          for k in range(4)]
  got = bench._scores(recs, ["retrain", "fast_ntk"])  # pylint: disable=protected-access
  assert set(got) == {"fast_ntk"}
  want = fs.confidence_gap(far, ref)._asdict()
  assert got["fast_ntk"]["confidence_gap"] == pytest.approx(want)
  assert got["fast_ntk"]["confidence_gap"]["mean_difference"] == (
      pytest.approx(0.5))

