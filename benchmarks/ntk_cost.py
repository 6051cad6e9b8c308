"""Full-model versus PEFT-only empirical NTK: time, peak memory, parameter counts.

Same model, same data, same neural-tangents call (fastntk_jax.core.kernels.ntk);
only the pytree differentiated differs: every trainable parameter ("full",
``zoo.peft_model(mode="all")``) or the paper's PEFT selection ("peft": BatchNorm
scale/shift + head for CNNs, prompts + head for ViTs). Weights are a random
initialisation (cost does not depend on their values).

Each (model, N, implementation, pytree) measurement runs in its own child
process, so that its peak resident memory is its own. The high-water mark is
reset (``/proc/self/clear_refs``) after the model and data are built and again
after the first (compiling) call, so ``memory_mib`` is the peak of the timed
calls above the pre-kernel RSS, without the compiler's working memory (kept
as ``first_call_*``); on a GPU it is ``peak_bytes_in_use`` above the
pre-kernel use. The parent polls the child's RSS and kills it
above ``--mem-cap-gib`` (recorded as ``"oom"``), and after ``--timeout-s``
(``"timeout"``). XLA ``RESOURCE_EXHAUSTED`` errors (a GPU running out, or a
host allocation refused) are recorded as ``"oom"`` too. Once a pytree's kernel
went OOM (or timed out) at some N, larger N are not tried for that model
(``"skipped_after_oom"`` / ``"skipped_after_timeout"``).

    python benchmarks/ntk_cost.py --models resnet20 vit_tiny_4 --n 8 16 --repeats 1
    python benchmarks/ntk_cost.py --quick        # resnet20, vit_tiny_4; N = 16
    python benchmarks/ntk_cost.py                # the whole sweep (hours on CPU)
    python benchmarks/ntk_cost_report.py benchmarks/results/ntk_cost_cpu.json

Writes ``benchmarks/results/ntk_cost_<platform>.json`` atomically after every
row: device, versions, configuration, one row per measurement (compile seconds
= first call minus the median of the later calls, median run seconds, peak
memory above the pre-kernel baseline, P, the explicit Jacobian's size
N·C·P·4 bytes, and checks of the answer), the full/PEFT ratios and, at the
end, ``limits``: per model and pytree the largest N that ran and the first
that ran out of memory or time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

MODELS = ("resnet20", "resnet56", "resnet110", "mobilenetv2", "vit_tiny_4",
          "vit_small_4", "vit_base_4", "vit_base_16")
QUICK_MODELS = ("resnet20", "vit_tiny_4")
DEFAULT_N = (16, 32, 64, 128, 256, 512)
#: Our pytree names -> zoo.peft_model modes.
PYTREES = {"peft": "peft", "full": "all"}
NUM_CLASSES = 10
_ROW_TAG = "NTK_COST_ROW "
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                "MemoryError", "std::bad_alloc")
_ENV_KEYS = ("JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
             "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR",
             "CUDA_VISIBLE_DEVICES")
_MIB = 2**20


# ------------------------------------------------------------------ memory
def proc_status_mib(pid: int | str = "self") -> dict[str, float]:
  """``VmRSS`` and ``VmHWM`` of a process in MiB (empty once it has exited)."""
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith(("VmRSS:", "VmHWM:")):
          out[line[:5]] = int(line.split()[1]) / 1024
  except OSError:
    pass
  return out


def _reset_peak_rss() -> bool:
  """Resets this process's RSS high-water mark (Linux >= 4.0)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _maxrss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_memory() -> dict[str, float]:
  """``bytes_in_use`` and ``peak_bytes_in_use`` of device 0 in MiB (GPU);
  empty where the backend keeps no statistics (CPU)."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  out = {}
  for key, name in (("bytes_in_use", "device_in_use_mib"),
                    ("peak_bytes_in_use", "peak_device_mib"),
                    ("bytes_limit", "device_limit_mib")):
    if key in stats:
      out[name] = stats[key] / _MIB
  return out


def is_oom_message(text: str) -> bool:
  """Whether an error text says that an allocation failed."""
  return any(m in text for m in _OOM_MARKERS)


# ------------------------------------------------------------------ child
def _prepare(model: str, pytree: str, num_prompts: int, seed: int):
  """The zoo model with a random backbone, split for ``pytree``."""
  from fastntk_jax.models import zoo
  module = zoo.build(model, num_classes=NUM_CLASSES, num_prompts=num_prompts)
  variables = zoo.init_variables(module, zoo.spec(model).image_size, seed)
  return zoo.peft_model(model, module, variables, num_classes=NUM_CLASSES,
                     mode=PYTREES[pytree], seed=seed)


def _inputs(model: str, n: int, seed: int):
  """``n`` embedded CIFAR-10 images (train then test pool), resized
  bilinearly to the model's input size, preprocessed: ``(n, S, S, 3)``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fastntk_jax import data
  from fastntk_jax.models import zoo
  xtr, _, xte, _ = data.load_embedded_cifar10()
  pool = np.concatenate([xtr, xte])
  idx = np.random.default_rng(seed).choice(len(pool), n, replace=n > len(pool))
  x = pool[idx]
  size = zoo.spec(model).image_size
  if size != x.shape[1]:
    x = jax.image.resize(jnp.asarray(x, jnp.float32), (n, size, size, 3),
                         "bilinear")
    x = jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)
  return jax.block_until_ready(zoo.preprocess_fn(model)(x))


