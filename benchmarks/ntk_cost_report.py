"""Markdown table and plot of full-model versus PEFT-only NTK cost, from JSON.

Reads one or more results of ``benchmarks/ntk_cost.py`` and writes, from them
alone:

* ``benchmarks/results/ntk_cost_table.md``: per input file, a header naming
  the device it was measured on, a table per (model, N, implementation) with
  parameter counts, run and compile seconds, memory, the full/PEFT ratios,
  the full model's explicit Jacobian size and the checks of the answer, and a
  table of where the full-model kernel ran out of memory (or time);
* ``benchmarks/results/ntk_cost.png``: run time and memory against N for each
  model, PEFT and full, log scales, OOM and timeouts marked at the top.

    python benchmarks/ntk_cost_report.py benchmarks/results/ntk_cost_cpu.json
    python benchmarks/ntk_cost_report.py a.json b.json --md t.md --png p.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ntk_cost import MODELS, growth, ratio  # noqa: E402  pylint: disable=wrong-import-position

_RESULTS = Path(__file__).resolve().parent / "results"
_COLORS = {"peft": "tab:blue", "full": "tab:orange"}
_STYLES = ("-", "--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 4)))


def load(path: str | Path) -> dict:
  """A result file; ``"source"`` is added (the file name)."""
  result = json.loads(Path(path).read_text())
  result["source"] = Path(path).name
  result["rows"] = [r for r in result.get("rows", []) if "pytree" in r]
  return result


def memory_mib(row: dict) -> float | None:
  """The row's memory figure (older files: the RSS above baseline)."""
  return row.get("memory_mib", row.get("peak_above_baseline_mib"))


def status(row: dict, config: dict | None = None) -> str:
  """``"ok"`` or why the row has no timing: OOM, timeout, skipped, error."""
  config = config or {}
  if row.get("oom"):
    if row.get("oom_source") == "watchdog":
      cap = row.get("mem_cap_mib") or 1024 * config.get("mem_cap_gib", math.nan)
      return f"OOM (RSS > {cap / 1024:.3g} GiB)"
    return "OOM (allocation failed)" if row.get("oom_source") == \
        "allocation error" else f"OOM ({row.get('oom_source', '?')})"
  if row.get("timeout"):
    return f"timeout (> {row.get('timeout_s', config.get('timeout_s')):.0f} s)"
  if row.get("skipped_after_oom"):
    return "skipped (after OOM)"
  if row.get("skipped_after_timeout"):
    return "skipped (after timeout)"
  if "error" in row or "run_seconds_median" not in row:
    return "error"
  return "ok"


