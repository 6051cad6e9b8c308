"""The `fastntk` command line, end to end on the shipped data."""

import json

import numpy as np
import pytest

from fastntk_jax import cli

from fastntk_jax.io import checkpoint

from fastntk_jax.models import zoo


def run(argv, capsys=None):
  code = cli.main(argv)
  return code


def test_params_table(tmp_path, capsys):
  assert cli.main(["params", "--models", "resnet20", "mobilenetv2",
                   "vit_tiny_4", "--json", str(tmp_path / "p.json")]) == 0
  out = capsys.readouterr().out
  rows = json.loads((tmp_path / "p.json").read_text())["rows"]
  r20 = rows[0]
  # ResNet-20: BatchNorm scale+shift of 1 + 9*2 layers (16, 32, 64 channels)
  # plus a 64->10 head; every parameter: convs + BN + head.
  bn = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
  head = 64 * 10 + 10
  convs = 27 * 16 + 6 * 9 * 16 * 16 + (9 * 16 * 32 + 5 * 9 * 32 * 32) + (
      9 * 32 * 64 + 5 * 9 * 64 * 64)
  assert r20["peft_params"] == bn + head
  assert r20["total"] == convs + bn + head
  assert "| resnet20 | 32 px | BatchNorm + head | 269,722 | 2,026 |" in out
  vt = rows[2]
  assert vt["peft_params"] == 12 * 2 * 5 * 192 + 192 * 10 + 10  # L_p = 5
  for r in rows:
    assert (r["total"], r["peft_params"]) == zoo.param_counts(r["model"], num_prompts=5)


def test_evaluate_embedded_matches_direct_port(tmp_path):
  path = tmp_path / "e.json"
  assert cli.main(["evaluate", "--model", "resnet20", "--data", "embedded",
                   "--split", "test", "--json", str(path), "--quiet"]) == 0
  res = json.loads(path.read_text())
  assert res["num_samples"] == 1000
  # 80.4 % measured on this set with the port (tests/test_resnet.py).
  assert abs(res["accuracy"] - 0.804) < 0.005
  assert set(res["per_class_accuracy"]) == set(
      ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
       "horse", "ship", "truck"])
  assert res["device"] and res["versions"]["jax"]


def test_evaluate_jpeg_first_1000(shared_data, tmp_path, monkeypatch):
  monkeypatch.setenv("FASTNTK_CACHE", str(tmp_path / "cache"))
  path = tmp_path / "e.json"
  assert cli.main(["evaluate", "--model", "resnet20", "--weights",
                   str(shared_data / "weights" / "resnet20_cifar10.npz"),
                   "--data", "cifar10-jpeg", "--split", "test", "--first",
                   "1000", "--json", str(path), "--quiet"]) == 0
  # ../shared/data/README.md: 80.8 % with an independent NumPy forward pass.
  assert abs(json.loads(path.read_text())["accuracy"] - 0.808) <= 0.005
  assert cli.main(["evaluate", "--model", "resnet20", "--data",
                   "cifar10-lossless", "--first", "1000", "--json", str(path),
                   "--quiet"]) == 0
  assert abs(json.loads(path.read_text())["accuracy"] - 0.915) <= 0.003


