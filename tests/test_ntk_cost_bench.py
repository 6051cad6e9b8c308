"""benchmarks/ntk_cost.py and its report: the watchdog, OOM/timeout rows, the
skip-after-OOM sweep and the Markdown/PNG written from the JSON (no kernels)."""

import json
import signal
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))
import ntk_cost  # noqa: E402  pylint: disable=wrong-import-position
import ntk_cost_report  # noqa: E402  pylint: disable=wrong-import-position

_JOB = {"model": "resnet20", "n": 8, "pytree": "full", "implementation": 1}


def _py(code: str) -> list[str]:
  return [sys.executable, "-c", code]


# ---------------------------------------------------------------- watchdog
def test_watchdog_kills_a_child_above_the_memory_cap():
  code = ("import numpy as np, time; a = np.ones(400 * 2**20 // 8); "
          "time.sleep(60)")
  res = ntk_cost.run_watched(_py(code), mem_cap_mib=150, timeout_s=60)
  assert res.status == "oom" and res.returncode == -signal.SIGKILL
  assert res.last_rss_mib > 150 and res.max_rss_mib >= res.last_rss_mib
  assert res.seconds < 30


def test_watchdog_kills_a_child_after_the_timeout():
  res = ntk_cost.run_watched(_py("import time; time.sleep(60)"),
                             mem_cap_mib=1e6, timeout_s=0.5)
  assert res.status == "timeout" and res.seconds < 10


def test_watchdog_returns_a_finished_childs_output():
  res = ntk_cost.run_watched(_py("print('x' * 100000); print('done')"),
                             mem_cap_mib=1e6, timeout_s=60)
  assert res.status == "exited" and res.returncode == 0
  assert res.stdout.splitlines()[-1] == "done"


# ---------------------------------------------------------------- rows
def _res(status="exited", returncode=0, stdout="", stderr=""):
  return ntk_cost.ChildResult(status, returncode, stdout, stderr, 123.0,
                              456.0, 1.0)


def test_child_rows_say_what_happened():
  cap, tmo = 1024.0, 60.0
  row = ntk_cost._child_row(_JOB, _res("oom", -9), cap, tmo)
  assert row["oom"] and row["oom_source"] == "watchdog"
  assert row["mem_cap_mib"] == cap and row["last_rss_mib"] == 123.0
  row = ntk_cost._child_row(_JOB, _res("timeout", -9), cap, tmo)
  assert row["timeout"] and row["timeout_s"] == tmo
  ok = ntk_cost._ROW_TAG + json.dumps({**_JOB, "run_seconds_median": 1.5})
  row = ntk_cost._child_row(_JOB, _res(stdout="noise\n" + ok + "\n"), cap, tmo)
  assert row["run_seconds_median"] == 1.5 and row["watchdog_max_rss_mib"] == 456
  row = ntk_cost._child_row(_JOB, _res(returncode=1, stderr=(
      "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory")),
                            cap, tmo)
  assert row["oom"] and row["oom_source"] == "allocation error"
  row = ntk_cost._child_row(_JOB, _res(returncode=-9), cap, tmo)
  assert row["oom"] and row["oom_source"] == "SIGKILL (system)"
  row = ntk_cost._child_row(_JOB, _res(returncode=1, stderr="ValueError: x"),
                            cap, tmo)
  assert "oom" not in row and row["error"] == "ValueError: x"


def test_child_records_xla_resource_exhausted_as_oom(monkeypatch):
  def oom(**_):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                       "allocate 123 bytes.")
  monkeypatch.setattr(ntk_cost, "measure", oom)
  row = ntk_cost.child_main(dict(_JOB))
  assert row["oom"] and row["oom_source"] == "allocation error"
  assert "RESOURCE_EXHAUSTED" in row["error"] and row["model"] == "resnet20"

  def other(**_):
    raise RuntimeError("INVALID_ARGUMENT: shapes")
  monkeypatch.setattr(ntk_cost, "measure", other)
  with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
    ntk_cost.child_main(dict(_JOB))


def test_ratio_is_full_over_peft():
  peft = {**_JOB, "pytree": "peft", "num_params": 10, "run_seconds_median": 2.0,
          "compile_seconds": 1.0, "memory_mib": 100.0}
  full = {**_JOB, "num_params": 1000, "run_seconds_median": 8.0,
          "compile_seconds": 3.0, "memory_mib": 400.0}
  r = ntk_cost.ratio(peft, full)
  assert r["params_ratio"] == 100 and r["peft_percent"] == 1
  assert r["speed_ratio"] == 4 and r["memory_ratio"] == 4
  assert "speed_ratio" not in ntk_cost.ratio(peft, {**_JOB, "oom": True,
                                                   "num_params": 1000})


def test_quick_and_defaults():
  a = ntk_cost.parse_args(["--quick"])
  assert a.models == list(ntk_cost.QUICK_MODELS) and a.n == [16]
  assert a.repeats == 1
  a = ntk_cost.parse_args([])
  assert a.models == list(ntk_cost.MODELS) and a.mem_cap_gib == 20
  with pytest.raises(SystemExit):
    ntk_cost.parse_args(["--models", "resnet19"])


