"""Data sources and splits.

* :mod:`~fastntk_jax.data.datasets` — ``load_dataset``: every source (CIFAR-10,
  image folders, TFDS) as an ``ImageDataset``;
* :mod:`~fastntk_jax.data.cifar10` — CIFAR-10 here: the embedded subset, the
  exact-pixel subset, the JPEG archive and its cache, the original order;
* :mod:`~fastntk_jax.data.splits` — forget/retain splits (by class or at
  random) and images-per-class subsets.
"""

from fastntk_jax.data import cifar10
from fastntk_jax.data import splits
from fastntk_jax.data.cifar10 import CIFAR10_CLASSES
from fastntk_jax.data.cifar10 import load_cifar10_lossless
from fastntk_jax.data.cifar10 import load_embedded_cifar10
from fastntk_jax.data.cifar10 import read_cifar10_jpeg_zip
from fastntk_jax.data.cifar10 import read_cifar10_jpeg_zip_with_names
from fastntk_jax.data.datasets import ImageDataset
from fastntk_jax.data.datasets import load_dataset
from fastntk_jax.io.paths import shared_data_dir

__all__ = [
  "CIFAR10_CLASSES",
  "ImageDataset",
  "cifar10",
  "load_cifar10_lossless",
  "load_dataset",
  "load_embedded_cifar10",
  "read_cifar10_jpeg_zip",
  "read_cifar10_jpeg_zip_with_names",
  "shared_data_dir",
  "splits",
]