def _time_kernel(apply_fn, params, x, *, block: int, implementation: int,
                 repeats: int, kernel: str = "nt"):
  """Times the kernel: a first call (compiles), then ``repeats`` calls.

  Returns:
    ``(k, first, later, peak_first_mib, peak_later_mib)``: the kernel, the
    first call's :class:`fastntk_jax.evaluation.timing.Measured`, the later calls'
    seconds, and the peak RSS (MiB) of the first call (compilation included)
    and of the later calls (the high-water mark is reset between them).
  """
  import jax
  from fastntk_jax.core import kernels
  from fastntk_jax.evaluation import timing

  def call():
    return jax.block_until_ready(kernels.ntk(
        apply_fn, params, x, block_size=block, implementation=implementation,
        reuse_jacobians=(kernel == "jacobians")))

  with timing.measure() as first:
    k = call()
  peak_first = _maxrss_mib()
  del k  # do not hold two kernels at once
  _reset_peak_rss()
  later = []
  for i in range(repeats):
    if i:
      del k
    t0 = time.perf_counter()
    k = call()
    later.append(time.perf_counter() - t0)
  return k, first.result(), later, peak_first, _maxrss_mib()


def _check(apply_fn, params, x, k, c: int, *, rows: int = 512) -> dict:
  """Trace, symmetry and finiteness of ``k``, and its first sample's
  diagonal ``Θ[c, c] = ‖∂f_c(x_0)/∂w‖²`` against C vector-Jacobian products.

  The kernel is read ``rows`` rows (and the matching columns) at a time in
  float64, so the check adds O(rows · NC) memory to the kernel's own rather
  than whole float64 copies of it: ``--find-limit`` kills a child on its
  whole RSS, and the copies, not the kernel, would set the limit."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  k = np.asarray(k)
  n = k.shape[0]
  scale, sym, trace, finite = 0.0, 0.0, 0.0, True
  for i in range(0, n, rows):
    blk = k[i:i + rows].astype(np.float64)
    finite = finite and bool(np.isfinite(blk).all())
    scale = float(np.maximum(scale, np.abs(blk).max()))  # NaN propagates
    sym = float(np.maximum(sym, np.abs(blk - k[:, i:i + rows].T).max()))
    trace += float(np.trace(blk[:, i:i + rows]))
  scale = max(scale, 1e-30)  # keeps a NaN

  @jax.jit
  def sq_norm(w, x0, e):
    _, pull = jax.vjp(lambda p: apply_fn(p, x0)[0], w)
    return sum(jnp.vdot(g, g) for g in jax.tree_util.tree_leaves(pull(e)))

  eye = np.eye(c, dtype=np.float32)
  ref = np.array([float(sq_norm(params, x[:1], eye[i])) for i in range(c)])
  diag = np.diag(k[:c, :c]).astype(np.float64)
  return {"kernel_trace": trace,
          "kernel_max_abs": scale,
          "finite": finite,
          "symmetric_max_abs": sym, "symmetric_rel": sym / scale,
          "diag_vs_vjp_rel": float(np.abs(diag - ref).max() /
                                   max(np.abs(ref).max(), 1e-30))}


def measure(*, model: str, n: int, pytree: str, implementation: int,
            repeats: int, seed: int, block_size: int | None, num_prompts: int,
            check: bool = True, kernel: str = "nt") -> dict:
  """One measurement (runs inside the child process).

  Returns:
    The row: counts, timings (seconds), memory (MiB) and checks.
  """
  import jax
  m = _prepare(model, pytree, num_prompts, seed)
  x = _inputs(model, n, seed)
  from fastntk_jax.core import kernels
  c = kernels.num_outputs(m.apply_fn, m.init_params, x)
  block = n if block_size is None else min(block_size, n)
  jax.block_until_ready(m.init_params)
  base_rss = proc_status_mib().get("VmRSS", float("nan"))
  hwm_reset = _reset_peak_rss()
  base_dev = _device_memory()
  k, first, later, peak_first, peak_rss = _time_kernel(
      m.apply_fn, m.init_params, x, block=block, implementation=implementation,
      repeats=repeats, kernel=kernel)
  dev = _device_memory()
  run = statistics.median(later)
  row = {
      "num_params": m.num_peft, "num_params_total": m.num_total,
      "num_outputs": c, "block_size": block, "kernel_shape": list(k.shape),
      "jacobian_mib": n * c * m.num_peft * 4 / _MIB,
      "first_call_seconds": first.seconds,
      "compile_seconds": max(first.seconds - run, 0.0),
      "compile_seconds_reported": first.compile_seconds,
      "run_seconds_median": run, "run_seconds_all": later,
      "baseline_rss_mib": base_rss, "peak_rss_mib": peak_rss,
      "peak_rss_reset": hwm_reset,
      "peak_above_baseline_mib": peak_rss - base_rss,
      "first_call_peak_rss_mib": peak_first,
      "first_call_above_baseline_mib": peak_first - base_rss,
  }
  row.update(_memory_fields(row, base_dev, dev))
  if check:
    row.update(_check(m.apply_fn, m.init_params, x, k, c))
  return row


def _memory_fields(row: dict, base_dev: dict, dev: dict) -> dict:
  """``memory_mib``: the device's peak above its pre-kernel use where the
  device keeps statistics (GPU), else the host's peak RSS above baseline."""
  if "peak_device_mib" not in dev:
    return {"memory_mib": row["peak_above_baseline_mib"],
            "memory_source": "host peak RSS above baseline"}
  above = dev["peak_device_mib"] - base_dev.get("device_in_use_mib", 0.0)
  return {"peak_device_mib": dev["peak_device_mib"],
          "device_baseline_mib": base_dev.get("device_in_use_mib"),
          "device_peak_before_kernel_mib": base_dev.get("peak_device_mib"),
          "device_limit_mib": dev.get("device_limit_mib"),
          "peak_device_above_baseline_mib": above,
          "memory_mib": above,
          "memory_source": "device peak_bytes_in_use above baseline"}