# ---------------------------------------------------------------- sweep
def _fake_measure(args, env, job):
  """PEFT always runs; the full kernel runs out of memory from N = 32."""
  del args, env
  p = 1000 if job["pytree"] == "full" else 10
  if job["pytree"] == "full" and job["n"] >= 32:
    return {**job, "oom": True, "oom_source": "watchdog", "mem_cap_mib": 512.0,
            "last_rss_mib": 600.0}
  return {**job, "num_params": p, "num_params_total": 1000,
          "run_seconds_median": 0.01 * p * job["n"], "compile_seconds": 1.0,
          "memory_mib": 0.1 * p * job["n"], "symmetric_rel": 0.0,
          "diag_vs_vjp_rel": 1e-7, "finite": True,
          "jacobian_mib": job["n"] * 10 * p * 4 / 2**20}


@pytest.fixture
def swept(monkeypatch, tmp_path):
  probe = {"device": "cpu: cpu", "platform_name": "cpu", "device_kind": "cpu",
           "versions": {"jax": "x"},
           "param_counts": {"resnet20": {"total": 1000, "peft": 10}}}
  monkeypatch.setattr(ntk_cost, "_run_probe", lambda a, e: dict(probe))
  monkeypatch.setattr(ntk_cost, "_measure_one", _fake_measure)
  out = tmp_path / "r.json"
  args = ntk_cost.parse_args(["--models", "resnet20", "--n", "64", "16", "32",
                              "--out", str(out), "--mem-cap-gib", "0.5"])
  ntk_cost.sweep(args)
  return out


def test_sweep_skips_larger_n_after_oom_and_writes_json(swept):
  result = json.loads(swept.read_text())
  rows = {(r["n"], r["pytree"]): r for r in result["rows"]}
  assert [r["n"] for r in result["rows"]] == [16, 16, 32, 32, 64, 64]
  assert rows[(32, "full")]["oom"] and rows[(64, "full")]["skipped_after_oom"]
  assert "run_seconds_median" in rows[(64, "peft")]
  # Counts and the Jacobian size come from the probe where the child had none.
  assert rows[(64, "full")]["num_params"] == 1000
  assert rows[(64, "full")]["jacobian_mib"] == pytest.approx(
      64 * 10 * 1000 * 4 / 2**20)
  assert result["ratios"][0]["speed_ratio"] == pytest.approx(100)
  assert result["config"]["mem_cap_gib"] == 0.5 and "finished" in result
  assert "random" in result["config"]["weights"]
  lim = {l["pytree"]: l for l in result["limits"]}
  assert lim["full"]["largest_n_ok"] == 16 and lim["full"]["first_n_failed"] == 32
  assert lim["full"]["failure"] == "oom"
  assert lim["peft"]["largest_n_ok"] == 64 and lim["peft"]["first_n_failed"] is None


def test_report_is_written_from_the_json(swept, tmp_path):
  md, png = tmp_path / "t.md", tmp_path / "p.png"
  ntk_cost_report.main([str(swept), "--md", str(md), "--png", str(png)])
  text = md.read_text()
  assert "Measured on **cpu: cpu" in text
  assert "OOM (RSS > 0.5 GiB)" in text and "skipped (after OOM)" in text
  assert "| resnet20 | 1 | 64 | none | 16 | 32: OOM (RSS > 0.5 GiB) |" in text
  # Growth in N: PEFT time and memory both ∝ N in the fake sweep; the full
  # kernel ran at one N only, so no exponent.
  assert "| 1.00, 1.00 | –, – |" in text
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- limit search
def _capped_measure(limit_peft, limit_full):
  """A fake child: memory 1 MiB a sample (1000 for full), OOM above the
  given largest N; time ∝ N² (PEFT) and N (full)."""
  def measure(args, env, job):
    del args, env
    lim = limit_peft if job["pytree"] == "peft" else limit_full
    if job["n"] > lim:
      return {**job, "oom": True, "oom_source": "watchdog"}
    per = 1.0 if job["pytree"] == "peft" else 1000.0
    t = 1e-4 * job["n"] ** 2 if job["pytree"] == "peft" else 0.01 * job["n"]
    return {**job, "num_params": 10, "run_seconds_median": t,
            "compile_seconds": 1.0, "memory_mib": per * job["n"]}
  return measure


