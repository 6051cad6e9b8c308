"""Tests for fastntk_jax.data and the scripts that build its assets."""

import importlib.util
import io
import re
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastntk_jax.data import cifar10
from fastntk_jax.data import datasets
from fastntk_jax.data import (
  CIFAR10_CLASSES,
  ImageDataset,
  load_cifar10_lossless,
  load_dataset,
  load_embedded_cifar10,
  read_cifar10_jpeg_zip,
  read_cifar10_jpeg_zip_with_names,
  shared_data_dir,
)

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "fastntk_jax" / "assets"
EMBEDDED = ASSETS / "cifar10_embedded.npz"


def _script(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _jpeg(colour: tuple[int, int, int]) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (32, 32), colour).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


# class -> rank -> solid colour; ranks 2 and 10 check numeric (not lexical) sorting.
_TINY = {
  "airplane": {10: (200, 10, 10), 2: (10, 200, 10)},
  "cat": {2: (10, 10, 200), 10: (240, 240, 240)},
}


def _make_zip(path: Path, extra_members: tuple[str, ...] = ()) -> Path:
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("cifar10/", b"")
    for split in ("train", "test"):
      zf.writestr(f"cifar10/{split}/", b"")
      for cls, images in _TINY.items():
        zf.writestr(f"cifar10/{split}/{cls}/", b"")
        for rank, colour in images.items():
          zf.writestr(f"cifar10/{split}/{cls}/{rank}.jpg", _jpeg(colour))
    for name in extra_members:
      zf.writestr(name, _jpeg((0, 0, 0)))
  return path


# ------------------------------------------------------------------ legacy readers


def test_embedded_shapes_dtypes_balance():
  x_train, y_train, x_test, y_test = load_embedded_cifar10()
  for x, y in ((x_train, y_train), (x_test, y_test)):
    assert x.shape == (1000, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (1000,) and y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 100))
    assert 20 < x.mean() < 235  # real images, not blank
  with np.load(EMBEDDED, allow_pickle=False) as npz:  # no object arrays inside
    assert tuple(npz["label_names"]) == CIFAR10_CLASSES
    assert npz["train_files"][0] == "cifar10/train/airplane/0000.jpg"
    assert npz["test_files"][-1] == "cifar10/test/truck/0099.jpg"


