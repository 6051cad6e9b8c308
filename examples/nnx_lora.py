"""Fast-NTK on a Flax NNX model with LoRA: forget a CIFAR-10 class.

1. A small NNX CNN (convolutions, BatchNorm, a LoRA-adapted hidden layer, a
   head) is pre-trained on classes 1-9 of the embedded CIFAR-10 subset: the
   backbone has never seen class 0.
2. PEFT = the LoRA factors (``nnx.LoRAParam``) + a new head, selected with an NNX
   filter; BatchNorm runs in inference mode. Fine-tuned with cross-entropy on
   all ten classes.
3. Class 0 is forgotten with ``unlearn`` (the linearised cross-entropy retrain
   over the PEFT parameters), compared with Retrain (the same fine-tuning on
   D_r only), and the unlearned parameters are written back into the model.

    python examples/nnx_lora.py                 # ~25 s on 2 CPU cores
    python examples/nnx_lora.py --ipc 20 --pretrain-epochs 2 --epochs 5
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fastntk_jax as F
from fastntk_jax import data
from fastntk_jax.evaluation import metrics
from fastntk_jax.peft import nnx as peft_nnx
from fastntk_jax.data import splits
from fastntk_jax.training import train
from fastntk_jax.models import normalize_cifar


class Net(nnx.Module):
  """conv-BN-ReLU ×2, global average pool, LoRA hidden layer, head."""

  def __init__(self, rngs: nnx.Rngs, num_classes: int = 10, rank: int = 4):
    self.conv1 = nnx.Conv(3, 32, (3, 3), strides=2, rngs=rngs)
    self.bn1 = nnx.BatchNorm(32, rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(64, rngs=rngs)
    self.hidden = nnx.LoRALinear(64, 64, lora_rank=rank, rngs=rngs)
    self.head = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = jax.nn.relu(self.bn2(self.conv2(x)))
    return self.head(jax.nn.relu(self.hidden(x.mean((1, 2)))))


def pretrain(model: Net, x, y, epochs: int, seed: int) -> None:
  """Every weight, BatchNorm in training mode, Adam on cross-entropy."""
  # The LoRA factors stay at their initialisation (B = 0): LoRA is for PEFT.
  backbone = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=backbone)

  @nnx.jit
  def step(model, opt, xb, yb):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()
    grad_fn = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, backbone))
    value, grads = grad_fn(model)
    opt.update(model, grads)
    return value

  model.train()
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(y))
    for s in range(0, len(y), 64):
      idx = order[s:s + 64]
      step(model, opt, jnp.asarray(x[idx]), jnp.asarray(y[idx]))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ipc", type=int, default=100, help="images a class, 1..100")
  ap.add_argument("--pretrain-epochs", type=int, default=8)
  ap.add_argument("--epochs", type=int, default=20, help="PEFT fine-tuning epochs")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  if not 1 <= args.ipc <= 100:
    ap.error("--ipc must be in 1..100 (the embedded subset has 100 a class)")
  t0 = time.perf_counter()
  xtr, ytr, xte, yte = data.load_embedded_cifar10()
  keep = np.concatenate([np.flatnonzero(ytr == c)[:args.ipc] for c in range(10)])
  x, y = np.asarray(normalize_cifar(xtr[keep])), ytr[keep]
  xt = np.asarray(normalize_cifar(xte))

  model = Net(nnx.Rngs(args.seed))
  pretrain(model, x[y != 0], y[y != 0], args.pretrain_epochs, args.seed)
  model.head = nnx.Linear(64, 10, rngs=nnx.Rngs(args.seed + 1))  # new head
  sel = peft_nnx.make_apply_fn(model, peft_nnx.any_of(peft_nnx.lora(),
                                                      peft_nnx.head()))
  print(f"NNX CNN: {sel.num_total:,} parameters, PEFT (LoRA + head): "
        f"{sel.num_peft:,} ({100 * sel.num_peft / sel.num_total:.2f} %); "
        f"pre-trained on classes 1-9 in {time.perf_counter() - t0:.0f}s")

  retain, forget = splits.class_split(x, y, [0])
  cfg = train.FinetuneConfig(loss="ce", epochs=args.epochs, seed=args.seed)
  full = train.finetune(sel.apply_fn, sel.init_params, x, y, config=cfg)
  retrain = train.finetune(sel.apply_fn, sel.init_params, *retain, config=cfg)
  res = F.unlearn(sel.apply_fn, full.params, retain, forget,
                  anchor=sel.init_params, loss="ce")
  print(f"Fast-NTK: {res.solver} solver, {res.seconds:.1f}s, Newton steps "
        f"{[r.iterations for r in res.solves]}, converged {res.converged}")

  report = lambda p: metrics.class_forgetting_report(
      sel.apply_fn, p, retain, forget, (xt, yte), [0])
  print(f"\n{'Accuracy (%)':26s}{'D_r':>8s}{'D_f':>8s}{'test':>8s}"
        f"{'test D_r cls':>14s}{'test D_f cls':>14s}")
  for name, p in (("Before (fine-tuned on D)", full.params),
                  ("Fast-NTK", res.params), ("Retrain (on D_r)", retrain.params)):
    r = report(p)
    print(f"{name:26s}{100 * r['retain']:8.1f}{100 * r['forget']:8.1f}"
          f"{100 * r['test']:8.1f}{100 * r['test_retained']:14.1f}"
          f"{100 * r['test_forgotten']:14.1f}")

  peft_nnx.update(model, res.params)  # the deployed NNX model now forgets
  model.eval()
  acc = float(np.mean(np.asarray(model(jnp.asarray(forget[0]))).argmax(-1) == 0))
  print(f"\nthe updated nnx model on D_f: {100 * acc:.1f} % "
        f"(total {time.perf_counter() - t0:.0f}s)")
  return report(res.params), report(retrain.params)


if __name__ == "__main__":
  main()