def child_main(cfg: dict) -> dict:
  """Runs :func:`measure`; an allocation failure becomes an ``oom`` row."""
  try:
    return {**cfg, **measure(**cfg)}
  except (MemoryError, RuntimeError) as e:
    msg = f"{type(e).__name__}: {e}"
    if not (isinstance(e, MemoryError) or is_oom_message(msg)):
      raise
    return {**cfg, "oom": True, "oom_source": "allocation error",
            "error": msg[-2000:], "peak_rss_mib": _maxrss_mib(),
            **_device_memory()}


def probe_main(models: list[str], num_prompts: int) -> dict:
  """Device, versions and parameter counts (a child, so that the parent never
  initialises an accelerator and takes its memory)."""
  import jax
  import fastntk_jax
  from fastntk_jax.core import nt
  from fastntk_jax.models import zoo
  dev = jax.devices()[0]
  counts = {m: dict(zip(("total", "peft"), zoo.param_counts(
      m, num_classes=NUM_CLASSES, num_prompts=num_prompts))) for m in models}
  return {"device": f"{dev.platform}: {dev.device_kind}",
          "platform_name": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count(), **_device_memory(),
          "versions": {"jax": jax.__version__,
                       "jaxlib": _version("jaxlib"),
                       "flax": _version("flax"),
                       "neural_tangents": nt.nt_version(),
                       "fastntk_jax": fastntk_jax.__version__,
                       "python": platform.python_version()},
          "param_counts": counts}


def _version(name: str) -> str | None:
  from importlib import metadata
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