def _pairs(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
  """``{(model, n, implementation): {"peft": row, "full": row}}``: models in
  the order they first appear, each by implementation and N (a memory-cap
  search measures N out of order)."""
  out: dict[tuple, dict[str, dict]] = {}
  first: dict[str, int] = {}
  for r in rows:
    first.setdefault(r["model"], len(first))
    out.setdefault((r["model"], r["n"], r["implementation"]), {})[
        r["pytree"]] = r
  return dict(sorted(out.items(),
                     key=lambda kv: (first[kv[0][0]], kv[0][2], kv[0][1])))


def _num(x, fmt: str) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "–"
  return format(x, fmt)


def _params(p) -> str:
  if p is None:
    return "–"
  return f"{p / 1e6:.2f} M" if p >= 1e6 else f"{p / 1e3:.1f} k"


def _cell(row: dict | None, key: str, fmt: str, config: dict) -> str:
  """The value, or why there is none: in full in the run-time column, as
  one word in the others."""
  if row is None:
    return "–"
  st = status(row, config)
  if st != "ok":
    return st if key == "run_seconds_median" else st.split(" ")[0]
  value = memory_mib(row) if key == "memory" else row.get(key)
  return _num(value, fmt)


def _check(*rows) -> str:
  errs = [r.get(k) for r in rows if r for k in ("symmetric_rel",
                                                 "diag_vs_vjp_rel")]
  errs = [e for e in errs if e is not None]
  fin = all(r.get("finite", True) for r in rows if r)
  if not errs:
    return "–"
  return f"{max(errs):.0e}" + ("" if fin else " non-finite!")


def device_line(result: dict) -> str:
  """Where and with what the file was measured."""
  v = result.get("versions", {})
  dev = result.get("device", "?")
  if result.get("platform_name", dev.split(":")[0]) == "cpu":
    dev += (f" ({result.get('cpu_model') or '?'}, "
            f"{result.get('cpu_count', '?')} cores, "
            f"{_num(result.get('host_memory_gib'), '.0f')} GiB RAM)")
  elif result.get("device_limit_mib"):
    dev += f" ({result['device_limit_mib'] / 1024:.0f} GiB usable by XLA)"
  return (f"Measured on **{dev}**; jax {v.get('jax', '?')}, neural-tangents "
          f"{v.get('neural_tangents', '?')}, fastntk_jax "
          f"{v.get('fastntk_jax', '?')}; {result.get('started', 'date ?')}; "
          f"file `{result['source']}`.")


def _config_line(cfg: dict) -> str:
  kernel = cfg.get("kernel", "neural-tangents empirical_ntk_fn per pair of "
                   "blocks")
  return (f"Kernel: {kernel}. Block size {cfg.get('block_size', '?')}, "
          "float32, "
          f"{cfg.get('repeats', '?')} timed call(s) after a compiling first "
          f"call (median shown), memory cap {cfg.get('mem_cap_gib', '?')} GiB "
          f"RSS, timeout {cfg.get('timeout_s', '?')} s; "
          f"{cfg.get('weights', 'weights: ?')}. Memory: "
          f"{cfg.get('memory', 'peak RSS above the pre-kernel baseline')}.")


_HEAD = ("| model | N | impl. | P full | P PEFT | full/PEFT P | PEFT run (s) "
         "| full run (s) | full/PEFT time | PEFT compile (s) | full compile (s) "
         "| PEFT mem (MiB) | full mem (MiB) | full/PEFT mem | full J (MiB) "
         "| check |\n|" + "---|" * 16)


def _table_row(key: tuple, pair: dict, cfg: dict) -> str:
  model, n, impl = key
  p, f = pair.get("peft"), pair.get("full")
  rat = ratio(p, f) if p and f else {}
  ok = p and f and status(p) == status(f) == "ok"
  cells = [model, str(n), str(impl),
           _params((f or {}).get("num_params")),
           _params((p or {}).get("num_params")),
           _num(rat.get("params_ratio"), ".0f"),
           _cell(p, "run_seconds_median", ".3g", cfg),
           _cell(f, "run_seconds_median", ".3g", cfg),
           _num(rat.get("speed_ratio"), ".2f") if ok else "–",
           _cell(p, "compile_seconds", ".3g", cfg),
           _cell(f, "compile_seconds", ".3g", cfg),
           _cell(p, "memory", ".0f", cfg), _cell(f, "memory", ".0f", cfg),
           _num(rat.get("memory_ratio"), ".2f") if ok else "–",
           _num((f or {}).get("jacobian_mib"), ".0f"), _check(p, f)]
  return "| " + " | ".join(cells) + " |"


def _limits(pairs: dict, cfg: dict) -> list[str]:
  """Per (model, implementation): the largest N that ran, the first that did
  not, for each pytree, and the exponents of time and memory in N (least
  squares over the N that ran; ``ntk_cost.growth``)."""
  lines = ["| model | impl. | PEFT: largest N run | PEFT: first N failed "
           "| full: largest N run | full: first N failed "
           "| full J at that N (MiB) | PEFT: time, memory ∝ Nᵃ "
           "| full: time, memory ∝ Nᵃ |", "|" + "---|" * 9]
  groups: dict[tuple, list] = {}
  for (model, n, impl), pair in pairs.items():
    groups.setdefault((model, impl), []).append((n, pair))
  for (model, impl), items in groups.items():
    cells = [model, str(impl)]
    jac = "–"
    for pytree in ("peft", "full"):
      rows = [(n, pr[pytree]) for n, pr in sorted(items) if pytree in pr]
      ran = [n for n, r in rows if status(r) == "ok"]
      bad = [(n, r) for n, r in rows if status(r) not in ("ok", "error")
             and not status(r).startswith("skipped")]
      cells.append(str(max(ran)) if ran else "none")
      cells.append(f"{bad[0][0]}: {status(bad[0][1], cfg)}" if bad
                   else "none")
      if pytree == "full" and bad:
        jac = _num(bad[0][1].get("jacobian_mib"), ".0f")
    exps = []
    for pytree in ("peft", "full"):
      g = growth([pr[pytree] for _, pr in items if pytree in pr])
      exps.append(", ".join(_num(g[k], ".2f") for k in (
          "time_exponent", "memory_exponent")))
    lines.append("| " + " | ".join(cells + [jac] + exps) + " |")
  return lines


def markdown(results: list[dict]) -> str:
  """The Markdown report: one section per result file."""
  out = ["# Empirical NTK cost: full model vs PEFT parameters", "",
         "Generated by `benchmarks/ntk_cost_report.py` from the JSON of "
         "`benchmarks/ntk_cost.py`; do not edit by hand. Ratios are full / "
         "PEFT. *mem*: peak memory of the kernel call above the pre-kernel "
         "baseline. *full J*: the explicit full-model Jacobian N·C·P·4 bytes "
         "(for scale; the kernel contracts per parameter leaf and need not "
         "hold it). *check*: largest relative error of the kernel's symmetry "
         "and of its first diagonal block against VJPs.", ""]
  for res in results:
    cfg = res.get("config", {})
    pairs = _pairs(res["rows"])
    out += [f"## {res.get('device', '?')}", "", device_line(res), "",
            _config_line(cfg), "", _HEAD]
    out += [_table_row(k, pr, cfg) for k, pr in pairs.items()]
    out += ["", "Where the kernel ran out of memory or time "
            "(larger N are then skipped):", ""]
    out += _limits(pairs, cfg) + [""]
  return "\n".join(out)


def _series(rows: list[dict], key):
  ok = [r for r in sorted(rows, key=lambda r: r["n"]) if status(r) == "ok"]
  ys = [memory_mib(r) if key == "memory" else r.get(key) for r in ok]
  return [r["n"] for r in ok], ys


def _mark_failures(ax, rows: list[dict], color: str) -> None:
  for r in rows:
    st = status(r)
    if st.startswith(("OOM", "timeout")):
      ax.plot([r["n"]], [0.93], marker="x" if st.startswith("OOM") else ">",
              color=color, ms=9, mew=2, transform=ax.get_xaxis_transform(),
              clip_on=False, ls="none")


def _plot_model(axes, model: str, results: list[dict]) -> None:
  import matplotlib.ticker
  devices = [res.get("device", "?") for res in results]
  for s, res in enumerate(results):
    rows = [r for r in res["rows"] if r["model"] == model]
    impls = sorted({r["implementation"] for r in rows})
    for j, impl in enumerate(impls):
      style = _STYLES[(s * len(impls) + j) % len(_STYLES)]
      tag = "" if len(results) == 1 else (
          f", {devices[s]}" if len(set(devices)) == len(devices)
          else f", {Path(res['source']).stem}")
      tag += "" if len(impls) == 1 else f", impl. {impl}"
      for pytree, color in _COLORS.items():
        sel = [r for r in rows if r["implementation"] == impl
               and r["pytree"] == pytree]
        for ax, key in zip(axes, ("run_seconds_median", "memory")):
          xs, ys = _series(sel, key)
          ax.plot(xs, ys, ls=style, marker="o", ms=3, color=color,
                  label=f"{'PEFT' if pytree == 'peft' else 'full'}{tag}")
          _mark_failures(ax, sel, color)
  axes[0].set_title(model, fontsize=9)
  axes[0].set_ylabel("run time (s)", fontsize=8)
  axes[1].set_ylabel("peak memory (MiB)", fontsize=8)
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.tick_params(labelsize=7)
  axes[1].set_xlabel("N (samples)", fontsize=8)


def plot(results: list[dict], path: Path) -> None:
  """Time and memory against N, one column per model, 4 models a row."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D
  seen = {r["model"] for res in results for r in res["rows"]}
  models = [m for m in MODELS if m in seen] + sorted(seen - set(MODELS))
  cols = min(4, max(len(models), 1))
  groups = math.ceil(len(models) / cols) or 1
  fig, axs = plt.subplots(2 * groups, cols, squeeze=False,
                          figsize=(3.4 * cols, 5.0 * groups))
  for i, model in enumerate(models):
    g, c = divmod(i, cols)
    _plot_model((axs[2 * g, c], axs[2 * g + 1, c]), model, results)
  for i in range(len(models), groups * cols):
    g, c = divmod(i, cols)
    axs[2 * g, c].axis("off")
    axs[2 * g + 1, c].axis("off")
  # Every file's series, from whichever panels show them (once each).
  seen_labels = {}
  for ax in axs.flat:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      seen_labels.setdefault(lab, h)
  labels = list(seen_labels)
  handles = [seen_labels[lab] for lab in labels]
  handles += [Line2D([], [], color="k", marker="x", ls="none", mew=2),
              Line2D([], [], color="k", marker=">", ls="none")]
  labels += ["out of memory", "timeout"]
  ncol = min(len(labels), 4)
  fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8,
             frameon=False)
  legend_in = 0.22 * math.ceil(len(labels) / ncol) + 0.1
  height = fig.get_figheight() + legend_in
  fig.set_figheight(height)
  devices = "; ".join(sorted({res.get("device", "?") for res in results}))
  fig.suptitle(f"Empirical NTK, full vs PEFT ({devices}); x: out of memory, "
               "triangle: timeout", fontsize=10)
  fig.tight_layout(rect=(0, legend_in / height, 1, 0.97))
  _save(path, lambda f: fig.savefig(f, format="png", dpi=120))
  plt.close(fig)


def _save(path: Path, write) -> None:
  from fastntk_jax.io import atomic
  atomic.atomic_write(path, write)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("json", nargs="+", type=Path,
                  help="result files of benchmarks/ntk_cost.py")
  ap.add_argument("--md", type=Path, default=_RESULTS / "ntk_cost_table.md")
  ap.add_argument("--png", type=Path, default=_RESULTS / "ntk_cost.png")
  args = ap.parse_args(argv)
  results = [load(p) for p in args.json]
  text = markdown(results)
  _save(args.md, lambda f: f.write(text.encode()))
  plot(results, args.png)
  print(f"wrote {args.md} and {args.png}")


if __name__ == "__main__":
  main()
