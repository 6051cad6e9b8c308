"""Builds ``src/fastntk_jax/assets/cifar10_order.npz``: the original CIFAR-10 label order.

The JPEG archive names each image by its rank inside its class, so it loses the
original interleaving of classes. The labels of the original train[0:4000] and
test[0:1000] (from the lossless subset) restore it: original position ``i``
holds label ``y[i]`` and the rank equal to the number of earlier positions with
that label. ``fastntk_jax.data.load_dataset(..., first=N)`` uses this.

Usage (from the repository root)::

  python scripts/make_order_asset.py \
    --lossless ../shared/data/cifar10-lossless-subset.npz \
    --out src/fastntk_jax/assets/cifar10_order.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fastntk_jax.io.atomic import atomic_write
from fastntk_jax.data import load_cifar10_lossless, shared_data_dir

_REPO = Path(__file__).resolve().parents[1]
_DEFAULT_OUT = _REPO / "src" / "fastntk_jax" / "assets" / "cifar10_order.npz"


def build_order(lossless: Path) -> dict[str, np.ndarray]:
  """Returns ``y_train_first4000`` (4000,) and ``y_test_first1000`` (1000,), uint8."""
  _, y_train, _, y_test = load_cifar10_lossless(lossless)
  if y_train.shape != (4000,) or y_test.shape != (1000,):
    raise ValueError(f"{lossless}: expected 4000 train and 1000 test labels, got "
                     f"{y_train.shape} and {y_test.shape}.")
  return {
    "y_train_first4000": y_train.astype(np.uint8),
    "y_test_first1000": y_test.astype(np.uint8),
  }


def main(argv: list[str] | None = None) -> None:
  root = shared_data_dir()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lossless", type=Path,
                      default=None if root is None else root / "cifar10-lossless-subset.npz",
                      help="cifar10-lossless-subset.npz (default: <shared data>/...)")
  parser.add_argument("--out", type=Path, default=_DEFAULT_OUT)
  args = parser.parse_args(argv)
  if args.lossless is None:
    parser.error("no ../shared/data found; pass --lossless PATH")
  arrays = build_order(args.lossless)
  atomic_write(args.out, lambda f: np.savez_compressed(f, **arrays))
  print(f"wrote {args.out} ({args.out.stat().st_size} bytes): "
        + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items()))


if __name__ == "__main__":
  main()