# ------------------------------------------------------------------ parent
class ChildResult(NamedTuple):
  """What :func:`run_watched` saw.

  Attributes:
    status: ``"exited"``, ``"oom"`` (killed above the cap) or ``"timeout"``.
    returncode: the child's exit status (negative: killed by that signal).
    stdout, stderr: its output.
    last_rss_mib: its RSS at the last poll.
    max_rss_mib: the largest RSS (or high-water mark) seen while polling.
    seconds: wall time.
  """
  status: str
  returncode: int
  stdout: str
  stderr: str
  last_rss_mib: float
  max_rss_mib: float
  seconds: float


def run_watched(cmd: list[str], *, mem_cap_mib: float, timeout_s: float,
                poll_s: float = 0.02, env: dict | None = None) -> ChildResult:
  """Runs ``cmd``, polling its RSS; kills it above ``mem_cap_mib`` or after
  ``timeout_s`` seconds. Output goes to temporary files (no pipe deadlock)."""
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    status, last, peak = "exited", 0.0, 0.0
    while proc.poll() is None:
      st = proc_status_mib(proc.pid)
      last = st.get("VmRSS", last)
      peak = max(peak, last, st.get("VmHWM", 0.0))
      if last > mem_cap_mib or time.monotonic() - t0 > timeout_s:
        status = "oom" if last > mem_cap_mib else "timeout"
        proc.kill()
        proc.wait()
        break
      time.sleep(poll_s)
    seconds = time.monotonic() - t0
    out.seek(0)
    err.seek(0)
    return ChildResult(status, proc.returncode,
                       out.read().decode(errors="replace"),
                       err.read().decode(errors="replace"), last, peak,
                       seconds)


def _parse_row(stdout: str) -> dict | None:
  for line in reversed(stdout.splitlines()):
    if line.startswith(_ROW_TAG):
      return json.loads(line[len(_ROW_TAG):])
  return None


def _child_row(job: dict, res: ChildResult, cap_mib: float,
               timeout_s: float) -> dict:
  """The row for one child: its own, or what the watchdog recorded."""
  watch = {"child_seconds": res.seconds, "watchdog_max_rss_mib": res.max_rss_mib}
  if res.status == "oom":
    return {**job, **watch, "oom": True, "oom_source": "watchdog",
            "mem_cap_mib": cap_mib, "last_rss_mib": res.last_rss_mib}
  if res.status == "timeout":
    return {**job, **watch, "timeout": True, "timeout_s": timeout_s,
            "last_rss_mib": res.last_rss_mib}
  row = _parse_row(res.stdout) if res.returncode == 0 else None
  if row is not None:
    return {**row, **watch}
  tail = res.stderr[-2000:]
  if is_oom_message(tail) or res.returncode == -signal.SIGKILL:
    # SIGKILL not sent by us: most likely the kernel's OOM killer.
    return {**job, **watch, "oom": True, "oom_source":
            "allocation error" if is_oom_message(tail) else "SIGKILL (system)",
            "returncode": res.returncode, "error": tail}
  return {**job, **watch, "error": tail, "returncode": res.returncode}


def _predicted(row: dict, counts: dict) -> dict:
  """P and the explicit Jacobian's size, from the probe's counts, for rows
  the child could not fill (OOM, timeout, skipped)."""
  c = counts[row["model"]]
  p = c["peft"] if row["pytree"] == "peft" else c["total"]
  return {"num_params": p, "num_params_total": c["total"],
          "jacobian_mib": row["n"] * NUM_CLASSES * p * 4 / _MIB, **row}


def ratio(peft_row: dict, full_row: dict) -> dict:
  """Full over PEFT: run time, memory and parameter count (where both ran).

  Memory ratios divide by at least 1 MiB: a PEFT kernel's increment can be
  below the resolution of RSS.
  """
  out = {"model": peft_row["model"], "n": peft_row["n"],
         "implementation": peft_row["implementation"]}
  if "num_params" in peft_row and "num_params" in full_row:
    out["params_ratio"] = full_row["num_params"] / peft_row["num_params"]
    out["peft_percent"] = 100 * peft_row["num_params"] / full_row["num_params"]
  if "run_seconds_median" in peft_row and "run_seconds_median" in full_row:
    out["speed_ratio"] = (full_row["run_seconds_median"] /
                          peft_row["run_seconds_median"])
    out["compile_ratio"] = (full_row["compile_seconds"] /
                            max(peft_row["compile_seconds"], 1e-3))
    mem = lambda r: r.get("memory_mib", r.get("peak_above_baseline_mib"))
    out["memory_ratio"] = mem(full_row) / max(mem(peft_row), 1.0)
  return out


