"""Image datasets as plain NumPy arrays: one entry point, :func:`load_dataset`.

Images are ``uint8`` of shape ``(N, H, W, 3)`` (RGB, HWC) and labels ``int32``
of shape ``(N,)``; normalisation for a particular model lives with that model
(see :func:`fastntk_jax.models.normalize_cifar`). Sources:

* ``"embedded"`` — shipped with the package (``assets/cifar10_embedded.npz``):
  the first 100 train and 100 test images of each CIFAR-10 class of the JPEG
  archive, class-major.
* ``"cifar10-jpeg"`` — ``<shared data>/cifar10-jpeg.zip`` (or
  ``"cifar10-jpeg:PATH"``, or any path ending in ``.zip``): all 60,000 images
  as ``cifar10/<split>/<class>/NNNN.jpg``, where ``NNNN`` is the image's rank
  in its class in the original CIFAR-10 order. Read in place, decoded once per
  split and cached (see :func:`load_dataset`). Class-major order.
* ``"cifar10-lossless"`` — ``<shared data>/cifar10-lossless-subset.npz`` (or
  ``"cifar10-lossless:PATH"``): exact pixels of the original train[0:4000] and
  test[0:1000], in the original order.
* ``"folder:ROOT"`` or a directory — ``ROOT/<split>/<class>/**/*.{jpg,jpeg,png}``.
* ``"tfds:NAME"`` — a prepared TensorFlow Datasets dataset (``tfds:cifar100``,
  ``tfds:imagenet_r``, ...); tensorflow-datasets is imported only here.

The older per-source readers (:func:`load_embedded_cifar10`,
:func:`load_cifar10_lossless`, :func:`read_cifar10_jpeg_zip`) stay available.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from fastntk_jax.data import splits
from fastntk_jax.data import cifar10
from fastntk_jax.data import fashion_mnist
from fastntk_jax.data.cifar10 import CIFAR10_CLASSES
from fastntk_jax.data.cifar10 import UNREADABLE_IMAGE_ERRORS
from fastntk_jax.data.cifar10 import check_split
from fastntk_jax.data.cifar10 import load_cifar10_lossless
from fastntk_jax.data.cifar10 import load_embedded_cifar10
from fastntk_jax.data.cifar10 import read_cifar10_jpeg_zip
from fastntk_jax.data.cifar10 import positive_int
from fastntk_jax.data.cifar10 import read_cifar10_jpeg_zip_with_names

__all__ = [
  "CIFAR10_CLASSES",
  "ImageDataset",
  "load_cifar10_lossless",
  "load_dataset",
  "load_embedded_cifar10",
  "read_cifar10_jpeg_zip",
  "read_cifar10_jpeg_zip_with_names",
]

_SPLITS = ("train", "test")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_TFDS_ENV = "FASTNTK_TFDS_DATA_DIR"
_SOURCE_FORMS = (
  "'embedded', 'cifar10-jpeg', 'cifar10-jpeg:PATH', a path ending in .zip, "
  "'cifar10-lossless', 'cifar10-lossless:PATH', 'fashion-mnist', 'fashion-mnist:PATH', "
  "'folder:ROOT', an existing directory, or 'tfds:NAME'"
)

class ImageDataset(NamedTuple):
  """A labelled image set.

  Attributes:
    x: uint8 images ``(N, H, W, 3)``, RGB.
    y: int32 labels ``(N,)`` in ``0 .. len(class_names) - 1``.
    class_names: the name of each label.
    source: where the images came from, e.g. ``"cifar10-jpeg:/abs/cifar10-jpeg.zip"``.
  """

  x: np.ndarray
  y: np.ndarray
  class_names: tuple[str, ...]
  source: str


# --------------------------------------------------------------------------- image folders


def _natural_key(path: Path) -> tuple:
  # re.split with a capture group alternates text, digits, text, ...: positions
  # of equal parity hold equal types, so the tuples always compare.
  return tuple(
    tuple(int(t) if i % 2 else t.casefold() for i, t in enumerate(re.split(r"([0-9]+)", part)))
    for part in path.parts
  ), str(path)


def _inside(path: Path, root: Path, what: str) -> Path:
  resolved = path.resolve()
  if not resolved.is_relative_to(root):
    raise ValueError(
      f"{what} {path} resolves to {resolved}, outside the dataset root {root}; "
      "replace the symlink with the files themselves."
    )
  return resolved


def _list_images(class_dir: Path, root: Path) -> list[Path]:
  """Image files under ``class_dir`` (recursively), natural-sorted by relative path."""
  found, seen, stack = [], set(), [class_dir]
  while stack:
    folder = stack.pop()
    real = _inside(folder, root, "folder")
    if real in seen:
      continue  # reached twice through symlinks
    seen.add(real)
    for entry in os.scandir(folder):
      if entry.name.startswith("."):
        continue
      path = Path(entry.path)
      if entry.is_symlink():
        _inside(path, root, "symlink")
      if entry.is_dir():
        stack.append(path)
      elif path.suffix.lower() in _IMAGE_SUFFIXES:
        found.append(path)
  return sorted(found, key=lambda p: _natural_key(p.relative_to(class_dir)))


def _scan_folder(root: Path, split: str) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
  """``(files, labels, class_names)`` of ``root/<split>/<class>/**``, class-major."""
  if not root.is_dir():
    raise FileNotFoundError(f"folder source: {root} is not a directory.")
  real_root = root.resolve()
  split_dir = root / split
  if not split_dir.is_dir():
    raise FileNotFoundError(
      f"folder source: {split_dir} does not exist; lay the images out as "
      f"{root}/{split}/<class>/*.jpg or pass another split=."
    )
  _inside(split_dir, real_root, "split folder")
  class_dirs = sorted(
    (p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
    key=lambda p: p.name,
  )
  if not class_dirs:
    raise FileNotFoundError(
      f"folder source: {split_dir} has no class folders; put the images in {split_dir}/<class>/."
    )
  files: list[Path] = []
  labels: list[int] = []
  for label, class_dir in enumerate(class_dirs):
    _inside(class_dir, real_root, "class folder")
    images = _list_images(class_dir, real_root)
    if not images:
      raise ValueError(
        f"folder source: class folder {class_dir} holds no {'/'.join(_IMAGE_SUFFIXES)} images; "
        "add images or remove the folder."
      )
    files += images
    labels += [label] * len(images)
  return files, np.asarray(labels, dtype=np.int32), tuple(p.name for p in class_dirs)


def _read_image(path: Path) -> Image.Image:
  try:
    with Image.open(path) as img:
      img.load()
      return img.convert("RGB")
  except UNREADABLE_IMAGE_ERRORS as err:
    raise ValueError(
      f"folder source: cannot read image {path} ({type(err).__name__}: {err}); "
      "replace or remove the file."
    ) from err


# --------------------------------------------------------------------------- TFDS


def _import_tfds():
  """tensorflow_datasets, imported only when a ``tfds:`` source is loaded."""
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy, optional)
  except ImportError as err:
    raise ImportError(
      "'tfds:' sources need tensorflow-datasets and tensorflow: "
      "pip install tensorflow-datasets tensorflow"
    ) from err
  return tfds


def _tfds_builder(name: str, data_dir: Path | str | None, download: bool):
  tfds = _import_tfds()
  data_dir = data_dir or os.environ.get(_TFDS_ENV) or None
  try:
    builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
  except tfds.core.registered.DatasetNotFoundError as err:
    raise ValueError(
      f"tfds has no dataset {name!r}; tensorflow_datasets.list_builders() lists the names."
    ) from err
  if not builder.is_prepared():
    if not download:
      where = data_dir or "the default ~/tensorflow_datasets"
      raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in {where}. Prepare it where there is network "
        f"access with `tfds build {name} --data_dir DIR` (then copy DIR here), and pass "
        f"tfds_data_dir=DIR or set {_TFDS_ENV}=DIR; or pass tfds_download=True."
      )
    builder.download_and_prepare()
  return tfds, builder


def _tfds_examples(tfds, builder, split: str) -> Iterator[tuple[np.ndarray, int]]:
  if split not in builder.info.splits:
    raise ValueError(
      f"tfds dataset {builder.info.name!r} has no split {split!r}; it has "
      f"{sorted(builder.info.splits)}."
    )
  ds = builder.as_dataset(split=split, shuffle_files=False, as_supervised=True)
  for image, label in tfds.as_numpy(ds):
    yield np.asarray(image), int(label)


# --------------------------------------------------------------------------- load_dataset


class _Source(NamedTuple):
  kind: str  # embedded | cifar10-jpeg | cifar10-lossless | folder | tfds
  arg: str | None  # a path or a tfds name


def _parse_source(source) -> _Source:
  if isinstance(source, os.PathLike):
    source = os.fspath(source)
  if not isinstance(source, str) or not source:
    raise ValueError(f"source must be a non-empty string: {_SOURCE_FORMS}; got {source!r}.")
  prefix, sep, rest = source.partition(":")
  if source in ("embedded", "cifar10-jpeg", "cifar10-lossless", "fashion-mnist"):
    return _Source(source, None)
  if sep and prefix in ("cifar10-jpeg", "cifar10-lossless", "fashion-mnist", "folder", "tfds"):
    if not rest:
      raise ValueError(f"source {source!r} names no {'dataset' if prefix == 'tfds' else 'path'}.")
    return _Source(prefix, rest)
  if source.lower().endswith(".zip"):
    return _Source("cifar10-jpeg", source)
  if Path(source).expanduser().is_dir():
    return _Source("folder", source)
  raise ValueError(f"unknown source {source!r}; use {_SOURCE_FORMS}.")


def _class_ids(classes: Sequence[int | str], names: Sequence[str]) -> list[int]:
  ids = []
  for c in classes:
    if isinstance(c, str):
      if c not in names:
        raise ValueError(f"classes: unknown class {c!r}; this source's classes are {tuple(names)}.")
      ids.append(list(names).index(c))
    elif isinstance(c, numbers.Integral) and not isinstance(c, bool) and 0 <= c < len(names):
      ids.append(int(c))
    else:
      raise ValueError(
        f"classes: {c!r} is neither a class name nor an index in 0..{len(names) - 1}; "
        f"this source's classes are {tuple(names)}."
      )
  if len(set(ids)) != len(ids):
    raise ValueError(f"classes lists a class twice: {list(classes)}.")
  return ids


def _select(y: np.ndarray, names: tuple[str, ...], ids: list[int] | None, ipc: int | None):
  """``classes`` then ``ipc``: ``(indices, new labels, new class names)``."""
  idx = np.arange(y.size)
  if ids is not None:
    idx = idx[np.isin(y, ids)]
    lut = np.full(len(names), -1, dtype=np.int32)
    lut[ids] = np.arange(len(ids), dtype=np.int32)
    y, names = lut[y[idx]], tuple(names[i] for i in ids)
  if ipc is not None:
    if not y.size:
      raise ValueError(f"ipc={ipc} but first=/classes= left no images to choose from.")
    keep = splits.first_per_class(y, ipc, class_names=names)
    idx, y = idx[keep], y[keep]
  return idx, np.asarray(y, dtype=np.int32), names


def _to_rgb(image: np.ndarray, where: str) -> np.ndarray:
  if image.dtype != np.uint8:
    raise ValueError(f"{where}: expected uint8 images, got {image.dtype}.")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{where}: expected (H, W, 1|3|4) images, got shape {image.shape}.")
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def _resize(image: Image.Image, size: int) -> np.ndarray:
  if image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def _stack(
  images: Iterable[tuple[Image.Image | np.ndarray, str]], n: int, size: int | None
) -> np.ndarray:
  """Stacks ``n >= 1`` (image, where) pairs, resized to ``size`` when given; else all must match."""
  out = None
  first_where = ""
  for i, (image, where) in enumerate(images):
    if size is not None:
      arr = _resize(image if isinstance(image, Image.Image) else Image.fromarray(image), size)
    else:
      arr = np.asarray(image, dtype=np.uint8)
    if out is None:
      out, first_where = np.empty((n, *arr.shape), dtype=np.uint8), where
    elif arr.shape != out.shape[1:]:
      raise ValueError(
        f"images differ in size: {first_where} is {out.shape[1:3]} but {where} is "
        f"{arr.shape[:2]}; pass image_size=S to resize every image to S x S."
      )
    out[i] = arr
  return out if out is not None else np.zeros((0, size or 32, size or 32, 3), np.uint8)


def load_dataset(
  source: str,
  split: str = "train",
  *,
  ipc: int | None = None,
  classes: Sequence[int | str] | None = None,
  image_size: int | None = None,
  first: int | None = None,
  cache_dir: str | Path | None = None,
  tfds_data_dir: str | Path | None = None,
  tfds_download: bool = False,
) -> ImageDataset:
  """Loads one split of an image dataset as uint8 arrays.

  The options apply in this order: ``first``, then ``classes``, then ``ipc``,
  then ``image_size``. Every argument is checked before any image is decoded.

  The ``cifar10-jpeg`` source decodes a whole split once (2 CPU cores: train
  6 s, test 1.7 s) and caches it as an uncompressed ``.npz`` in ``cache_dir``
  (default: ``$FASTNTK_CACHE`` or ``~/.cache/fastntk_jax``), named after the
  SHA-256 of the archive's bytes (unlike size and mtime, it cannot mistake an
  edited archive for the cached one), written atomically, rebuilt with a
  warning when it fails to load.

  Args:
    source: ``"embedded"``, ``"cifar10-jpeg"``, ``"cifar10-jpeg:PATH"`` or a
      path ending in ``.zip``, ``"cifar10-lossless"``, ``"cifar10-lossless:PATH"``,
      ``"fashion-mnist"``, ``"fashion-mnist:PATH"`` (the IDX files; padded to
      32 × 32, 3 channels), ``"folder:ROOT"`` or a directory (``ROOT/<split>/<class>/**/*.{jpg,jpeg,png}``;
      classes are the sorted folder names, files in natural order, so ``2.jpg``
      comes before ``10.jpg``), or ``"tfds:NAME"`` (a prepared TFDS dataset).
    split: ``"train"`` or ``"test"``.
    ipc: keep the first ``ipc`` images of each class, in source order; every
      class must have that many.
    classes: keep only these classes (names or indices) and relabel them
      ``0 .. len(classes) - 1`` in the given order; ``class_names`` follows.
    image_size: resize every image to ``image_size x image_size`` (Pillow
      bicubic, aspect ratio not kept), e.g. 224 for ViTs. Needed when a folder
      or TFDS dataset holds images of different sizes. Memory is
      ``N * image_size**2 * 3`` bytes.
    first: the first ``first`` images of the split in the original CIFAR-10
      order (``cifar10-jpeg``: train <= 4000, test <= 1000, reconstructed from
      ``assets/cifar10_order.npz``; ``cifar10-lossless``: its own order).
    cache_dir: where ``cifar10-jpeg`` keeps decoded splits.
    tfds_data_dir: TFDS ``data_dir`` (default: ``$FASTNTK_TFDS_DATA_DIR``, else
      TFDS's own default).
    tfds_download: let TFDS download and prepare a missing dataset.

  Returns:
    An :class:`ImageDataset` ``(x uint8 (N, H, W, 3), y int32 (N,), class_names, source)``.
    CIFAR-10 images are ``32 x 32`` unless resized.

  Raises:
    ValueError: a bad argument, an unknown source or class, too few images for
      ``ipc``, malformed or unsafe data (paths escaping the archive or folder,
      unreadable images).
    FileNotFoundError: a missing file, folder, split folder or TFDS dataset.

  Example: ``load_dataset("cifar10-jpeg", "train", ipc=100)`` (1000 images);
  ``load_dataset("embedded", "test", classes=["cat", "dog"], image_size=224)``.
  """
  ipc, image_size, first, src, cache_dir = _check_options(
    source, split, ipc, classes, image_size, first, cache_dir, tfds_data_dir, tfds_download
  )
  if src.kind == "folder":
    return _load_folder(Path(src.arg).expanduser(), split, classes, ipc, image_size)
  if src.kind == "tfds":
    return _load_tfds_source(src.arg, split, classes, ipc, image_size, tfds_data_dir, tfds_download)
  if src.kind == "fashion-mnist":
    x, y, where = fashion_mnist.load_split(src.arg, split)
    names = fashion_mnist.FASHION_MNIST_CLASSES
  else:
    x, y, where = cifar10.load_split(src.kind, src.arg, split, first, cache_dir)
    names = CIFAR10_CLASSES
  ids = None if classes is None else _class_ids(classes, names)
  idx, y, names = _select(y, names, ids, ipc)
  x = x[idx]
  if image_size is not None and image_size != x.shape[1]:
    x = _stack(((im, where) for im in x), x.shape[0], image_size)
  return _finish(x, y, names, where)


def _check_options(source, split, ipc, classes, image_size, first, cache_dir, tfds_data_dir, tfds_download):
  """Every check of :func:`load_dataset` that needs no image."""
  check_split(split)
  ipc, image_size, first = (
    None if v is None else positive_int(v, name)
    for v, name in ((ipc, "ipc"), (image_size, "image_size"), (first, "first"))
  )
  if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable | None):
    raise ValueError(
      f"classes must be a sequence of class names or indices, got {classes!r}; "
      "wrap a single class in a list."
    )
  if classes is not None and not list(classes):
    raise ValueError("classes is empty; pass None to keep every class.")
  src = _parse_source(source)
  if first is not None and src.kind not in ("cifar10-jpeg", "cifar10-lossless"):
    raise ValueError(
      f"first= applies only to the CIFAR-10 sources 'cifar10-jpeg' and 'cifar10-lossless' (whose "
      f"original order is known), not to {source!r}; use ipc= to take a balanced prefix."
    )
  if src.kind != "tfds" and (tfds_data_dir is not None or tfds_download):
    raise ValueError(
      f"tfds_data_dir and tfds_download apply only to 'tfds:NAME' sources, not {source!r}."
    )
  if cache_dir is not None:
    cache_dir = Path(cache_dir).expanduser()
  return ipc, image_size, first, src, cache_dir


def _load_folder(root: Path, split, classes, ipc, image_size) -> ImageDataset:
  files, y, names = _scan_folder(root, split)
  ids = None if classes is None else _class_ids(classes, names)
  idx, y, names = _select(y, names, ids, ipc)
  x = _stack(((_read_image(files[i]), str(files[i])) for i in idx), idx.size, image_size)
  return _finish(x, y, names, f"folder:{root.resolve()}")


def _load_tfds_source(name, split, classes, ipc, image_size, data_dir, download) -> ImageDataset:
  tfds, builder = _tfds_builder(name, data_dir, download)
  keys = builder.info.supervised_keys
  if not keys or len(keys) != 2:
    raise ValueError(f"tfds dataset {name!r} has no (image, label) supervised keys.")
  names = tuple(builder.info.features[keys[1]].names)
  ids = None if classes is None else _class_ids(classes, names)
  return _load_tfds(tfds, builder, split, names, ids, ipc, image_size, f"tfds:{name}")


def _load_tfds(tfds, builder, split, names, ids, ipc, image_size, where) -> ImageDataset:
  """Streams a TFDS split, keeping what ``classes``/``ipc`` select (stops once all are full)."""
  lut = np.arange(len(names)) if ids is None else np.full(len(names), -1)
  if ids is not None:
    lut[ids] = np.arange(len(ids))
  kept_names = names if ids is None else tuple(names[i] for i in ids)
  counts = np.zeros(len(kept_names), dtype=np.int64)
  images, labels = [], []
  for pos, (image, label) in enumerate(_tfds_examples(tfds, builder, split)):
    new = lut[label]
    if new < 0 or (ipc is not None and counts[new] >= ipc):
      continue
    rgb = _to_rgb(image, f"{where} {split}[{pos}]")
    if image_size is not None:
      rgb = _resize(Image.fromarray(rgb), image_size)
    elif images and rgb.shape != images[0].shape:
      raise ValueError(
        f"images differ in size: {where} {split} has {images[0].shape[:2]} and, at "
        f"[{pos}], {rgb.shape[:2]}; pass image_size=S to resize every image to S x S."
      )
    counts[new] += 1
    images.append(rgb)
    labels.append(new)
    if ipc is not None and counts.min() >= ipc:
      break
  if ipc is not None and counts.min() < ipc:
    c = int(np.argmin(counts))
    raise ValueError(
      f"ipc={ipc} but class {c} ({kept_names[c]!r}) has only {counts[c]} images "
      f"in {where} {split}; lower ipc."
    )
  x = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
  return _finish(x, np.asarray(labels, dtype=np.int32), kept_names, where)


def _finish(x: np.ndarray, y: np.ndarray, names: tuple[str, ...], where: str) -> ImageDataset:
  if y.size == 0:
    raise ValueError(f"{where}: no images left after first=/classes=; widen the selection.")
  return ImageDataset(x=x, y=y.astype(np.int32), class_names=tuple(names), source=where)
