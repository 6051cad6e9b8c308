"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; MIT licence) from its IDX files.

A real, lossless downstream set that no shipped backbone has seen: the
CIFAR-10 ResNets were trained on CIFAR-10's train split, so every Fashion-MNIST
image is new to them (no leakage, by construction). The four gzipped IDX
files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``) are read with the
standard library and NumPy only; the 28 × 28 grey images are zero-padded by 2
pixels on each side to 32 × 32 (the pixels themselves are unchanged) and the
channel is repeated three times, so the CIFAR backbones take them as they are.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fastntk_jax.io.paths import shared_data_dir

__all__ = ["FASHION_MNIST_CLASSES", "default_dir", "load_split"]

#: The ten classes, in label order (the dataset's README).
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")

_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def default_dir() -> Path | None:
  """``../shared/data/fashion-mnist`` (or under ``$FASTNTK_SHARED_DATA``)."""
  root = shared_data_dir()
  return None if root is None else root / "fashion-mnist"


def _read_idx(path: Path, ndim: int) -> np.ndarray:
  """An unsigned-byte IDX array (magic ``0x0000 08 ndim``), size-checked."""
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"{path}: cannot read it as gzip ({e}); the file is "
                     "truncated or corrupt, fetch it again.") from None
  if len(raw) < 4 + 4 * ndim or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or (
      raw[3] != ndim):
    raise ValueError(f"{path}: not an unsigned-byte IDX file with {ndim} "
                     "dimensions (bad magic number).")
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  body = raw[4 + 4 * ndim:]
  if len(body) != int(np.prod(dims)):
    raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) "
                     f"but the data has {len(body)} bytes; the file is "
                     "truncated or corrupt.")
  return np.frombuffer(body, np.uint8).reshape(dims)


def load_split(root: str | Path | None, split: str):
  """``(x uint8 (N, 32, 32, 3), y int32 (N,), where)`` of one split.

  Args:
    root: the folder holding the four ``.gz`` files (None: :func:`default_dir`).
    split: ``"train"`` (60,000) or ``"test"`` (10,000).

  Raises:
    FileNotFoundError: no folder or a missing file (the message names it).
    ValueError: a malformed file, or images and labels of different counts.
  """
  folder = Path(root).expanduser() if root is not None else default_dir()
  if folder is None or not folder.is_dir():
    raise FileNotFoundError(
        f"Fashion-MNIST: no folder at {folder}; pass 'fashion-mnist:PATH' "
        "(the folder with the four IDX .gz files) or put ../shared/data "
        "beside the project.")
  img_name, lab_name = _FILES[split]
  for name in (img_name, lab_name):
    if not (folder / name).is_file():
      raise FileNotFoundError(f"Fashion-MNIST: {folder / name} is missing.")
  images = _read_idx(folder / img_name, 3)
  labels = _read_idx(folder / lab_name, 1)
  if len(images) != len(labels):
    raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but "
                     f"{len(labels)} labels.")
  if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
    raise ValueError(f"Fashion-MNIST {split}: a label is >= 10.")
  x = np.pad(images, ((0, 0), (2, 2), (2, 2)))
  x = np.repeat(x[..., None], 3, axis=-1)
  return x, labels.astype(np.int32), f"fashion-mnist:{folder.resolve()}"