def growth(rows: list[dict]) -> dict:
  """Least-squares exponents ``a`` of ``time ∝ Nᵃ`` and ``memory ∝ Nᵃ``
  over the rows that ran (N > 16 for memory, whose small-N values sit at
  the resolution of RSS); None with fewer than two such rows."""
  def slope(pairs):
    pairs = [(n, v) for n, v in pairs if v and v > 0]
    if len({n for n, _ in pairs}) < 2:
      return None
    x = [math.log(n) for n, _ in pairs]
    y = [math.log(v) for _, v in pairs]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return (sum((a - mx) * (b - my) for a, b in zip(x, y))
            / sum((a - mx) ** 2 for a in x))
  ok = [r for r in rows if "run_seconds_median" in r]
  return {"time_exponent": slope([(r["n"], r["run_seconds_median"])
                                  for r in ok]),
          "memory_exponent": slope([(r["n"], r.get("memory_mib"))
                                    for r in ok if r["n"] > 16])}


def limits(rows: list[dict]) -> list[dict]:
  """Per (model, implementation, pytree): the largest N that ran, the
  first N that ran out of memory or time (None: none did) and how time and
  memory grew with N (:func:`growth`)."""
  out: dict[tuple, dict] = {}
  for r in sorted(rows, key=lambda r: r["n"]):
    key = (r["model"], r["implementation"], r["pytree"])
    lim = out.setdefault(key, dict(zip(("model", "implementation", "pytree"),
                                       key), largest_n_ok=None,
                                   first_n_failed=None, failure=None))
    if "run_seconds_median" in r:
      lim["largest_n_ok"] = r["n"]
    elif (r.get("oom") or r.get("timeout")) and lim["first_n_failed"] is None:
      lim["first_n_failed"] = r["n"]
      lim["failure"] = "oom" if r.get("oom") else "timeout"
  for key, lim in out.items():
    lim.update(growth([r for r in rows if (r["model"], r["implementation"],
                                           r["pytree"]) == key]))
  return list(out.values())


def _child_env(args) -> dict:
  env = dict(os.environ)
  if args.gpu_mem_fraction is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.gpu_mem_fraction)
  return env


def _run_probe(args, env: dict) -> dict:
  cmd = [sys.executable, __file__, "--probe",
         json.dumps({"models": args.models, "num_prompts": args.num_prompts})]
  res = run_watched(cmd, mem_cap_mib=args.mem_cap_gib * 1024,
                    timeout_s=args.timeout_s, env=env)
  row = _parse_row(res.stdout) if res.returncode == 0 else None
  if row is None:
    raise SystemExit(f"the probe child failed ({res.status}, rc "
                     f"{res.returncode}):\n{res.stderr[-3000:]}")
  return row


def _jobs(args):
  """(model, implementation) groups, each the list of (n, pytree) jobs."""
  for model in args.models:
    for impl in args.implementations:
      yield model, impl, [(n, p) for n in sorted(set(args.n))
                          for p in ("peft", "full")]


def _measure_one(args, env, job: dict) -> dict:
  cmd = [sys.executable, __file__, "--child", json.dumps(job)]
  cap = args.mem_cap_gib * 1024
  res = run_watched(cmd, mem_cap_mib=cap, timeout_s=args.timeout_s, env=env)
  return _child_row(job, res, cap, args.timeout_s)