def test_train_unlearn_evaluate_round_trip(tmp_path):
  ck, un = tmp_path / "m.ckpt", tmp_path / "u.ckpt"
  assert cli.main(["train", "--model", "resnet20", "--data", "embedded",
                   "--ipc", "8", "--test-ipc", "5", "--epochs", "15",
                   "--out", str(ck), "--json", str(tmp_path / "t.json"),
                   "--quiet"]) == 0
  c = checkpoint.load(ck, expect_kind="peft")
  assert set(c.trees) == {"w_0", "w_D", "frozen"}
  assert c.config["model"] == "resnet20" and c.config["num_classes"] == 10
  assert "batch_stats" in c.trees["frozen"]
  assert not np.allclose(c.trees["w_0"]["params"]["head"]["kernel"],
                         c.trees["w_D"]["params"]["head"]["kernel"])
  t = json.loads((tmp_path / "t.json").read_text())
  assert t["num_train"] == 80 and t["num_test"] == 50
  assert cli.main(["unlearn", "--checkpoint", str(ck), "--forget", "class:0",
                   "--out", str(un), "--json", str(tmp_path / "u.json"),
                   "--quiet"]) == 0
  u = json.loads((tmp_path / "u.json").read_text())
  assert u["diagnostics"]["num_forget"] == 8
  assert u["diagnostics"]["num_retain"] == 72
  assert u["bn_stats"] == "keep"
  assert u["before"]["forget"] >= 0.5  # learned before
  assert u["after"]["forget"] <= u["before"]["forget"] - 0.25  # forgotten
  c2 = checkpoint.load(un)
  assert set(c2.trees) == {"w_0", "w_D", "w_trained", "frozen"}
  np.testing.assert_array_equal(c2.trees["w_trained"]["params"]["head"]["kernel"],
                                c.trees["w_D"]["params"]["head"]["kernel"])
  # evaluate reads the unlearned checkpoint: same D_f accuracy as unlearn said
  ev = tmp_path / "ev.json"
  assert cli.main(["evaluate", "--checkpoint", str(un), "--data", "embedded",
                   "--split", "train", "--ipc", "8", "--json", str(ev),
                   "--quiet"]) == 0
  acc0 = json.loads(ev.read_text())["per_class_accuracy"]["airplane"]
  assert acc0 == pytest.approx(u["after"]["forget"])


# Two ResNet fine-tunings (~60 s); the tangent model itself is tested in
# test_tangent.py.
@pytest.mark.slow
def test_tangent_cross_entropy_round_trip(tmp_path):
  """train --tangent --proximal with CE; unlearn and evaluate read the
  checkpoint as the tangent model."""
  ck, un = tmp_path / "m.ckpt", tmp_path / "u.ckpt"
  assert cli.main(["train", "--model", "resnet20", "--data", "embedded",
                   "--ipc", "6", "--test-ipc", "2", "--epochs", "15",
                   "--loss", "ce", "--tangent", "--proximal", "1", "--out",
                   str(ck), "--quiet"]) == 0
  c = checkpoint.load(ck, expect_kind="peft")
  assert c.config["finetune"]["tangent"] is True
  assert c.config["finetune"]["proximal"] == 1.0
  assert cli.main(["unlearn", "--checkpoint", str(ck), "--forget", "class:0",
                   "--out", str(un), "--json", str(tmp_path / "u.json"),
                   "--quiet"]) == 0
  u = json.loads((tmp_path / "u.json").read_text())
  assert u["loss"] == "ce" and u["anchor"] == "w_0"
  assert u["diagnostics"]["converged"] and len(u["diagnostics"]["solves"]) == 2
  assert u["before"]["forget"] >= 0.5
  assert u["after"]["forget"] <= u["before"]["forget"] - 0.25
  ev = tmp_path / "ev.json"
  assert cli.main(["evaluate", "--checkpoint", str(un), "--data", "embedded",
                   "--split", "train", "--ipc", "6", "--json", str(ev),
                   "--quiet"]) == 0
  acc0 = json.loads(ev.read_text())["per_class_accuracy"]["airplane"]
  assert acc0 == pytest.approx(u["after"]["forget"])
  # Re-estimating BatchNorm statistics is refused for a tangent model.
  assert cli.main(["unlearn", "--checkpoint", str(ck), "--forget", "class:0",
                   "--bn-stats", "retain", "--quiet"]) == 2


