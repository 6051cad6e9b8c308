"""What the CIFAR-10 benchmarks share: the data subset, the PEFT ResNet-20,
fine-tuning, accuracy, timed stages and the JSON they write.

Used by ``full_cifar10.py`` and ``approximate_gram.py`` (run them from the
repository root: ``python benchmarks/NAME.py``).
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax import data
from fastntk_jax.core import kernels
from fastntk_jax.evaluation import timing
from fastntk_jax.io import atomic
from fastntk_jax.io.environment import request_host_devices
from fastntk_jax.models import zoo
from fastntk_jax.training import train


def use_host_devices(ap, k: int) -> None:
  """``--host-devices k``: checked, then asked of XLA before JAX starts
  computing (an ``ap.error`` or a clear exit otherwise)."""
  if k < 1:
    ap.error("--host-devices must be >= 1")
  try:
    request_host_devices(k)
  except RuntimeError as e:
    raise SystemExit(f"--host-devices: {e}")


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def accuracy(apply_fn, params, x, y) -> float:
  """Top-1 accuracy in %, NaN on no samples."""
  if len(y) == 0:
    return float("nan")
  logits = kernels.predict(apply_fn, params, x, block_size=1000)
  return float(100 * np.mean(np.asarray(jnp.argmax(logits, -1)) == y))


def rel(a, b) -> float:
  """``‖a − b‖ / ‖b‖`` over flattened pytrees, in float64."""
  a = np.asarray(ravel_pytree(a)[0], np.float64)
  b = np.asarray(ravel_pytree(b)[0], np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def write_json(path: Path, obj) -> None:
  text = json.dumps(obj, indent=1)
  atomic.atomic_write(path, lambda f: f.write(text.encode()))


class Stages:
  """Times named stages (wall and compile seconds, memory) into ``record``."""

  def __init__(self, record: dict):
    self.record = record

  def __call__(self, name, fn):
    with timing.measure() as m:
      value = fn()
      jax.block_until_ready(jax.tree_util.tree_leaves(value))
    self.record[name] = {"seconds": m.seconds,
                         "compile_seconds": m.compile_seconds,
                         "peak_rss_gib": peak_rss_gib(), "rss_gib": rss_gib()}
    print(f"{name}: {m.seconds:.1f} s (compile {m.compile_seconds:.1f} s), "
          f"peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    return value


def load_cifar10(stage: Stages, n_train: int, test_n: int, seed: int):
  """``n_train`` train and ``test_n`` test images of the JPEG CIFAR-10 (a
  seeded random subset when fewer than all), preprocessed for ResNet-20.

  Returns ``(x, y, x_test, y_test, rng)``; ``rng`` continues the seeded
  stream the subsets were drawn from.
  """
  tr, te = stage("load_data", lambda: (data.load_dataset("cifar10-jpeg",
                                                         "train"),
                                       data.load_dataset("cifar10-jpeg",
                                                         "test")))
  rng = np.random.default_rng(seed)
  take = np.sort(rng.choice(len(tr.y), n_train, replace=False)) \
      if n_train < len(tr.y) else np.arange(len(tr.y))
  tk = np.sort(rng.choice(len(te.y), test_n, replace=False)) \
      if test_n < len(te.y) else np.arange(len(te.y))
  prep = jax.jit(zoo.preprocess_fn("resnet20"))

  def preprocess():
    xs = [np.asarray(prep(jnp.asarray(tr.x[take[i:i + 1000]])))
          for i in range(0, len(take), 1000)]
    xt = [np.asarray(prep(jnp.asarray(te.x[tk[i:i + 1000]])))
          for i in range(0, len(tk), 1000)]
    return np.concatenate(xs), np.concatenate(xt)

  x, x_te = stage("preprocess", preprocess)
  return x, tr.y[take], x_te, te.y[tk], rng


def peft_resnet20(seed: int):
  """ResNet-20 (the shipped CIFAR-10 weights) with BatchNorm scale/shift and
  a new 10-class head as the PEFT parameters; ``(model, pretrained)``."""
  module, variables, pretrained = zoo.load_backbone("resnet20")
  model = zoo.peft_model("resnet20", module, variables, num_classes=10,
                         mode="peft", seed=seed)
  return model, bool(pretrained)


def finetune(stage: Stages, model, x, y, loss: str, epochs: int, seed: int):
  """``w_D``: the PEFT parameters fine-tuned on ``(x, y)`` from the new head
  (batch 250, lr 1e-2)."""
  recipe = train.FinetuneConfig(loss=loss, epochs=epochs, batch_size=250,
                                learning_rate=1e-2, seed=seed)
  return stage("finetune", lambda: train.finetune(
      model.apply_fn, model.init_params, x, y, config=recipe).params)