def _config(args, env: dict) -> dict:
  return {"models": args.models, "n": sorted(set(args.n)),
          "implementations": args.implementations, "repeats": args.repeats,
          "kernel": {"nt": "neural-tangents empirical_ntk_fn per pair of "
                           "blocks (Jacobians of both sides computed in "
                           "each call)",
                     "jacobians": "kernels.ntk(reuse_jacobians=True): each "
                                  "block's Jacobian once, kept, J Jᵀ"}[
                                      args.kernel],
          "seed": args.seed, "num_prompts": args.num_prompts,
          "num_classes": NUM_CLASSES, "check": not args.no_check,
          "block_size": args.block_size or "N (one block)",
          "dtype": "float32", "mem_cap_gib": args.mem_cap_gib,
          "timeout_s": args.timeout_s,
          "find_limit": ({"max_n": args.max_n,
                          "resolution": args.limit_resolution}
                         if args.find_limit else None),
          "weights": f"random initialisation (seed {args.seed}) for every "
                     "model, new head x0.1; cost does not depend on values",
          "data": "embedded CIFAR-10 (1000 train + 1000 test images, drawn "
                  "without replacement up to 2000); 224 px models: the same "
                  "32 px images resized bilinearly (jax.image.resize)",
          "pytrees": {"peft": "zoo.peft_model(mode='peft'): BatchNorm scale/shift "
                              "+ head (CNNs), prompts + head (ViTs)",
                      "full": "zoo.peft_model(mode='all'): every parameter "
                              "(BatchNorm statistics frozen)"},
          "memory": "host: peak RSS over the timed calls after the first "
                    "(high-water mark reset after the compiling first call) "
                    "minus the RSS before the first call; the first call's "
                    "peak, compilation included, is first_call_*. GPU: "
                    "peak_bytes_in_use minus bytes_in_use before the first "
                    "call",
          "env": {k: env[k] for k in _ENV_KEYS if k in env}}


def _json_safe(obj):
  """NaN/inf become None (strict JSON)."""
  if isinstance(obj, dict):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def _write(path: Path, result: dict) -> None:
  from fastntk_jax.io import atomic
  text = json.dumps(_json_safe(result), indent=1)
  atomic.atomic_write(path, lambda f: f.write(text.encode()))


def _print_row(row: dict) -> None:
  keys = ("model", "n", "implementation", "pytree", "num_params",
          "run_seconds_median", "compile_seconds", "memory_mib", "oom",
          "timeout", "skipped_after_oom", "skipped_after_timeout", "error",
          "symmetric_rel", "diag_vs_vjp_rel")
  short = {k: row[k] for k in keys if k in row}
  if "error" in short:
    short["error"] = short["error"][-300:]
  print(json.dumps(short), flush=True)


def _job(args, model: str, impl: int, pytree: str, n: int) -> dict:
  return {"model": model, "n": n, "pytree": pytree, "implementation": impl,
          "repeats": args.repeats, "seed": args.seed,
          "block_size": args.block_size, "num_prompts": args.num_prompts,
          "check": not args.no_check, "kernel": args.kernel}


def search_limit(args, done: dict, pytree: str):
  """Yields the N to measure next for ``pytree`` until the largest N that
  fits the memory cap (and the timeout) is known to ``--limit-resolution``:
  doubling from the largest N that ran until one fails (at most
  ``--max-n``), then bisecting between the two. ``done`` maps ``(n,
  pytree)`` to rows and is updated by the caller after each N."""
  def bounds():
    ok = [n for (n, p), r in done.items()
          if p == pytree and "run_seconds_median" in r]
    bad = [n for (n, p), r in done.items()
           if p == pytree and (r.get("oom") or r.get("timeout"))]
    return max(ok, default=None), min(bad, default=None)

  while True:
    lo, hi = bounds()
    if lo is None:
      return  # nothing ran: no base to search from
    if hi is None:
      if lo >= args.max_n:
        return
      nxt = min(2 * lo, args.max_n)
    elif hi <= lo * args.limit_resolution:
      return
    else:
      nxt = int(math.sqrt(lo * hi))  # geometric midpoint
      if nxt in (lo, hi):
        return
    if (nxt, pytree) in done:
      return
    yield nxt