def test_find_limit_doubles_then_bisects_to_the_resolution(monkeypatch,
                                                           tmp_path):
  probe = {"device": "cpu: cpu", "platform_name": "cpu", "device_kind": "cpu",
           "versions": {"jax": "x"},
           "param_counts": {"resnet20": {"total": 1000, "peft": 10}}}
  monkeypatch.setattr(ntk_cost, "_run_probe", lambda a, e: dict(probe))
  monkeypatch.setattr(ntk_cost, "_measure_one", _capped_measure(700, 40))
  out = tmp_path / "r.json"
  args = ntk_cost.parse_args(["--models", "resnet20", "--n", "16", "32",
                              "--out", str(out), "--find-limit",
                              "--limit-resolution", "1.1"])
  result = ntk_cost.sweep(args)
  lim = {l["pytree"]: l for l in result["limits"]}
  for pytree, true in (("peft", 700), ("full", 40)):
    ok, bad = lim[pytree]["largest_n_ok"], lim[pytree]["first_n_failed"]
    assert ok <= true < bad and bad <= 1.1 * ok, (pytree, ok, bad)
  peft_ns = [r["n"] for r in result["rows"]
             if r["pytree"] == "peft" and r.get("search")]
  assert peft_ns[:5] == [64, 128, 256, 512, 1024]  # doubling first
  assert lim["peft"]["time_exponent"] == pytest.approx(2.0)
  assert lim["full"]["time_exponent"] == pytest.approx(1.0)
  assert lim["peft"]["memory_exponent"] == pytest.approx(1.0)
  assert json.loads(out.read_text())["config"]["find_limit"]["resolution"] \
      == 1.1


def test_find_limit_stops_at_max_n_and_without_a_base(monkeypatch, tmp_path):
  probe = {"device": "cpu: cpu", "platform_name": "cpu", "device_kind": "cpu",
           "versions": {"jax": "x"},
           "param_counts": {"resnet20": {"total": 1000, "peft": 10}}}
  monkeypatch.setattr(ntk_cost, "_run_probe", lambda a, e: dict(probe))
  monkeypatch.setattr(ntk_cost, "_measure_one", _capped_measure(10**9, 8))
  args = ntk_cost.parse_args(["--models", "resnet20", "--n", "16",
                              "--out", str(tmp_path / "r.json"),
                              "--find-limit", "--max-n", "100"])
  result = ntk_cost.sweep(args)
  peft = [r["n"] for r in result["rows"] if r["pytree"] == "peft"]
  assert peft == [16, 32, 64, 100]
  # The full kernel failed at the first N: nothing to search from.
  assert [r["n"] for r in result["rows"] if r["pytree"] == "full"] == [16]
  with pytest.raises(SystemExit):
    ntk_cost.parse_args(["--find-limit", "--limit-resolution", "1"])


def _linear_kernel(n=4, d=3, c=2, seed=0):
  """A linear model f(w, x) = x @ w and its exact NTK, (N·C) × (N·C),
  sample-major: Θ[(a, i), (b, j)] = (x_a · x_b) δ_ij."""
  import numpy as np
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(d, c)).astype(np.float32)
  k = np.kron(x @ x.T, np.eye(c)).astype(np.float32)
  return (lambda p, xs: xs @ p), w, x, k


@pytest.mark.parametrize("rows", [1, 3, 512])
def test_check_reads_the_kernel_in_row_blocks_with_whole_kernel_answers(rows):
  import numpy as np
  apply_fn, w, x, k = _linear_kernel()
  ok = ntk_cost._check(apply_fn, w, x, k, 2, rows=rows)
  assert ok["finite"] and ok["symmetric_max_abs"] == 0.0
  np.testing.assert_allclose(ok["kernel_trace"], np.trace(k), rtol=1e-6)
  np.testing.assert_allclose(ok["kernel_max_abs"], np.abs(k).max(), rtol=1e-6)
  assert ok["diag_vs_vjp_rel"] < 1e-6
  bad = k.copy()
  bad[6, 1] += 0.25  # below the diagonal, across row blocks of 3
  got = ntk_cost._check(apply_fn, w, x, bad, 2, rows=rows)
  np.testing.assert_allclose(got["symmetric_max_abs"], 0.25, rtol=1e-5)
  wrong_diag = k.copy()
  wrong_diag[1, 1] *= 2.0
  got = ntk_cost._check(apply_fn, w, x, wrong_diag, 2, rows=rows)
  np.testing.assert_allclose(got["diag_vs_vjp_rel"], 1.0, rtol=1e-5)
  nan = k.copy()
  nan[7, 7] = np.nan
  got = ntk_cost._check(apply_fn, w, x, nan, 2, rows=rows)
  assert not got["finite"] and np.isnan(got["kernel_max_abs"])


def test_report_orders_each_models_rows_by_n():
  rows = [{"model": m, "n": n, "implementation": 1, "pytree": t}
          for m, n, t in [("b", 64, "peft"), ("a", 256, "peft"),
                          ("a", 2048, "peft"), ("a", 512, "full"),
                          ("a", 1024, "peft"), ("a", 512, "peft")]]
  keys = list(ntk_cost_report._pairs(rows))
  assert keys == [("b", 64, 1), ("a", 256, 1), ("a", 512, 1), ("a", 1024, 1),
                  ("a", 2048, 1)]
  assert set(ntk_cost_report._pairs(rows)[("a", 512, 1)]) == {"peft", "full"}
