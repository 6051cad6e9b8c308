"""The bench: configurations, aggregation, tables, plots, the resumable runner."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from fastntk_jax import cli, methods as methods_lib

from fastntk_jax import experiments

from fastntk_jax.io import checkpoint
from fastntk_jax.experiments import config as config_lib
from fastntk_jax.experiments import report
from fastntk_jax.experiments.features import head_input_fn

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- configs
def test_every_shipped_config_resolves():
  files = sorted((ROOT / "configs").glob("*.toml"))
  assert len(files) >= 8
  names = set()
  for f in files:
    cfg = experiments.load_config(f)
    names.add(cfg["name"])
    if cfg["finetune"]["tangent"]:
      # Tangent-mode configs check Fast-NTK's exactness against Retrain only.
      assert cfg["methods"] == ["full", "retrain", "fast_ntk"], f.name
    else:
      assert cfg["methods"] == list(config_lib.METHOD_ORDER), f.name
  assert len(names) == len(files)  # distinct result directories


def test_defaults_are_filled_and_unknown_keys_named(tmp_path):
  cfg = experiments.resolve({"name": "x", "data": {"ipc": 3}})
  assert cfg["data"]["ipc"] == 3 and cfg["data"]["forget"] == "class:0"
  assert cfg["finetune"]["loss"] == "mse" and cfg["seeds"] == [0, 1, 2]
  with pytest.raises(experiments.ConfigError, match="data.ipcc"):
    experiments.resolve({"name": "x", "data": {"ipcc": 3}})
  with pytest.raises(experiments.ConfigError, match="unknown method 'foo'"):
    experiments.resolve({"name": "x", "methods": ["full", "foo"]})
  with pytest.raises(experiments.ConfigError, match="'name' is required"):
    experiments.resolve({})
  with pytest.raises(experiments.ConfigError, match="data.forget"):
    experiments.resolve({"name": "x", "data": {"forget": "klass:0"}})
  with pytest.raises(experiments.ConfigError, match="seeds"):
    experiments.resolve({"name": "x", "seeds": [0, 0]})
  with pytest.raises(experiments.ConfigError, match="model.name"):
    experiments.resolve({"name": "x", "model": {"name": "resnet19"}})
  with pytest.raises(experiments.ConfigError, match="finetune.loss"):
    experiments.resolve({"name": "x", "finetune": {"loss": "hinge"}})
  with pytest.raises(experiments.ConfigError, match="test_ipc must be >= 1"):
    experiments.resolve({"name": "x", "data": {"train_split": "test",
                                         "test_ipc": 0}})
  with pytest.raises(experiments.ConfigError, match=r"\[method.ga\].*'lr'"):
    experiments.resolve({"name": "x", "method": {"ga": {"lr": 1.0}}})
  with pytest.raises(experiments.ConfigError, match="no file"):
    experiments.load_config(tmp_path / "missing.toml")
  bad = tmp_path / "bad.toml"
  bad.write_text("name = ")
  with pytest.raises(experiments.ConfigError, match="cannot parse"):
    experiments.load_config(bad)


def test_methods_are_listed_in_table_order():
  cfg = experiments.resolve({"name": "x", "methods": ["fast_ntk", "full",
                                                "retrain"]})
  assert cfg["methods"] == ["full", "retrain", "fast_ntk"]


def test_config_hash_ignores_only_resumable_keys():
  a = experiments.resolve({"name": "x"})
  b = experiments.resolve({"name": "x", "seeds": [5], "methods": ["full"],
                     "method": {"ga": {"epochs": 3}}})
  c = experiments.resolve({"name": "x", "data": {"ipc": 7}})
  assert config_lib.config_hash(a) == config_lib.config_hash(b)
  assert config_lib.config_hash(a) != config_lib.config_hash(c)


# ------------------------------------------------------------ aggregation
def _fake_run(root, seed, method, m):
  checkpoint.atomic_write_json(
      root / "runs" / f"seed{seed}" / f"{method}.json",
      {"method": method, "seed": seed, "metrics": m, "seconds": 2.0 + seed,
       "compile_seconds": 1.0, "relearn_curve": [1.0, 0.5, 0.01]})


def test_aggregate_mean_std_and_avg_d(tmp_path):
  cfg = experiments.resolve({"name": "agg", "seeds": [0, 1],
                       "methods": ["retrain", "fast_ntk"]})
  base = {"acc_retain": 90.0, "acc_forget": 0.0, "acc_test": 80.0,
          "mia": 100.0, "relearn_epochs": 10}
  for s in (0, 1):
    _fake_run(tmp_path, s, "retrain", base)
    _fake_run(tmp_path, s, "fast_ntk",
              {**base, "acc_retain": 88.0 - 2 * s, "acc_forget": 4.0,
               "mia": 96.0, "relearn_epochs": 20 + s})
  res = report.aggregate(tmp_path, cfg, {"device": "cpu", "platform": "cpu",
                                         "versions": {"jax": jax.__version__}})
  fn = res["methods"]["fast_ntk"]
  assert fn["acc_retain"]["mean"] == pytest.approx(87.0)
  assert fn["acc_retain"]["std"] == pytest.approx(np.std([88, 86], ddof=1))
  assert fn["acc_retain"]["values"] == [88.0, 86.0]
  # Avg.D per seed: (|4-0| + |88-90| + 0 + |96-100|)/4 = 2.5, then 3.0.
  assert fn["avg_d"]["values"] == pytest.approx([2.5, 3.0])
  assert res["methods"]["retrain"]["avg_d"]["mean"] == 0.0
  assert fn["seconds"]["mean"] == pytest.approx(2.5)
  assert res["seeds"] == [0, 1]
  # 95 % CI of the mean, Student's t with 1 degree of freedom: 12.706·s/√2.
  assert fn["acc_retain"]["ci95"] == pytest.approx(12.7062047 * np.sqrt(2)
                                                   / np.sqrt(2), rel=1e-6)
  assert fn["acc_forget"]["ci95"] == 0.0
  # Paired to Retrain: per seed 88−90, 86−90.
  paired = fn["paired_to_retrain"]
  assert paired["acc_retain"]["values"] == [-2.0, -4.0]
  assert paired["acc_retain"]["mean"] == pytest.approx(-3.0)
  assert paired["relearn_epochs"]["values"] == [10.0, 11.0]
  md = report.markdown(res)
  assert "| Fast-NTK | 87.0 ± 12.7 | 4.0 ± 0.0 | 80.0 ± 0.0 |" in md
  assert "## Paired differences to Retrain" in md
  assert "| Fast-NTK | 4.0 ± 0.0 | -3.0 ± 12.7 | 0.0 ± 0.0 |" in md
  assert "| Retrain |" in md and "Avg.D" in md
  # One seed has no spread: the tables show the value alone.
  one = {**res, "seeds": [0], "methods": {
      m: {k: ({"mean": s["values"][0], "std": 0.0, "values": s["values"][:1]}
              if isinstance(s, dict) and "values" in s else s)
          for k, s in v.items()} for m, v in res["methods"].items()}}
  md1 = report.markdown(one)
  assert "| Fast-NTK | 88.0 | 4.0 | 80.0 |" in md1 and "±" not in md1.split(
      "## ")[1]
  assert "one seed" in md1
  report.write_all(tmp_path, res)
  for png in ("metrics.png", "relearn.png"):
    assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["methods"]["fast_ntk"]["avg_d"]["mean"] == pytest.approx(2.75)


def test_json_safe_turns_nan_into_null():
  out = report.json_safe({"a": float("nan"), "b": np.float32(1.5),
                          "c": np.arange(2), "d": (np.int64(3),)})
  assert out == {"a": None, "b": 1.5, "c": [0, 1], "d": [3]}
  json.dumps(out, allow_nan=False)


# --------------------------------------------------------------- features
def test_head_input_features_reproduce_the_logits():
  from fastntk_jax.models import zoo
  model = zoo.resnet_bn_head(20, seed=0)
  from fastntk_jax import peft
  variables = peft.merge(model.init_params, model.frozen)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
  f = head_input_fn(model.module)(variables, x)
  assert f.shape == (3, 64)
  head = model.init_params["params"]["head"]
  np.testing.assert_allclose(f @ head["kernel"] + head["bias"],
                             model.apply_fn(model.init_params, x),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="head='nohead'"):
    head_input_fn(model.module, head="nohead")(variables, x)


# ----------------------------------------------------------------- runner
TINY = {
    "name": "tiny", "seeds": [0],
    "methods": ["full", "retrain", "fast_ntk", "ga"],
    "data": {"source": "embedded", "ipc": 3, "test_ipc": 3},
    "finetune": {"epochs": 2, "batch_size": 10},
    "metrics": {"relearn_max_epochs": 3, "probe_epochs": 2},
    "method": {"ga": {"epochs": 1}},
}


def test_runner_end_to_end_resumes_after_a_failure(tmp_path, monkeypatch):
  cfg = experiments.resolve(TINY)
  out = tmp_path / "res"
  real = methods_lib.run_method
  calls = []

  def failing(name, problem, **kw):
    calls.append(name)
    if name == "ga":
      raise RuntimeError("interrupted")
    return real(name, problem, **kw)

  monkeypatch.setattr(methods_lib, "run_method", failing)
  with pytest.raises(RuntimeError, match="interrupted"):
    experiments.run_experiment(cfg, out, progress=False)
  assert calls == ["retrain", "full", "fast_ntk", "ga"]  # Retrain first
  assert (out / "runs" / "seed0" / "fast_ntk.json").is_file()
  assert not (out / "results.json").exists()

  calls.clear()
  monkeypatch.setattr(methods_lib, "run_method",
                      lambda name, problem, **kw: (calls.append(name),
                                                   real(name, problem,
                                                        **kw))[1])
  res = experiments.run_experiment(cfg, out, progress=False)
  assert calls == ["ga"]  # only the missing run
  # Both runs are on record, the interrupted one included: it wrote the
  # three methods before GA; the second wrote GA and the linear probe.
  sittings = json.loads((out / "sittings.json").read_text())
  assert res["sittings"] == sittings
  assert [x["completed"] for x in sittings] == [False, True]
  assert [x["records_new_or_changed"] for x in sittings] == [3, 2]
  assert all(x["wall_seconds"] > 0 and x["peak_rss_mib"] > 50
             for x in sittings)
  assert sittings[0]["started"] <= sittings[1]["started"]
  assert set(res["methods"]) == {"full", "retrain", "fast_ntk", "ga"}
  for m, r in res["methods"].items():
    for k in ("acc_retain", "acc_forget", "acc_test", "relearn_epochs", "mia",
              "kl_to_retrain", "avg_d", "seconds"):
      assert r[k]["mean"] is not None, (m, k)
  assert res["methods"]["retrain"]["kl_to_retrain"]["mean"] == 0.0
  assert res["methods"]["retrain"]["js_to_retrain"]["mean"] == 0.0
  js = res["methods"]["fast_ntk"]["js_to_retrain"]["mean"]
  assert 0.0 <= js <= np.log(2.0)
  assert "D_JS (D_f)" in (out / "table.md").read_text()
  # Relearn calibrated to w_D's own D_f loss: Full needs 0 epochs.
  assert res["methods"]["full"]["relearn_epochs"]["values"] == [0.0]
  thr = res["methods"]["full"]["relearn_threshold"]["values"][0]
  assert thr == res["methods"]["fast_ntk"]["relearn_threshold"]["values"][0]
  # The papers' attacks and the attack AUCs are measured for every method.
  for m, r in res["methods"].items():
    for k in ("mia_svc", "mia_entropy"):
      assert 0.0 <= r[k]["mean"] <= 100.0, (m, k)
    for k in ("mia_attack_auc", "mia_svc_auc", "mia_entropy_auc"):
      assert 0.0 <= r[k]["mean"] <= 1.0, (m, k)
  assert "SalUn SVC" in (out / "table.md").read_text()
  assert ("| GA | yes: K1nght/Unified-Unlearning-w-Remain-Geometry, "
          "Classification/unlearn/gradient_ascent.py |") in (
              out / "table.md").read_text()
  assert "| Fast-NTK | no released code to follow |" in (
      out / "table.md").read_text()
  assert res["methods"]["retrain"]["acc_forget"]["mean"] == pytest.approx(
      res["methods"]["retrain"]["acc_forget"]["values"][0])
  assert set(res["probe"]) == {"fast_ntk", "pretrained", "random_init"}
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["forget"]["0"]["forget_indices"] == [0, 1, 2]  # class 0
  assert manifest["train"]["num"] == 30
  # The shipped ResNet-20 was trained on CIFAR-10's train split, which TINY
  # draws D from: recorded, and said in the table.
  assert manifest["backbone"] == {"trained_on": "cifar10/train",
                                  "saw_the_pool": True}
  assert "leakage" in (out / "table.md").read_text()
  for f in ("results.json", "table.md", "metrics.png", "relearn.png",
            "config.json"):
    assert (out / f).is_file()

  # A changed hyperparameter re-runs that method only, and a method added
  # (the noise-floor Retrain) runs alone; one call checks both.
  calls.clear()
  cfg3 = experiments.resolve({**TINY, "method": {"ga": {"epochs": 2}},
                              "methods": TINY["methods"] + [
                                  "retrain_other_seed"]})
  res3 = experiments.run_experiment(cfg3, out, progress=False)
  assert sorted(calls) == ["ga", "retrain_other_seed"]
  noise = res3["methods"]["retrain_other_seed"]
  assert noise["acc_forget"]["mean"] is not None
  table = (out / "table.md").read_text()
  assert "| Retrain, other seed (noise floor) |" in table
  assert "## Paired differences to Retrain" in table
  # Another seed in the same directory extends the record instead of
  # replacing it: config, manifest and results cover seeds 0 and 1.
  calls.clear()
  res = experiments.run_experiment(experiments.resolve({**TINY, "seeds": [1],
                                            "methods": ["full"]}), out,
                             progress=False)
  assert calls == ["full"]
  assert res["seeds"] == [0, 1]
  assert res["methods"]["full"]["num_seeds"] == 2
  assert set(json.loads((out / "manifest.json").read_text())["forget"]) == {
      "0", "1"}
  assert json.loads((out / "config.json").read_text())["seeds"] == [0, 1]
  # Another configuration in the same directory is refused.
  with pytest.raises(experiments.ConfigError, match="different configuration"):
    experiments.run_experiment(experiments.resolve({**TINY, "data": {
        "source": "embedded", "ipc": 4, "test_ipc": 3}}), out, progress=False)


# About 20 s (two ResNet-20 initialisations); slow-marked to keep the default
# suite under 10 minutes. Bad Teacher's use of problem.random_init is tested on
# a small network in tests/test_methods.py.
@pytest.mark.slow
def test_random_init_teacher_is_a_fresh_network_of_the_same_architecture():
  # Bad Teacher's incompetent teacher, as the runner builds it.
  from fastntk_jax.experiments import runner
  from fastntk_jax.models import zoo
  m = experiments.resolve(TINY)["model"]
  module, variables, _ = zoo.load_backbone("resnet20", None, seed=0)
  fn, params = runner.random_init_model(m, module, 10, seed=0)
  p = params["params"]
  # Fresh BatchNorm (scale 1), unlike the pretrained backbone's.
  np.testing.assert_array_equal(np.asarray(p["bn_init"]["scale"]), 1.0)
  assert not np.allclose(np.asarray(variables["params"]["bn_init"]["scale"]),
                         1.0)
  # A head at Flax's default (LeCun normal, fan-in 64: std ~ 0.125 before
  # truncation), not the new head's 0.1 scale.
  assert 0.08 < float(np.std(np.asarray(p["head"]["kernel"]))) < 0.16
  out = np.asarray(jax.jit(fn)(params, np.full((2, 32, 32, 3), 0.1,
                                                np.float32)))
  assert out.shape == (2, 10) and np.all(np.isfinite(out))


def test_runner_refuses_a_random_backbone_unless_allowed(tmp_path):
  cfg = experiments.resolve({**TINY, "model": {"name": "mobilenetv2"}})
  with pytest.raises(experiments.ConfigError, match="require_pretrained"):
    experiments.run_experiment(cfg, tmp_path / "m", progress=False)
  assert not (tmp_path / "m").exists()  # refused before any work


def test_cli_experiment_reports_config_errors(tmp_path, capsys):
  bad = tmp_path / "c.toml"
  bad.write_text('name = "x"\n[data]\nipcc = 3\n')
  assert cli.main(["experiment", str(bad), "--out", str(tmp_path / "o")]) == 2
  assert "data.ipcc" in capsys.readouterr().err


def test_backbone_record_says_whether_the_backbone_saw_the_pool():
  def rec(**over):
    raw = {**TINY, **{k: {**TINY.get(k, {}), **v} for k, v in over.items()}}
    return config_lib.backbone_record(experiments.resolve(raw))
  assert rec() == {"trained_on": "cifar10/train", "saw_the_pool": True}
  clean = rec(data={"train_split": "test", "test_split": "test"})
  assert clean == {"trained_on": "cifar10/train", "saw_the_pool": False}
  assert rec(model={"weights": "x.ckpt"})["saw_the_pool"] is None
  assert rec(model={"name": "vit_tiny_4"}) == {"trained_on": None,
                                                "saw_the_pool": None}
  assert rec(data={"source": "folder:/tmp/x"})["saw_the_pool"] is False
  line = report._backbone_line(clean)
  assert "never saw" in line and "leakage" not in line


def test_sitting_records_each_run_counting_changed_records(tmp_path):
  from fastntk_jax.experiments.runner import Sitting  # pylint: disable=import-outside-toplevel
  runs = tmp_path / "runs" / "seed0"
  runs.mkdir(parents=True)
  (runs / "a.json").write_text("1")
  (runs / "b.json").write_text("2")
  with Sitting(tmp_path, "runs/seed*/*.json") as first:
    (runs / "a.json").write_text("1")  # rewritten unchanged: not counted
    (runs / "b.json").write_text("3")  # changed
    (runs / "c.json").write_text("4")  # new
    (runs / "c.ckpt").write_text("x")  # not a record
  assert [x["records_new_or_changed"] for x in first.sittings] == [2]
  with pytest.raises(KeyboardInterrupt):
    with Sitting(tmp_path, "runs/seed*/*.json"):
      (runs / "d.json").write_text("5")
      raise KeyboardInterrupt
  on_disk = json.loads((tmp_path / "sittings.json").read_text())
  assert [x["completed"] for x in on_disk] == [True, False]
  assert [x["records_new_or_changed"] for x in on_disk] == [2, 1]
  assert on_disk[0] == first.sittings[0]
  assert all(x["wall_seconds"] >= 0 for x in on_disk)