def test_read_tiny_zip(tmp_path):
  path = _make_zip(tmp_path / "tiny.zip")
  x, y, names = read_cifar10_jpeg_zip_with_names(path, "train")
  assert x.shape == (4, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int32
  np.testing.assert_array_equal(y, [0, 0, 3, 3])
  assert names == [
    "cifar10/train/airplane/2.jpg",
    "cifar10/train/airplane/10.jpg",
    "cifar10/train/cat/2.jpg",
    "cifar10/train/cat/10.jpg",
  ]
  expected = np.array([_TINY[c][r] for c in ("airplane", "cat") for r in (2, 10)])
  np.testing.assert_allclose(x.mean(axis=(1, 2)), expected, atol=6)  # JPEG is lossy
  x1, y1 = read_cifar10_jpeg_zip(path, split="test", per_class=1)
  np.testing.assert_array_equal(y1, [0, 3])
  np.testing.assert_array_equal(x1, x[[0, 2]])


def test_read_zip_argument_errors(tmp_path):
  path = _make_zip(tmp_path / "tiny.zip")
  with pytest.raises(ValueError, match="split must be one of"):
    read_cifar10_jpeg_zip(path, split="val")
  with pytest.raises(ValueError, match="per_class"):
    read_cifar10_jpeg_zip(path, per_class=0)
  with pytest.raises(ValueError, match="per_class=3 but class 'airplane' has only 2"):
    read_cifar10_jpeg_zip(path, per_class=3)
  with pytest.raises(FileNotFoundError):
    read_cifar10_jpeg_zip(tmp_path / "absent.zip")


@pytest.mark.parametrize(
  "member, reason",
  [
    ("cifar10/train/../../evil.jpg", r"'\.\.' components"),
    ("/etc/evil.jpg", "absolute"),
    ("C:/evil.jpg", "absolute"),
  ],
)
def test_zip_rejects_escaping_members(tmp_path, member, reason):
  path = _make_zip(tmp_path / "evil.zip", extra_members=(member,))
  with zipfile.ZipFile(path) as zf:
    assert member in zf.namelist()  # stored verbatim, so the reader must refuse it
  with pytest.raises(ValueError, match=reason):
    read_cifar10_jpeg_zip(path)
  with pytest.raises(ValueError, match=reason):
    load_dataset(f"cifar10-jpeg:{path}", cache_dir=tmp_path / "cache")


def test_zip_malformed(tmp_path):
  not_zip = tmp_path / "data.zip"
  not_zip.write_bytes(b"this is not a zip archive" * 10)
  with pytest.raises(ValueError, match="not a valid zip archive"):
    read_cifar10_jpeg_zip(not_zip)
  with pytest.raises(ValueError, match="not a valid zip archive"):
    load_dataset(str(not_zip), cache_dir=tmp_path / "cache")  # a path ending in .zip

  wrong_layout = tmp_path / "layout.zip"
  with zipfile.ZipFile(wrong_layout, "w") as zf:
    zf.writestr("images/0000.jpg", _jpeg((1, 2, 3)))
  with pytest.raises(ValueError, match="no images for split 'train'"):
    read_cifar10_jpeg_zip(wrong_layout)

  bad_class = _make_zip(tmp_path / "class.zip", extra_members=("cifar10/train/unicorn/0000.jpg",))
  with pytest.raises(ValueError, match="unknown class folder 'unicorn'"):
    read_cifar10_jpeg_zip(bad_class)

  bad_image = tmp_path / "image.zip"
  with zipfile.ZipFile(bad_image, "w") as zf:
    zf.writestr("cifar10/train/cat/0000.jpg", b"not a jpeg")
  with pytest.raises(ValueError, match="cannot decode member 'cifar10/train/cat/0000.jpg'"):
    read_cifar10_jpeg_zip(bad_image)
  with pytest.raises(FileNotFoundError, match="no CIFAR-10 JPEG archive"):
    load_dataset(f"cifar10-jpeg:{tmp_path / 'absent.zip'}", cache_dir=tmp_path / "cache")


def test_embedded_script_writes_plain_npz(tmp_path):
  out = tmp_path / "sub" / "subset.npz"
  _script("make_embedded_subset").main([
    "--zip", str(_make_zip(tmp_path / "tiny.zip")), "--per-class-train", "2",
    "--per-class-test", "1", "--out", str(out),
  ])
  assert [p.name for p in out.parent.iterdir()] == ["subset.npz"]  # no temp file left
  with np.load(out, allow_pickle=False) as npz:
    assert npz["x_train"].shape == (4, 32, 32, 3) and npz["y_train"].dtype == np.uint8
    assert list(npz["test_files"]) == ["cifar10/test/airplane/2.jpg", "cifar10/test/cat/2.jpg"]


# ------------------------------------------------------------------ load_dataset: embedded


def test_load_embedded_matches_legacy_loader():
  x_train, y_train, x_test, y_test = load_embedded_cifar10()
  for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
    ds = load_dataset("embedded", split)
    assert isinstance(ds, ImageDataset)
    assert ds.x.dtype == np.uint8 and ds.y.dtype == np.int32
    np.testing.assert_array_equal(ds.x, x)
    np.testing.assert_array_equal(ds.y, y)
    assert ds.class_names == CIFAR10_CLASSES and ds.source == "embedded"


def test_classes_relabel_in_given_order_then_ipc():
  full = load_dataset("embedded", "test")
  ds = load_dataset("embedded", "test", classes=["cat", 1], ipc=3)
  assert ds.class_names == ("cat", "automobile")
  # Source order is kept (class-major: automobile before cat); labels follow the given order.
  np.testing.assert_array_equal(ds.y, [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(ds.x, full.x[[100, 101, 102, 300, 301, 302]])
  ds = load_dataset("embedded", "train", ipc=7)
  np.testing.assert_array_equal(np.bincount(ds.y), np.full(10, 7))


def test_image_size_resizes_with_pillow_bicubic():
  ds = load_dataset("embedded", "test", classes=[0], ipc=2, image_size=64)
  assert ds.x.shape == (2, 64, 64, 3) and ds.x.dtype == np.uint8
  src = load_dataset("embedded", "test", ipc=1).x[0]
  ref = np.asarray(Image.fromarray(src).resize((64, 64), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(ds.x[0], ref)
  small = load_dataset("embedded", "test", ipc=1, image_size=8)
  assert small.x.shape == (10, 8, 8, 3)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(split="val"), ValueError, "split must be one of"),
    (dict(ipc=0), ValueError, "ipc must be a positive int"),
    (dict(ipc=True), ValueError, "ipc must be a positive int"),
    (dict(ipc=2.0), ValueError, "ipc must be a positive int"),
    (dict(ipc=101), ValueError, r"ipc=101 but class 0 \('airplane'\) has only 100"),
    (dict(image_size=-3), ValueError, "image_size must be a positive int"),
    (dict(first=10), ValueError, "first= applies only to the CIFAR-10 sources"),
    (dict(first=0), ValueError, "first must be a positive int"),
    (dict(classes="cat"), ValueError, "wrap a single class in a list"),
    (dict(classes=[]), ValueError, "classes is empty"),
    (dict(classes=["unicorn"]), ValueError, "unknown class 'unicorn'.*'airplane'"),
    (dict(classes=[10]), ValueError, r"neither a class name nor an index in 0\.\.9"),
    (dict(classes=["cat", 3]), ValueError, "lists a class twice"),
    (dict(tfds_data_dir="/tmp"), ValueError, "apply only to 'tfds:NAME'"),
  ],
)
def test_load_dataset_argument_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    load_dataset("embedded", **kwargs)


@pytest.mark.parametrize("source", ["cifar100", "", "tfds:", "folder:", "/no/such/dir", 3])
def test_unknown_source_lists_forms(source):
  with pytest.raises(ValueError, match="source"):
    load_dataset(source)
  if source == "cifar100":
    with pytest.raises(ValueError, match="'embedded', 'cifar10-jpeg'.*'tfds:NAME'"):
      load_dataset(source)


# ------------------------------------------------------------------ load_dataset: JPEG zip cache


def test_jpeg_zip_cache_hit_and_rebuild(tmp_path, monkeypatch):
  path = _make_zip(tmp_path / "tiny.zip")
  cache = tmp_path / "cache"
  calls = []
  real_read_zip = cifar10._read_zip
  monkeypatch.setattr(cifar10, "_read_zip", lambda *a: calls.append(a) or real_read_zip(*a))

  ds = load_dataset(f"cifar10-jpeg:{path}", "train", cache_dir=cache)
  np.testing.assert_array_equal(ds.y, [0, 0, 3, 3])
  assert ds.source == f"cifar10-jpeg:{path.resolve()}"
  (cached,) = cache.iterdir()  # one file, no temp file left behind
  assert cached.name.startswith("cifar10-jpeg-") and cached.name.endswith("-train-v1.npz")
  with np.load(cached, allow_pickle=False) as npz:
    assert npz["x"].dtype == npz["y"].dtype == np.uint8
  assert len(calls) == 1

  # A hit does not decode.
  def fail(*_):
    raise AssertionError("decoded despite a cache hit")

  monkeypatch.setattr(cifar10, "_read_zip", fail)
  hit = load_dataset(str(path), "train", cache_dir=cache, classes=["cat"])
  np.testing.assert_array_equal(hit.x, ds.x[2:])
  assert hit.class_names == ("cat",)

  # A truncated cache file is reported and rebuilt; so is one with a flipped byte.
  monkeypatch.setattr(cifar10, "_read_zip", lambda *a: calls.append(a) or real_read_zip(*a))
  raw = cached.read_bytes()
  for damaged in (raw[: len(raw) // 2], raw[:300] + bytes([raw[300] ^ 0xFF]) + raw[301:]):
    cached.write_bytes(damaged)
    with pytest.warns(UserWarning, match="ignoring corrupt cache file"):
      again = load_dataset(str(path), "train", cache_dir=cache)
    np.testing.assert_array_equal(again.x, ds.x)
    with np.load(cached, allow_pickle=False) as npz:  # rewritten in full
      np.testing.assert_array_equal(npz["x"], ds.x)
  assert len(calls) == 3

  # Another archive (other bytes) gets its own cache file; the split is part of the key.
  other = _make_zip(tmp_path / "other.zip", extra_members=("cifar10/test/cat/0003.jpg",))
  load_dataset(str(other), "test", cache_dir=cache)
  load_dataset(str(path), "test", cache_dir=cache)
  assert len(list(cache.iterdir())) == 3


def test_jpeg_cache_dir_from_env_and_unwritable(tmp_path, monkeypatch):
  path = _make_zip(tmp_path / "tiny.zip")
  monkeypatch.setenv("FASTNTK_CACHE", str(tmp_path / "envcache"))
  load_dataset(str(path), "test")
  assert len(list((tmp_path / "envcache").iterdir())) == 1
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.warns(UserWarning, match="could not write the cache file"):
    ds = load_dataset(str(path), "test", cache_dir=blocker)
  assert ds.x.shape == (4, 32, 32, 3)


@pytest.mark.parametrize("source", ["cifar10-jpeg", "cifar10-lossless"])
def test_shared_sources_without_shared_data(monkeypatch, source):
  monkeypatch.setattr(cifar10, "shared_data_dir", lambda: None)
  with pytest.raises(FileNotFoundError, match=f"pass '{source}:PATH' or set FASTNTK_SHARED_DATA"):
    load_dataset(source)


def test_jpeg_first_needs_known_ranks(tmp_path):
  path = _make_zip(tmp_path / "tiny.zip")
  # The original test[0] is a cat of rank 0, which the tiny archive lacks.
  with pytest.raises(ValueError, match=r"first=1 needs cifar10/test/cat/0000\.jpg"):
    load_dataset(str(path), "test", first=1, cache_dir=tmp_path)
  with pytest.raises(ValueError, match=r"known only for its first 1000 images"):
    load_dataset(str(path), "test", first=1001, cache_dir=tmp_path)


def test_order_asset():
  with np.load(ASSETS / "cifar10_order.npz", allow_pickle=False) as npz:
    y_train, y_test = npz["y_train_first4000"], npz["y_test_first1000"]
  assert y_train.shape == (4000,) and y_test.shape == (1000,) and y_test.dtype == np.uint8
  np.testing.assert_array_equal(
    np.bincount(y_test, minlength=10), [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
  )


# ------------------------------------------------------------------ shared data (skipped if absent)


def test_shared_data_dir(shared_data):
  assert shared_data_dir() == shared_data


def test_lossless_subset(shared_data):
  x_train, _, x_test, y_test = load_cifar10_lossless(shared_data / "cifar10-lossless-subset.npz")
  assert x_train.shape == (4000, 32, 32, 3) and x_test.shape == (1000, 32, 32, 3)
  assert y_test.dtype == np.int32
  ds = load_dataset("cifar10-lossless", "test", first=50, ipc=2)
  assert ds.source == f"cifar10-lossless:{shared_data / 'cifar10-lossless-subset.npz'}"
  idx = np.concatenate([np.flatnonzero(y_test[:50] == c)[:2] for c in range(10)])
  np.testing.assert_array_equal(ds.x, x_test[np.sort(idx)])
  with pytest.raises(ValueError, match="holds only 1000 test images"):
    load_dataset("cifar10-lossless", "test", first=1001)


def test_order_asset_matches_lossless_and_script(shared_data, tmp_path):
  _, y_train, _, y_test = load_cifar10_lossless()
  with np.load(ASSETS / "cifar10_order.npz", allow_pickle=False) as npz:
    np.testing.assert_array_equal(npz["y_train_first4000"], y_train)
    np.testing.assert_array_equal(npz["y_test_first1000"], y_test)
  out = tmp_path / "order.npz"
  _script("make_order_asset").main(["--out", str(out)])
  with np.load(out, allow_pickle=False) as npz:
    np.testing.assert_array_equal(npz["y_test_first1000"], y_test)


def test_real_zip_matches_embedded(shared_data):
  x_train, y_train, x_test, y_test = load_embedded_cifar10()
  zip_path = shared_data / "cifar10-jpeg.zip"
  for split, x_emb, y_emb in (("train", x_train, y_train), ("test", x_test, y_test)):
    x, y = read_cifar10_jpeg_zip(zip_path, split, per_class=100)
    np.testing.assert_array_equal(x, x_emb)
    np.testing.assert_array_equal(y, y_emb)


@pytest.fixture(scope="module")
def jpeg_cache(tmp_path_factory):
  """One cache folder for the module: the 10k-image test split is decoded once (~1.5 s)."""
  return tmp_path_factory.mktemp("jpeg_cache")


def test_real_zip_first_matches_lossless_order(shared_data, jpeg_cache):
  _, _, x_test, y_test = load_cifar10_lossless()
  ds = load_dataset("cifar10-jpeg", "test", first=1000, cache_dir=jpeg_cache)
  np.testing.assert_array_equal(ds.y, y_test)  # same labels, same order
  mae = np.abs(ds.x.astype(np.float64) - x_test).mean()
  assert mae < 10, mae  # only the JPEG compression shift (about 5.8/255)
  # first, then ipc: the first 3 of each class among the first 1000, in original order.
  sub = load_dataset("cifar10-jpeg", "test", first=1000, ipc=3, cache_dir=jpeg_cache)
  idx = np.sort(np.concatenate([np.flatnonzero(y_test == c)[:3] for c in range(10)]))
  np.testing.assert_array_equal(sub.x, ds.x[idx])


def test_real_zip_ipc_matches_embedded(shared_data, jpeg_cache):
  _, _, x_test, y_test = load_embedded_cifar10()
  ds = load_dataset("cifar10-jpeg", "test", ipc=100, cache_dir=jpeg_cache)
  assert ds.x.shape == (1000, 32, 32, 3)
  np.testing.assert_array_equal(ds.x, x_test)
  np.testing.assert_array_equal(ds.y, y_test)


# ------------------------------------------------------------------ load_dataset: image folders


def _save(path: Path, image: Image.Image) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path)


def _solid(colour, size=(8, 8), mode="RGB") -> Image.Image:
  return Image.new(mode, size, colour)


@pytest.fixture
def folder(tmp_path) -> Path:
  """root/{train,test}/{ant,bird,cat}: png and jpg files, a nested folder, clutter to ignore."""
  root = tmp_path / "imgs"
  for split in ("train", "test"):
    _save(root / split / "bird" / "10.png", _solid((0, 0, 100)))
    _save(root / split / "bird" / "2.PNG", _solid((0, 0, 20)))
    _save(root / split / "ant" / "b.jpeg", _solid((250, 250, 250)))
    _save(root / split / "ant" / "a.JPG", _solid((128, 128, 128)))
    _save(root / split / "cat" / "sub" / "1.png", _solid((77,), mode="L"))  # grayscale
    _save(root / split / "cat" / "0.png", _solid((1, 2, 3, 0), mode="RGBA"))
  (root / "train" / "ant" / "notes.txt").write_text("ignored")
  _save(root / "train" / ".cache" / "x.png", _solid((9, 9, 9)))  # hidden: not a class
  return root


def test_folder_labels_order_and_rgb(folder):
  ds = load_dataset(f"folder:{folder}", "train")
  assert ds.class_names == ("ant", "bird", "cat") and ds.source == f"folder:{folder.resolve()}"
  assert ds.x.shape == (6, 8, 8, 3) and ds.x.dtype == np.uint8
  np.testing.assert_array_equal(ds.y, [0, 0, 1, 1, 2, 2])
  means = ds.x.mean(axis=(1, 2))
  np.testing.assert_allclose(means[:2], [[128] * 3, [250] * 3], atol=3)  # a.JPG, b.jpeg
  np.testing.assert_array_equal(means[2:4], [[0, 0, 20], [0, 0, 100]])  # 2.PNG before 10.png
  np.testing.assert_array_equal(means[4:], [[1, 2, 3], [77, 77, 77]])  # 0.png, then sub/1.png
  same = load_dataset(str(folder), "test", classes=["cat", "ant"], ipc=1)  # a bare directory
  assert same.class_names == ("cat", "ant")
  np.testing.assert_array_equal(same.y, [1, 0])
  np.testing.assert_array_equal(same.x, ds.x[[0, 4]])


def test_folder_sizes_and_resize(folder):
  _save(folder / "train" / "bird" / "11.png", _solid((5, 5, 5), size=(12, 6)))
  with pytest.raises(ValueError, match="images differ in size.*11.png.*pass image_size="):
    load_dataset(str(folder), "train")
  ds = load_dataset(str(folder), "train", image_size=16)
  assert ds.x.shape == (7, 16, 16, 3)
  np.testing.assert_array_equal(ds.x[4], np.full((16, 16, 3), 5))


def test_folder_errors(folder, tmp_path):
  with pytest.raises(ValueError, match="first= applies only"):
    load_dataset(str(folder), first=2)
  with pytest.raises(ValueError, match=r"ipc=3 but class 0 \('ant'\) has only 2"):
    load_dataset(str(folder), ipc=3)
  with pytest.raises(ValueError, match="unknown class 'dog'"):
    load_dataset(str(folder), classes=["dog"])

  (folder / "test").rename(folder / "val")
  with pytest.raises(FileNotFoundError, match="test does not exist.*pass another split"):
    load_dataset(str(folder), "test")

  bare = tmp_path / "bare"
  _save(bare / "test" / "loose.png", _solid((1, 1, 1)))
  _save(bare / "test" / ".hidden" / "x.png", _solid((1, 1, 1)))
  with pytest.raises(FileNotFoundError, match="test has no class folders; put the images in"):
    load_dataset(f"folder:{bare}", "test")

  (folder / "train" / "empty").mkdir()
  (folder / "train" / "empty" / "readme.txt").write_text("no images")
  with pytest.raises(ValueError, match="class folder .*empty holds no .jpg/.jpeg/.png images"):
    load_dataset(str(folder), "train")
  (folder / "train" / "empty" / "readme.txt").unlink()
  (folder / "train" / "empty").rmdir()

  bad = folder / "train" / "bird" / "3.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
  with pytest.raises(ValueError, match=r"cannot read image .*3\.png.*replace or remove"):
    load_dataset(str(folder), "train")
  bad.unlink()

  outside = tmp_path / "outside.png"
  _save(outside, _solid((1, 1, 1)))
  (folder / "train" / "bird" / "4.png").symlink_to(outside)
  with pytest.raises(ValueError, match="outside the dataset root"):
    load_dataset(str(folder), "train")
  (folder / "train" / "bird" / "4.png").unlink()
  (folder / "train" / "dogs").symlink_to(tmp_path, target_is_directory=True)
  with pytest.raises(ValueError, match="outside the dataset root"):
    load_dataset(str(folder), "train")
  (folder / "train" / "dogs").unlink()

  # A symlink that stays inside the root is fine.
  (folder / "train" / "bird" / "9.png").symlink_to(folder / "val" / "bird" / "2.PNG")
  assert load_dataset(str(folder), "train").y.tolist() == [0, 0, 1, 1, 1, 2, 2]


# ------------------------------------------------------------------ load_dataset: TFDS


def test_import_does_not_load_tensorflow():
  code = (
    "import sys, fastntk_jax.data\n"
    "heavy = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]\n"
    "assert not heavy, heavy\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tfds_missing_dataset(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  where = re.escape(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=f"not prepared in {where}.*tfds build cifar10"):
    load_dataset("tfds:cifar10", tfds_data_dir=tmp_path)
  monkeypatch.setenv("FASTNTK_TFDS_DATA_DIR", str(tmp_path / "env"))
  with pytest.raises(FileNotFoundError, match="tfds build cifar100.*FASTNTK_TFDS_DATA_DIR"):
    load_dataset("tfds:cifar100", "test")
  with pytest.raises(ValueError, match="tfds has no dataset 'no_such_dataset_xyz'"):
    load_dataset("tfds:no_such_dataset_xyz")


class _FakeBuilder:
  """Stands in for a prepared ``tfds.core.DatasetBuilder``."""

  def __init__(self, examples, prepared=True):
    self.examples = examples
    self.prepared = prepared
    self.read = 0
    label = types.SimpleNamespace(names=["a", "b", "c"])
    self.info = types.SimpleNamespace(
      name="fake", supervised_keys=("image", "label"), features={"label": label},
      splits={"train": None},
    )

  def is_prepared(self):
    return self.prepared

  def as_dataset(self, split, shuffle_files, as_supervised):
    assert split == "train" and not shuffle_files and as_supervised
    for example in self.examples:
      self.read += 1
      yield example


def _fake_tfds(monkeypatch, builder):
  calls = []

  def make_builder(name, data_dir=None):
    calls.append((name, data_dir))
    return builder

  fake = types.SimpleNamespace(
    builder=make_builder,
    as_numpy=lambda ds: ds,
    core=types.SimpleNamespace(registered=types.SimpleNamespace(DatasetNotFoundError=KeyError)),
  )
  monkeypatch.setattr(datasets, "_import_tfds", lambda: fake)
  return calls


def test_tfds_conversion_with_a_fake_builder(monkeypatch):
  rng = np.random.default_rng(0)
  examples = [  # label, then grayscale / RGB / RGBA images of two sizes
    (rng.integers(0, 256, (6, 6, 1), dtype=np.uint8), 2),
    (rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), 0),
    (rng.integers(0, 256, (6, 6, 4), dtype=np.uint8), 2),
    (rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), 1),
    (rng.integers(0, 256, (9, 5, 3), dtype=np.uint8), 0),
  ]
  builder = _FakeBuilder(examples)
  calls = _fake_tfds(monkeypatch, builder)
  ds = load_dataset("tfds:fake", ipc=1, classes=["c", "a"], tfds_data_dir="/data")
  assert calls == [("fake", "/data")]
  assert ds.class_names == ("c", "a") and ds.source == "tfds:fake"
  np.testing.assert_array_equal(ds.y, [0, 1])
  np.testing.assert_array_equal(ds.x[0], np.repeat(examples[0][0], 3, axis=-1))  # gray -> RGB
  np.testing.assert_array_equal(ds.x[1], examples[1][0])
  assert builder.read == 2  # stopped as soon as every class had ipc images

  with pytest.raises(ValueError, match="images differ in size.*pass image_size="):
    load_dataset("tfds:fake")
  ds = load_dataset("tfds:fake", image_size=4)
  assert ds.x.shape == (5, 4, 4, 3)
  np.testing.assert_array_equal(ds.y, [2, 0, 2, 1, 0])
  np.testing.assert_array_equal(ds.x[2], np.asarray(
    Image.fromarray(examples[2][0][..., :3]).resize((4, 4), Image.Resampling.BICUBIC)))
  with pytest.raises(ValueError, match=r"ipc=2 but class 1 \('b'\) has only 1"):
    load_dataset("tfds:fake", ipc=2, image_size=4)
  with pytest.raises(ValueError, match=r"no split 'test'; it has \['train'\]"):
    load_dataset("tfds:fake", "test")
  with pytest.raises(ValueError, match="first= applies only"):
    load_dataset("tfds:fake", first=3)

  builder.prepared = False
  with pytest.raises(FileNotFoundError, match="tfds build fake"):
    load_dataset("tfds:fake")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    builder.download_and_prepare = lambda: setattr(builder, "prepared", True)
    assert load_dataset("tfds:fake", ipc=1, tfds_download=True).y.tolist() == [2, 0, 1]


def test_jpeg_cache_write_failure_warns_and_leaves_nothing(tmp_path, monkeypatch):
  path = _make_zip(tmp_path / "tiny.zip")
  cache = tmp_path / "cache"

  def disk_full(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", disk_full)
  with pytest.warns(UserWarning, match="could not write the cache file"):
    ds = load_dataset(str(path), "test", cache_dir=cache)
  assert ds.x.shape == (4, 32, 32, 3)
  assert list(cache.iterdir()) == []  # no temporary file left behind
