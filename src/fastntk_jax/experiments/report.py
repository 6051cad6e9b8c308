"""Aggregation of an experiment's runs: ``results.json``, tables, plots.

Each metric is reported over seeds as its mean, sample standard deviation
(``ddof=1``) and the half-width of the 95 % confidence interval of the mean
(Student's t with n − 1 degrees of freedom), with the per-seed values kept;
the tables show mean ± that half-width. Gaps to Retrain are also reported as
paired differences: per seed, method minus that seed's Retrain, then mean
± 95 % CI over seeds. Avg.D (SFR-on paper) is computed per seed against that
seed's Retrain, then averaged. The ``retrain_other_seed`` row is Retrain with
another recipe seed: its gaps are the noise floor, the size of a difference
that two equally good unlearned models show. Accuracies and MIA are in
percent, KL and JS in nats, times in seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from fastntk_jax import methods as methods_lib
from fastntk_jax.io import atomic
from fastntk_jax.evaluation import metrics
from fastntk_jax.experiments.config import METHOD_ORDER

__all__ = ["DISPLAY", "METRICS", "aggregate", "json_safe", "markdown",
           "write_all"]

DISPLAY = {"full": "Full", "retrain": "Retrain",
           "retrain_other_seed": "Retrain, other seed (noise floor)",
           "fast_ntk": "Fast-NTK",
           "max_loss": "Max Loss", "random_label": "Random Label",
           "ft": "FT", "ga": "GA", "salun": "SalUn",
           "bad_teacher": "Bad Teacher", "scrub": "SCRUB", "sfr_on": "SFR-on"}

#: Metrics aggregated per method (those a run lacks are left out).
METRICS = ("acc_retain", "acc_forget", "acc_test", "acc_test_retained",
           "acc_test_forgotten", "relearn_epochs", "relearn_threshold", "mia", "mia_auc",
           "mia_attack_accuracy", "mia_attack_auc", "mia_svc", "mia_svc_auc",
           "mia_entropy", "mia_entropy_auc", "kl_to_retrain", "kl_to_retrain_test",
           "js_to_retrain", "avg_d", "seconds", "compile_seconds")

_AVG_D_KEYS = ("acc_forget", "acc_retain", "acc_test", "mia")
#: Metrics whose paired difference to Retrain is reported.
PAIRED_KEYS = ("acc_forget", "acc_retain", "acc_test", "mia", "mia_svc",
               "mia_entropy", "relearn_epochs")


def json_safe(obj):
  """NaN/inf become None (strict JSON); numpy scalars become Python ones."""
  if isinstance(obj, dict):
    return {str(k): json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return json_safe(obj.tolist())
  if isinstance(obj, (np.floating, float)):
    f = float(obj)
    return f if math.isfinite(f) else None
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj



def ci95_halfwidth(values) -> float | None:
  """Half-width of the 95 % confidence interval of the mean of ``values``:
  ``t_{0.975, n−1} · s / √n`` (s: sample std). None for fewer than 2."""
  v = np.asarray(values, float)
  if v.size < 2:
    return None
  t = float(scipy_stats.t.ppf(0.975, v.size - 1))
  return t * float(np.std(v, ddof=1)) / math.sqrt(v.size)


def _stats(values: list[float]) -> dict[str, Any]:
  v = np.asarray([np.nan if x is None else x for x in values], float)
  ok = v[np.isfinite(v)]
  if ok.size == 0:
    return {"mean": None, "std": None, "ci95": None, "n": 0,
            "values": [None] * len(v)}
  std = float(np.std(ok, ddof=1)) if ok.size > 1 else 0.0
  return {"mean": float(np.mean(ok)), "std": std, "ci95": ci95_halfwidth(ok),
          "n": int(ok.size),
          "values": [float(x) if math.isfinite(x) else None for x in v]}


def _paired(runs: dict, method: str, seeds) -> dict[str, dict]:
  """Per-seed ``method − retrain`` for :data:`PAIRED_KEYS`, with stats."""
  out = {}
  for k in PAIRED_KEYS:
    diffs = []
    for s in seeds:
      a, b = runs[s].get(method), runs[s].get("retrain")
      va = None if a is None else a["metrics"].get(k)
      vb = None if b is None else b["metrics"].get(k)
      if va is not None and vb is not None:
        diffs.append(float(va) - float(vb))
    if diffs:
      out[k] = _stats(diffs)
  return out


def _load(path: Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def aggregate(out: str | Path, cfg: dict, env: dict) -> dict:
  """Collects ``OUT/runs/seed*/*.json`` into the ``results.json`` record."""
  out = Path(out)
  runs = {s: {m: _load(out / "runs" / f"seed{s}" / f"{m}.json")
              for m in cfg["methods"]} for s in cfg["seeds"]}
  methods: dict[str, dict] = {}
  curves: dict[str, list] = {}
  for m in cfg["methods"]:
    per_metric: dict[str, list] = {}
    curves[m] = []
    for s in cfg["seeds"]:
      run = runs[s][m]
      if run is None:
        continue
      vals = dict(run["metrics"])
      vals["seconds"] = run["seconds"]
      vals["compile_seconds"] = run["compile_seconds"]
      ref = runs[s].get("retrain")
      if ref is not None and all(vals.get(k) is not None
                                 and ref["metrics"].get(k) is not None
                                 for k in _AVG_D_KEYS):
        vals["avg_d"] = metrics.avg_gap(vals, ref["metrics"], keys=_AVG_D_KEYS)
      for k in METRICS:
        if k in vals:
          per_metric.setdefault(k, []).append(vals[k])
      curves[m].append(run.get("relearn_curve"))
    methods[m] = {k: _stats(v) for k, v in per_metric.items()}
    methods[m]["num_seeds"] = len(curves[m])
    methods[m]["paired_to_retrain"] = _paired(runs, m, cfg["seeds"])
  probes = [_load(out / "runs" / f"seed{s}" / "probe.json")
            for s in cfg["seeds"]]
  probe = {}
  for p in probes:
    for backbone, vals in (p or {}).items():
      for k, v in vals.items():
        probe.setdefault(backbone, {}).setdefault(k, []).append(v)
  probe = {b: {k: _stats(v) for k, v in d.items()} for b, d in probe.items()}
  return {"config": {k: v for k, v in cfg.items() if not k.startswith("_")},
          "seeds": list(cfg["seeds"]), "methods": methods, "probe": probe,
          "relearn_curves": curves,
          "units": {"acc_*": "%", "mia": "% of D_f predicted non-member",
                    "mia_auc": "AUC", "kl_*": "nats", "js_*": "nats", "seconds": "s"},
          **env}


def _fmt(stat: dict | None, digits: int = 1, gap: float | None = None) -> str:
  if not stat or stat.get("mean") is None:
    return "–"
  values = [v for v in stat.get("values", []) if v is not None]
  half = stat.get("ci95")
  if len(values) < 2 or half is None:  # one seed: no interval to report
    s = f"{stat['mean']:.{digits}f}"
  else:
    s = f"{stat['mean']:.{digits}f} ± {half:.{digits}f}"
  if gap is not None and math.isfinite(gap):
    s += f" ({gap:.{digits}f})"
  return s


def _backbone_line(rec: dict | None) -> str:
  if not rec or rec.get("trained_on") is None:
    return ("Backbone: what it was trained on is not recorded, so whether it "
            "saw D is unknown.")
  if rec.get("saw_the_pool"):
    return (f"Backbone trained on {rec['trained_on']}, **the pool D is drawn "
            "from**: membership and relearn metrics are measured on images "
            "the frozen backbone memorised (leakage).")
  return (f"Backbone trained on {rec['trained_on']}; D is drawn from data it "
          "never saw.")


def markdown(results: dict) -> str:
  """The papers' layouts: Fast-NTK Table I, SFR-on Table 1, Fast-NTK Table III."""
  cfg, meth = results["config"], results["methods"]
  order = [m for m in METHOD_ORDER if m in meth]
  # Fast-NTK's own rows first, as in its Table I.
  paper = ["full", "retrain", "max_loss", "random_label", "fast_ntk"]
  order_a = [m for m in paper if m in meth] + [m for m in order
                                               if m not in paper]
  d, mo = cfg["data"], cfg["model"]
  lines = [f"# {cfg['name']}", ""]
  if cfg.get("description"):
    lines += [cfg["description"], ""]
  lines += [
      f"Model {mo['name']} (PEFT: {mo['peft']}), data {d['source']} "
      f"({d['ipc']} training images a class, test_ipc {d['test_ipc'] or 'all'}),"
      f" forget `{d['forget']}`, fine-tuning loss {cfg['finetune']['loss']}, "
      f"{cfg['finetune']['epochs']} epochs. Seeds {results['seeds']}; "
      + ("mean ± 95 % CI half-width over seeds (Student's t)"
         if len(results["seeds"]) > 1
         else "one seed, so no spread") + f". Device: {results.get('device')} "
      f"({results.get('platform')}), JAX {results['versions']['jax']}.", ""]
  lines += [_backbone_line(results.get("backbone")), ""]
  cls = "acc_test_forgotten" in meth.get(order[0], {})
  head = "| Method | D_r ↑ | D_f | Test ↑ |"
  sep = "|---|---|---|---|"
  if cls:
    head += " Test, retained classes | Test, forgotten classes |"
    sep += "---|---|"
  head += " Relearn (epochs) |"
  sep += "---|"
  lines += ["## Fast-NTK paper layout (Table I): accuracy (%) and relearn time",
            "", head, sep]
  for m in order_a:
    r = meth[m]
    row = (f"| {DISPLAY[m]} | {_fmt(r.get('acc_retain'))} | "
           f"{_fmt(r.get('acc_forget'))} | {_fmt(r.get('acc_test'))} |")
    if cls:
      row += (f" {_fmt(r.get('acc_test_retained'))} | "
              f"{_fmt(r.get('acc_test_forgotten'))} |")
    row += f" {_fmt(r.get('relearn_epochs'))} |"
    lines.append(row)
  lines += ["", "## SFR-on paper layout: FA/RA/TA/MIA (%) with the gap to "
            "Retrain in brackets, Avg.D, KL and JS to Retrain (nats), runtime "
            "(s)", "",
            "| Method | FA | RA | TA | MIA | Avg.D ↓ | D_KL (D_f) ↓ | "
            "D_KL (test) ↓ | D_JS (D_f) ↓ | loss-AUC (D_f) | RTE (s) | "
            "of which compile |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  ref = meth.get("retrain", {})
  gap = lambda r, k: (abs(r[k]["mean"] - ref[k]["mean"])
                      if r.get(k, {}).get("mean") is not None
                      and ref.get(k, {}).get("mean") is not None else None)
  for m in order:
    r = meth[m]
    lines.append(
        f"| {DISPLAY[m]} | {_fmt(r.get('acc_forget'), 1, gap(r, 'acc_forget'))}"
        f" | {_fmt(r.get('acc_retain'), 1, gap(r, 'acc_retain'))} | "
        f"{_fmt(r.get('acc_test'), 1, gap(r, 'acc_test'))} | "
        f"{_fmt(r.get('mia'), 1, gap(r, 'mia'))} | {_fmt(r.get('avg_d'))} | "
        f"{_fmt(r.get('kl_to_retrain'), 3)} | "
        f"{_fmt(r.get('kl_to_retrain_test'), 3)} | "
        f"{_fmt(r.get('js_to_retrain'), 3)} | {_fmt(r.get('mia_auc'), 3)}"
        f" | {_fmt(r.get('seconds'))} | {_fmt(r.get('compile_seconds'))} |")
  lines += (_mia_table(meth, order) + _paired_table(meth, order)
            + _reference_table(order))
  if results.get("probe"):
    lines += ["", "## Linear-probe risk analysis (Fast-NTK Table III): a linear "
              "head trained on D on frozen features, accuracy (%)", "",
              "| Backbone | D_r | D_f |", "|---|---|---|"]
    names = {"fast_ntk": "Fast-NTK (unlearned)", "pretrained": "Pre-Trained",
             "random_init": "Random-Init"}
    for b, r in results["probe"].items():
      lines.append(f"| {names.get(b, b)} | {_fmt(r.get('acc_retain'))} | "
                   f"{_fmt(r.get('acc_forget'))} |")
  lines += _footnote(cfg)
  return "\n".join(lines)


def _footnote(cfg: dict) -> list[str]:
  thr = cfg.get("metrics", {}).get("relearn_threshold")
  return ["", "MIA: share of D_f that an attack trained to tell D_r from "
            "held-out images (confidence, entropy, modified entropy; logistic "
            "regression) calls non-member. loss-AUC: AUC of the loss-threshold "
            "attack, D_f against held-out images of its classes (0.5 = looks "
            "unseen). RTE includes preparation and compilation. Relearn: "
            + ("epochs of the recipe on D_f until its loss is back to w_D's "
               "(Full is 0 by construction)" if thr == "full" else
               f"epochs of the recipe on D_f until its loss is below {thr}")
            + ".", ""]


def _reference_table(order: list) -> list[str]:
  lines = ["", "## Does each row follow released code? (what still differs, "
           "and why: docs/methods.md)", "", "| Method | follows |", "|---|---|"]
  for m in order:
    code = methods_lib.released_code(m)
    lines.append(f"| {DISPLAY[m]} | "
                 + (f"yes: {code}" if code else "no released code to follow")
                 + " |")
  return lines


def _mia_table(meth: dict, order: list) -> list[str]:
  if not any("mia_svc" in meth[m] for m in order):
    return []
  lines = ["", "## Membership attacks (% of D_f called non-member; attack AUC "
           "on its own shadow members vs non-members, 0.5 = no signal)", "",
           "| Method | ours (LR, 3 features) | AUC | SalUn SVC (confidence) | "
           "AUC | SFR-on LR (entropy) | AUC |", "|---|---|---|---|---|---|---|"]
  for m in order:
    r = meth[m]
    lines.append(
        f"| {DISPLAY[m]} | {_fmt(r.get('mia'))} | "
        f"{_fmt(r.get('mia_attack_auc'), 3)} | {_fmt(r.get('mia_svc'))} | "
        f"{_fmt(r.get('mia_svc_auc'), 3)} | {_fmt(r.get('mia_entropy'))} | "
        f"{_fmt(r.get('mia_entropy_auc'), 3)} |")
  return lines


def _paired_table(meth: dict, order: list) -> list[str]:
  keys = [("acc_forget", "FA"), ("acc_retain", "RA"), ("acc_test", "TA"),
          ("mia", "MIA"), ("mia_svc", "MIA-SVC"), ("relearn_epochs",
                                                  "Relearn")]
  rows = [m for m in order if m != "retrain"
          and meth[m].get("paired_to_retrain")]
  if not rows:
    return []
  lines = ["", "## Paired differences to Retrain (method − Retrain per seed; "
           "mean ± 95 % CI). The noise-floor row is a second Retrain with "
           "another recipe seed: differences of that size are noise.", "",
           "| Method | " + " | ".join(k[1] for k in keys) + " |",
           "|---|" + "---|" * len(keys)]
  noise = [m for m in rows if m == "retrain_other_seed"]
  for m in noise + [m for m in rows if m not in noise]:
    p = meth[m]["paired_to_retrain"]
    lines.append(f"| {DISPLAY[m]} | "
                 + " | ".join(_fmt(p.get(k)) for k, _ in keys) + " |")
  return lines


def _plots(out: Path, results: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  meth = results["methods"]
  order = [m for m in METHOD_ORDER if m in meth]
  keys = [("acc_retain", "D_r"), ("acc_forget", "D_f"), ("acc_test", "test"),
          ("mia", "MIA")]
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(order)), 3.6))
  width = 0.8 / len(keys)
  for i, (k, label) in enumerate(keys):
    means = [meth[m].get(k, {}).get("mean") for m in order]
    stds = [meth[m].get(k, {}).get("std") for m in order]
    xs = np.arange(len(order)) + (i - (len(keys) - 1) / 2) * width
    ax.bar(xs, [np.nan if v is None else v for v in means], width,
           yerr=[0 if v is None else v for v in stds], label=label, capsize=2)
  ax.set_xticks(np.arange(len(order)))
  ax.set_xticklabels([DISPLAY[m] for m in order], rotation=30, ha="right")
  ax.set_ylabel("%")
  ax.set_ylim(0, 105)
  ax.legend(ncol=4, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0),
            title=results["config"]["name"], title_fontsize=8, frameon=False)
  fig.tight_layout()
  atomic.atomic_write(out / "metrics.png", lambda f: fig.savefig(f, format="png",
                                                              dpi=120))
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 3.6))
  for m in order:
    cs = [c for c in results["relearn_curves"].get(m, []) if c]
    if not cs:
      continue
    n = max(len(c) for c in cs)
    arr = np.full((len(cs), n), np.nan)
    for i, c in enumerate(cs):
      arr[i, :len(c)] = c
    with np.errstate(all="ignore"):
      mean = np.nanmean(arr, axis=0)
    ax.plot(np.arange(n), np.maximum(mean, 1e-6), label=DISPLAY[m])
  thr = results["config"]["metrics"]["relearn_threshold"]
  if thr == "full":  # calibrated per seed: the mean threshold is drawn
    thr = next((meth[m]["relearn_threshold"]["mean"] for m in order
                if meth[m].get("relearn_threshold", {}).get("mean")), None)
  if thr is not None:
    ax.axhline(thr, color="k", ls="--", lw=0.8)
  ax.set_yscale("log")
  ax.set_xlabel("relearning epoch on D_f")
  ax.set_ylabel(f"{results['config']['finetune']['loss']} loss on D_f")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  atomic.atomic_write(out / "relearn.png", lambda f: fig.savefig(f, format="png",
                                                              dpi=120))
  plt.close(fig)


def write_all(out: str | Path, results: dict) -> None:
  """Writes ``results.json``, ``table.md`` and the two PNG plots atomically."""
  out = Path(out)
  text = json.dumps(json_safe(results), indent=1)
  atomic.atomic_write(out / "results.json", lambda f: f.write(text.encode()))
  md = markdown(results)
  atomic.atomic_write(out / "table.md", lambda f: f.write(md.encode()))
  _plots(out, results)
