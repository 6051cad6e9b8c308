"""The Fashion-MNIST reader on IDX files written here in the real format, and
on the shared copy when it is present."""

import gzip

import numpy as np
import pytest

from fastntk_jax.data import fashion_mnist
from fastntk_jax.data import load_dataset


def _idx(path, arr):
  arr = np.asarray(arr, np.uint8)
  head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in arr.shape)
  with gzip.open(path, "wb") as f:
    f.write(head + arr.tobytes())


def _write(tmp_path, n=30, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  labels = np.arange(n) % 10
  for split, (img, lab) in fashion_mnist._FILES.items():  # noqa: SLF001
    _idx(tmp_path / img, images)
    _idx(tmp_path / lab, labels)
  return images, labels


def test_pixels_are_kept_exactly_padded_and_repeated(tmp_path):
  images, labels = _write(tmp_path)
  x, y, where = fashion_mnist.load_split(tmp_path, "train")
  assert x.shape == (30, 32, 32, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(x[:, 2:30, 2:30, 1], images)
  assert np.all(x[:, :2] == 0) and np.all(x[:, :, 30:] == 0)
  assert np.all(x[..., 0] == x[..., 2])
  np.testing.assert_array_equal(y, labels)
  assert where.startswith("fashion-mnist:")
  ds = load_dataset(f"fashion-mnist:{tmp_path}", "test", ipc=2,
                    classes=["trouser", "bag"])
  assert ds.class_names == ("trouser", "bag")
  np.testing.assert_array_equal(ds.y, [0, 1, 0, 1])  # source order
  np.testing.assert_array_equal(ds.x[0, 2:30, 2:30, 0], images[1])


def test_truncated_and_missing_files_are_refused(tmp_path):
  _write(tmp_path)
  img = tmp_path / "t10k-images-idx3-ubyte.gz"
  raw = gzip.decompress(img.read_bytes())
  img.write_bytes(gzip.compress(raw[:-5]))
  with pytest.raises(ValueError, match="truncated or corrupt"):
    fashion_mnist.load_split(tmp_path, "test")
  img.write_bytes(gzip.compress(b"\x00\x00\x09\x03" + raw[4:]))
  with pytest.raises(ValueError, match="bad magic"):
    fashion_mnist.load_split(tmp_path, "test")
  img.write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="gzip"):
    fashion_mnist.load_split(tmp_path, "test")
  img.unlink()
  with pytest.raises(FileNotFoundError, match="t10k-images"):
    fashion_mnist.load_split(tmp_path, "test")
  with pytest.raises(FileNotFoundError, match="fashion-mnist:PATH"):
    fashion_mnist.load_split(tmp_path / "nope", "test")


@pytest.mark.skipif(fashion_mnist.default_dir() is None
                    or not fashion_mnist.default_dir().is_dir(),
                    reason="needs ../shared/data/fashion-mnist")
def test_the_shared_copy_has_all_70k_images():
  tr = load_dataset("fashion-mnist", "train")
  te = load_dataset("fashion-mnist", "test")
  assert len(tr.y) == 60000 and len(te.y) == 10000
  assert np.bincount(tr.y).tolist() == [6000] * 10
  assert np.bincount(te.y).tolist() == [1000] * 10