def test_bad_inputs_are_reported_before_work(tmp_path, capsys):
  cases = [
      (["evaluate", "--model", "resnet21"], "unknown model"),
      (["evaluate", "--model", "resnet20", "--data", "embedded", "--first",
        "10"], "first"),
      (["evaluate", "--model", "resnet20", "--weights", str(tmp_path / "no.npz")],
       "no file"),
      (["evaluate", "--model", "mobilenetv2"], "no pretrained weights"),
      (["train", "--model", "resnet20", "--exclude", "klass:0", "--out",
        str(tmp_path / "x.ckpt")], "forget"),
      (["train", "--model", "resnet20", "--ipc", "0"], "--ipc"),
      (["train", "--model", "resnet20", "--proximal", "-1"], "--proximal"),
      (["train", "--model", "resnet20", "--tangent", "--bn-stats", "data"],
       "--tangent"),
      (["unlearn", "--checkpoint", str(tmp_path / "none.ckpt"), "--forget",
        "class:0"], "no checkpoint"),
  ]
  for argv, msg in cases:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err, (argv, err)


def test_pretrain_refuses_to_overwrite_and_checks_resume(tmp_path, capsys):
  out = tmp_path / "b.ckpt"
  checkpoint.save(out, {"variables": {}, "opt_state": {}},
                  config={"model": "resnet20", "data": "embedded",
                          "holdout_ipc": 50, "max_ipc": None, "seed": 0},
                  kind="backbone")
  argv = ["pretrain", "--model", "resnet20", "--data", "embedded", "--out",
          str(out), "--holdout-ipc", "50", "--epochs", "1"]
  assert cli.main(argv) == 2
  assert "--resume" in capsys.readouterr().err
  assert cli.main(argv + ["--resume", "--seed", "1"]) == 2
  assert "seed" in capsys.readouterr().err


def test_every_flag_has_help():
  import argparse
  parser = cli.build_parser()
  sub = next(a for a in parser._actions if a.dest == "command")
  todo = [(f"fastntk {n}", p) for n, p in sub.choices.items()]
  seen = 0
  while todo:
    name, p = todo.pop()
    for a in p._actions:
      if a.dest != "help":
        assert a.help, f"{name} {a.option_strings} has no help text"
      if isinstance(a, argparse._SubParsersAction):  # fastntk deletion ...
        todo += [(f"{name} {n}", q) for n, q in a.choices.items()]
    seen += 1
  assert seen >= len(sub.choices) + 6


# Three ResNet CLI runs (~45 s); bn_stats is tested directly in
# test_bn_stats.py.
@pytest.mark.slow
def test_bn_stats_data_then_retain(tmp_path):
  """Statistics estimated on D are re-estimated on D_r after unlearning."""
  from fastntk_jax import data, peft
  from fastntk_jax.training import bn_stats
  from fastntk_jax.models import zoo
  ck, un = tmp_path / "m.ckpt", tmp_path / "u.ckpt"
  assert cli.main(["train", "--model", "resnet20", "--data", "embedded",
                   "--ipc", "4", "--test-ipc", "2", "--epochs", "1",
                   "--bn-stats", "data", "--out", str(ck), "--quiet"]) == 0
  c = checkpoint.load(ck)
  _, pre, _ = zoo.load_backbone("resnet20")
  ds = data.load_dataset("embedded", "train", ipc=4)
  prep = zoo.preprocess_fn("resnet20")
  module = zoo.build("resnet20")
  on_d = bn_stats.reestimate(module, pre, ds.x, preprocess=prep)
  np.testing.assert_allclose(c.trees["frozen"]["batch_stats"]["bn_init"]["mean"],
                             on_d["bn_init"]["mean"], rtol=1e-5, atol=1e-6)
  assert cli.main(["unlearn", "--checkpoint", str(ck), "--forget", "class:1",
                   "--out", str(un), "--quiet", "--json",
                   str(tmp_path / "u.json")]) == 0
  assert json.loads((tmp_path / "u.json").read_text())["bn_stats"] == "retain"
  u = checkpoint.load(un)
  keep = ds.y != 1
  full = peft.merge(u.trees["w_D"], c.trees["frozen"])
  expect = bn_stats.reestimate(module, full, ds.x[keep], preprocess=prep)
  got = u.trees["frozen"]["batch_stats"]
  np.testing.assert_allclose(got["bn_init"]["var"], expect["bn_init"]["var"],
                             rtol=1e-4)
  assert not np.allclose(got["bn_init"]["mean"], on_d["bn_init"]["mean"])