def sweep(args) -> dict:
  """Runs every job, writing the JSON after each row; returns the result."""
  env = _child_env(args)
  probe = _run_probe(args, env)
  counts = probe.pop("param_counts")
  result = {"benchmark": "ntk_cost", **probe, "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(), "host_memory_gib": _host_memory_gib(),
            "platform": platform.platform(), "config": _config(args, env),
            "param_counts": counts, "rows": [], "ratios": [],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  out = args.out or (Path("benchmarks/results") /
                     f"ntk_cost_{probe['platform_name']}.json")
  for model, impl, jobs in _jobs(args):
    stop: dict[str, str] = {}  # pytree -> "oom" | "timeout"
    done: dict[tuple, dict] = {}
    for n, pytree in jobs:
      job = _job(args, model, impl, pytree, n)
      if pytree in stop:
        row = {**job, f"skipped_after_{stop[pytree]}": True}
      else:
        row = _measure_one(args, env, job)
        for flag in ("oom", "timeout"):
          if row.get(flag):
            stop[pytree] = flag
      row = _predicted(row, counts)
      done[(n, pytree)] = row
      result["rows"].append(row)
      _print_row(row)
      if pytree == "full":
        result["ratios"].append(ratio(done[(n, "peft")], row))
      _write(out, result)
    if args.find_limit:
      for pytree in ("peft", "full"):
        for n in search_limit(args, done, pytree):
          job = _job(args, model, impl, pytree, n)
          row = {**_predicted(_measure_one(args, env, job), counts),
                 "search": True}
          done[(n, pytree)] = row
          result["rows"].append(row)
          _print_row(row)
          _write(out, result)
  result["limits"] = limits(result["rows"])
  result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
  _write(out, result)
  print(f"wrote {out}")
  return result


def _cpu_model() -> str | None:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def _host_memory_gib() -> float | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError):
    return None


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", nargs="+", default=None, choices=MODELS,
                  help=f"default: all ({' '.join(MODELS)}); with --quick: "
                       f"{' '.join(QUICK_MODELS)}")
  ap.add_argument("--n", type=int, nargs="+", default=None,
                  help=f"numbers of samples N (default {DEFAULT_N})")
  ap.add_argument("--implementations", type=int, nargs="+", default=[1],
                  choices=[1, 2], help="neural-tangents NTK implementation: "
                  "1 Jacobian contraction, 2 NTK-vector products")
  ap.add_argument("--kernel", choices=("nt", "jacobians"), default="nt",
                  help="nt: neural-tangents' kernel per pair of blocks "
                       "(default); jacobians: kernels.ntk(reuse_jacobians="
                       "True), each Jacobian once, then J Jᵀ")
  ap.add_argument("--repeats", type=int, default=3,
                  help="timed calls after the first (median reported)")
  ap.add_argument("--block-size", type=int, default=None,
                  help="samples per kernel block (default N: one block)")
  ap.add_argument("--num-prompts", type=int, default=5,
                  help="ViT prompt length (zoo.DEFAULT_NUM_PROMPTS)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--mem-cap-gib", type=float, default=20.0,
                  help="kill a child whose RSS exceeds this (recorded as oom)")
  ap.add_argument("--timeout-s", type=float, default=3600.0,
                  help="kill a child after this many seconds (timeout)")
  ap.add_argument("--find-limit", action="store_true",
                  help="after the listed N, search each pytree's largest N "
                       "under --mem-cap-gib (and --timeout-s): doubling, "
                       "then bisection")
  ap.add_argument("--max-n", type=int, default=65536,
                  help="largest N the search tries")
  ap.add_argument("--limit-resolution", type=float, default=1.25,
                  help="the search stops when first-failed / largest-ok N "
                       "is at most this")
  ap.add_argument("--gpu-mem-fraction", type=float, default=None,
                  help="XLA_PYTHON_CLIENT_MEM_FRACTION for the children "
                       "(default: JAX's, 0.75)")
  ap.add_argument("--no-check", action="store_true",
                  help="skip the checks of the kernel (trace, symmetry, VJPs)")
  ap.add_argument("--quick", action="store_true",
                  help="N = 16, one repeat, resnet20 and vit_tiny_4 unless "
                       "--models/--n are given (a smoke run)")
  ap.add_argument("--out", type=Path, default=None,
                  help="JSON path (default benchmarks/results/"
                       "ntk_cost_<platform>.json)")
  ap.add_argument("--child", help=argparse.SUPPRESS)
  ap.add_argument("--probe", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.quick:
    args.models = args.models or list(QUICK_MODELS)
    args.n = args.n or [16]
    args.repeats = 1
  args.models = args.models or list(MODELS)
  args.n = args.n or list(DEFAULT_N)
  if args.repeats < 1 or min(args.n) < 1 or (args.block_size or 1) < 1:
    ap.error("--repeats, --n and --block-size must be >= 1")
  if args.mem_cap_gib <= 0 or args.timeout_s <= 0:
    ap.error("--mem-cap-gib and --timeout-s must be > 0")
  if args.limit_resolution <= 1 or args.max_n < 1:
    ap.error("--limit-resolution must be > 1 and --max-n >= 1")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    print(_ROW_TAG + json.dumps(child_main(json.loads(args.child))), flush=True)
    return
  if args.probe:
    cfg = json.loads(args.probe)
    print(_ROW_TAG + json.dumps(probe_main(cfg["models"], cfg["num_prompts"])),
          flush=True)
    return
  sweep(args)


if __name__ == "__main__":
  main()
