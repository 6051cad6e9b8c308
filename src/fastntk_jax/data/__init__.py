"""Data sources and splits.

* :mod:`~fastntk_jax.data.datasets` — CIFAR-10 (embedded subset, lossless
  subset, JPEG archive), image folders and TFDS, as ``ImageDataset``;
* :mod:`~fastntk_jax.data.splits` — forget/retain splits (by class or at
  random) and images-per-class subsets.
"""

from fastntk_jax.data import splits
from fastntk_jax.data.datasets import CIFAR10_CLASSES
from fastntk_jax.data.datasets import ImageDataset
from fastntk_jax.data.datasets import load_cifar10_lossless
from fastntk_jax.data.datasets import load_dataset
from fastntk_jax.data.datasets import load_embedded_cifar10
from fastntk_jax.data.datasets import read_cifar10_jpeg_zip
from fastntk_jax.data.datasets import read_cifar10_jpeg_zip_with_names
from fastntk_jax.io.paths import shared_data_dir

__all__ = [
  "CIFAR10_CLASSES",
  "ImageDataset",
  "load_cifar10_lossless",
  "load_dataset",
  "load_embedded_cifar10",
  "read_cifar10_jpeg_zip",
  "read_cifar10_jpeg_zip_with_names",
  "shared_data_dir",
  "splits",
]
