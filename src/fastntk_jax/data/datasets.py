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

import hashlib
import io
import numbers
import os
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
from PIL import Image

from fastntk_jax.data import splits
from fastntk_jax.io.atomic import atomic_write
from fastntk_jax.io.paths import ASSET_DIR, SHARED_DATA_ENV, shared_data_dir

__all__ = [
  "CIFAR10_CLASSES",
  "ImageDataset",
  "load_cifar10_lossless",
  "load_dataset",
  "load_embedded_cifar10",
  "read_cifar10_jpeg_zip",
  "read_cifar10_jpeg_zip_with_names",
]

CIFAR10_CLASSES: tuple[str, ...] = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)

_SPLITS = ("train", "test")
_EMBEDDED_NAME = "cifar10_embedded.npz"
_ORDER_NAME = "cifar10_order.npz"
_LOSSLESS_NAME = "cifar10-lossless-subset.npz"
_JPEG_NAME = "cifar10-jpeg.zip"
_IMAGE_SHAPE = (32, 32, 3)
_RANK_FILE = re.compile(r"^(\d+)\.jpe?g$", re.IGNORECASE)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE_ENV = "FASTNTK_CACHE"
_TFDS_ENV = "FASTNTK_TFDS_DATA_DIR"
_CACHE_VERSION = 1
# OSError covers UnidentifiedImageError and truncated files.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_SOURCE_FORMS = (
  "'embedded', 'cifar10-jpeg', 'cifar10-jpeg:PATH', a path ending in .zip, "
  "'cifar10-lossless', 'cifar10-lossless:PATH', 'folder:ROOT', an existing directory, "
  "or 'tfds:NAME'"
)

CifarArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


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


def _shared_file(name: str, source: str) -> Path:
  root = shared_data_dir()
  if root is None:
    raise FileNotFoundError(
      f"source {source!r}: no ../shared/data folder was found; pass '{source}:PATH' "
      f"or set {SHARED_DATA_ENV} to the folder holding {name}."
    )
  return root / name


# --------------------------------------------------------------------------- npz sources


def _check_images_labels(x: np.ndarray, y: np.ndarray, where: str) -> None:
  if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != _IMAGE_SHAPE:
    raise ValueError(
      f"{where}: expected uint8 images of shape (N, 32, 32, 3), got "
      f"{x.dtype} {x.shape}; regenerate the file."
    )
  if y.ndim != 1 or y.shape[0] != x.shape[0]:
    raise ValueError(f"{where}: expected labels of shape ({x.shape[0]},), got {y.shape}.")
  if y.size and (y.min() < 0 or y.max() >= len(CIFAR10_CLASSES)):
    raise ValueError(
      f"{where}: labels must lie in [0, {len(CIFAR10_CLASSES)}), got range "
      f"[{y.min()}, {y.max()}]."
    )


def _load_npz_split(path: Path | str, where: str) -> CifarArrays:
  """Reads x_train, y_train, x_test, y_test from a CIFAR ``.npz`` (no pickles)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{where}: no file at {path}.")
  with np.load(path, allow_pickle=False) as npz:
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in npz]
    if missing:
      raise ValueError(f"{where}: {path} lacks the arrays {missing}; it holds {sorted(npz.files)}.")
    out = []
    for split in _SPLITS:
      x = np.asarray(npz[f"x_{split}"])
      y = np.asarray(npz[f"y_{split}"])
      _check_images_labels(x, y, f"{where} ({split})")
      out += [x, y.astype(np.int32)]
  return tuple(out)  # type: ignore[return-value]


def load_embedded_cifar10() -> CifarArrays:
  """Loads the CIFAR-10 subset shipped inside the package.

  The subset is the first 100 train and the first 100 test images of each
  class of the JPEG archive (JPEG-compressed pixels, quality about 75), in
  class-major order.

  Returns:
    ``(x_train, y_train, x_test, y_test)``: ``x_*`` uint8 ``(1000, 32, 32, 3)``,
    ``y_*`` int32 ``(1000,)``.
  """
  return _load_npz_split(ASSET_DIR / _EMBEDDED_NAME, "load_embedded_cifar10")


def load_cifar10_lossless(path: Path | str | None = None) -> CifarArrays:
  """Loads the exact-pixel CIFAR-10 subset (original train[0:4000], test[0:1000]).

  Args:
    path: the ``cifar10-lossless-subset.npz`` file; ``None`` looks for it in
      :func:`shared_data_dir`.

  Returns:
    ``(x_train, y_train, x_test, y_test)``: ``x_train`` uint8 ``(4000, 32, 32, 3)``,
    ``y_train`` int32 ``(4000,)``, ``x_test`` uint8 ``(1000, 32, 32, 3)``,
    ``y_test`` int32 ``(1000,)``.

  Raises:
    FileNotFoundError: when ``path`` is None and no shared data folder exists,
      or the file is absent.
  """
  if path is None:
    path = _shared_file(_LOSSLESS_NAME, "cifar10-lossless")
  return _load_npz_split(path, "load_cifar10_lossless")


# --------------------------------------------------------------------------- JPEG zip


def _check_member_name(name: str) -> None:
  """Rejects archive member names that would escape the archive root."""
  if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
    raise ValueError(f"unsafe archive member {name!r}: absolute paths are not allowed.")
  if ".." in re.split(r"[/\\]", name):
    raise ValueError(f"unsafe archive member {name!r}: '..' components are not allowed.")


def _select_members(
  names: Sequence[str], split: str, per_class: int | None
) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Picks ``<...>/<split>/<class>/NNNN.jpg`` members, class-major, rank-sorted.

  Returns:
    ``(members, labels, ranks)``: the chosen names, their int32 labels ``(N,)``
    and their int32 ranks ``NNNN`` ``(N,)``.
  """
  by_class: dict[int, list[tuple[int, str]]] = {}
  for name in names:
    _check_member_name(name)
    if name.endswith("/"):
      continue  # directory entry
    parts = PurePosixPath(name).parts
    if len(parts) < 3 or parts[-3] != split:
      continue
    cls, fname = parts[-2], parts[-1]
    if cls not in CIFAR10_CLASSES:
      raise ValueError(
        f"malformed archive: member {name!r} is in unknown class folder {cls!r}; "
        f"expected one of {CIFAR10_CLASSES}."
      )
    match = _RANK_FILE.match(fname)
    if match is None:
      raise ValueError(f"malformed archive: member {name!r} is not named NNNN.jpg.")
    by_class.setdefault(CIFAR10_CLASSES.index(cls), []).append((int(match.group(1)), name))
  if not by_class:
    raise ValueError(
      f"malformed archive: no images for split {split!r}; expected members "
      f"like 'cifar10/{split}/<class>/NNNN.jpg'."
    )
  members: list[str] = []
  labels: list[int] = []
  ranks: list[int] = []
  for label in sorted(by_class):
    ranked = sorted(by_class[label])
    if len({r for r, _ in ranked}) != len(ranked):
      raise ValueError(
        f"malformed archive: duplicate image ranks in class "
        f"{CIFAR10_CLASSES[label]!r} of split {split!r}."
      )
    if per_class is not None:
      if len(ranked) < per_class:
        raise ValueError(
          f"per_class={per_class} but class {CIFAR10_CLASSES[label]!r} has only "
          f"{len(ranked)} images in split {split!r}; lower per_class."
        )
      ranked = ranked[:per_class]
    members += [n for _, n in ranked]
    labels += [label] * len(ranked)
    ranks += [r for r, _ in ranked]
  return members, np.asarray(labels, dtype=np.int32), np.asarray(ranks, dtype=np.int32)


def _decode_jpeg(data: bytes, name: str) -> np.ndarray:
  try:
    # formats= skips probing the other plugins: ~25% faster on 32x32 images.
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
      arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
  except _UNREADABLE as err:
    raise ValueError(f"malformed archive: cannot decode member {name!r}: {err}") from err
  if arr.shape != _IMAGE_SHAPE:
    raise ValueError(
      f"malformed archive: member {name!r} decodes to shape {arr.shape}, expected {_IMAGE_SHAPE}."
    )
  return arr


def _read_zip(
  path: Path | str, split: str, per_class: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
  """Decodes one split of the archive: ``(x, y, ranks, member names)``, class-major."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no CIFAR-10 JPEG archive at {path}; pass the cifar10-jpeg.zip file.")
  try:
    with zipfile.ZipFile(path) as zf:
      members, labels, ranks = _select_members(zf.namelist(), split, per_class)
      # Sequential on purpose: a 32x32 JPEG decodes in ~70 us, and a thread pool
      # was 2x slower (GIL hand-offs outweigh the work) on 2 cores.
      x = np.empty((len(members), *_IMAGE_SHAPE), dtype=np.uint8)
      for i, m in enumerate(members):
        x[i] = _decode_jpeg(zf.read(m), m)
  except zipfile.BadZipFile as err:
    raise ValueError(
      f"{path} is not a valid zip archive ({err}); pass the cifar10-jpeg.zip file."
    ) from err
  return x, labels, ranks, members


def read_cifar10_jpeg_zip_with_names(
  path: Path | str, split: str = "train", per_class: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Like :func:`read_cifar10_jpeg_zip`, also returning the member names.

  Returns:
    ``(x, y, names)``: uint8 images ``(N, 32, 32, 3)``, int32 labels ``(N,)``
    and the ``N`` archive member names the images came from.
  """
  _check_split(split)
  if per_class is not None:
    per_class = _positive_int(per_class, "per_class")
  x, y, _, names = _read_zip(path, split, per_class)
  return x, y, names


def read_cifar10_jpeg_zip(
  path: Path | str, split: str = "train", per_class: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Reads CIFAR-10 JPEG images straight from the zip archive (no extraction, no cache).

  The archive holds ``cifar10/<split>/<class>/NNNN.jpg`` where ``NNNN`` is the
  image's rank inside its class in the original order. Every member name is
  checked first: absolute names and names with ``..`` components are refused.

  Args:
    path: the zip archive (e.g. ``../shared/data/cifar10-jpeg.zip``).
    split: ``"train"`` or ``"test"``.
    per_class: keep the first ``per_class`` images (by rank) of each class;
      None keeps them all.

  Returns:
    ``(x, y)``: uint8 images ``(N, 32, 32, 3)`` (RGB) and int32 labels ``(N,)``,
    class-major and rank-sorted within each class.

  Raises:
    ValueError: unknown split, bad per_class, unsafe member names, a file that
      is not a zip, or an archive without the expected layout.
    FileNotFoundError: when ``path`` does not exist.
  """
  x, y, _ = read_cifar10_jpeg_zip_with_names(path, split, per_class)
  return x, y


def _default_cache_dir() -> Path:
  env = os.environ.get(_CACHE_ENV)
  return Path(env).expanduser() if env else Path.home() / ".cache" / "fastntk_jax"


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _read_cache(path: Path, digest: str, split: str):
  """The cached ``(x, y, ranks)``, or None (with a warning) when the file is unusable."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      meta = (int(npz["version"]), str(npz["archive_sha256"]), str(npz["split"]))
      if meta != (_CACHE_VERSION, digest, split):
        raise ValueError(f"it was written for {meta}, not {(_CACHE_VERSION, digest, split)}")
      # Reading every member to its end makes zipfile check its CRC-32.
      x, y, ranks = (np.asarray(npz[k]) for k in ("x", "y", "rank"))
    _check_images_labels(x, y, "cache")
    if ranks.shape != y.shape or ranks.dtype != np.int32:
      raise ValueError(f"rank array is {ranks.dtype} {ranks.shape}")
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
    warnings.warn(f"ignoring corrupt cache file {path} ({err}); rebuilding it.", stacklevel=4)
    return None
  return x, y.astype(np.int32), ranks


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
  """``np.savez`` (uncompressed: loads fast), written atomically."""
  atomic_write(path, lambda f: np.savez(f, **arrays))


def _cached_jpeg_split(zip_path: Path, split: str, cache_dir: Path | None):
  """``(x, y, ranks)`` of a whole split, class-major, from the cache or decoded."""
  if not zip_path.is_file():
    raise FileNotFoundError(
      f"no CIFAR-10 JPEG archive at {zip_path}; pass the cifar10-jpeg.zip file."
    )
  digest = _sha256(zip_path)
  name = f"cifar10-jpeg-{digest[:16]}-{split}-v{_CACHE_VERSION}.npz"
  cache = (cache_dir or _default_cache_dir()) / name
  if cache.exists():
    hit = _read_cache(cache, digest, split)
    if hit is not None:
      return hit
  x, y, ranks, _ = _read_zip(zip_path, split, None)
  arrays = dict(x=x, y=y.astype(np.uint8), rank=ranks, version=np.int32(_CACHE_VERSION),
                archive_sha256=np.str_(digest), split=np.str_(split))
  try:
    _write_npz_atomic(cache, arrays)
  except OSError as err:
    warnings.warn(f"could not write the cache file {cache} ({err}); set cache_dir= "
                  f"or {_CACHE_ENV} to a writable folder.", stacklevel=3)
  return x, y, ranks


def _order_labels(split: str, first: int) -> np.ndarray:
  """The labels of the original CIFAR-10 ``split[:first]``, from ``assets/cifar10_order.npz``."""
  with np.load(ASSET_DIR / _ORDER_NAME, allow_pickle=False) as npz:
    order = npz["y_train_first4000" if split == "train" else "y_test_first1000"]
  if first > order.size:
    raise ValueError(
      f"first={first} but the original CIFAR-10 order of the {split} split is known only for "
      f"its first {order.size} images ({_ORDER_NAME}); use first<={order.size} or ipc= instead."
    )
  return order[:first].astype(np.int64)


def _original_order(y: np.ndarray, ranks: np.ndarray, split: str, first: int) -> np.ndarray:
  """Indices into class-major ``(y, ranks)`` of the first ``first`` images in CIFAR-10 order.

  Original position ``i`` holds label ``order[i]`` and rank = the number of
  earlier positions with that label.
  """
  labels = _order_labels(split, first)
  want = np.empty(first, dtype=np.int64)
  for c in np.unique(labels):
    pos = np.flatnonzero(labels == c)
    want[pos] = np.arange(pos.size)
  stride = int(max(ranks.max(), want.max())) + 1
  have = y.astype(np.int64) * stride + ranks  # sorted: class-major, rank-sorted
  key = labels * stride + want
  idx = np.minimum(np.searchsorted(have, key), have.size - 1)
  missing = np.flatnonzero(have[idx] != key)
  if missing.size:
    i = missing[0]
    raise ValueError(
      f"first={first} needs cifar10/{split}/{CIFAR10_CLASSES[labels[i]]}/{want[i]:04d}.jpg "
      f"(original position {i}), which the archive lacks; use the complete cifar10-jpeg.zip."
    )
  return idx


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
  except _UNREADABLE as err:
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
  if source in ("embedded", "cifar10-jpeg", "cifar10-lossless"):
    return _Source(source, None)
  if sep and prefix in ("cifar10-jpeg", "cifar10-lossless", "folder", "tfds"):
    if not rest:
      raise ValueError(f"source {source!r} names no {'dataset' if prefix == 'tfds' else 'path'}.")
    return _Source(prefix, rest)
  if source.lower().endswith(".zip"):
    return _Source("cifar10-jpeg", source)
  if Path(source).expanduser().is_dir():
    return _Source("folder", source)
  raise ValueError(f"unknown source {source!r}; use {_SOURCE_FORMS}.")


def _check_split(split) -> None:
  if split not in _SPLITS:
    raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
  return int(value)


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

  The ``cifar10-jpeg`` source decodes a whole split once (measured on 2 CPU
  cores: train, 50,000 images, 6 s; test, 10,000, 1.7 s) and caches it as an
  uncompressed ``.npz`` (154 MB / 31 MB; a hit loads in 0.13 s / 0.06 s) in
  ``cache_dir`` (default: ``$FASTNTK_CACHE`` or ``~/.cache/fastntk_jax``), named
  after the SHA-256 of the archive's bytes: hashing its 54 MB takes under 0.1 s,
  little next to the decode, and unlike size and mtime it cannot mistake an
  edited or replaced archive for the cached one, nor miss a copied one. The
  cache is written atomically; a cache file that fails to load (truncated, bad
  CRC, wrong shapes or key) is reported with a warning and rebuilt.

  Args:
    source: ``"embedded"``, ``"cifar10-jpeg"``, ``"cifar10-jpeg:PATH"`` or a
      path ending in ``.zip``, ``"cifar10-lossless"``, ``"cifar10-lossless:PATH"``,
      ``"folder:ROOT"`` or a directory (``ROOT/<split>/<class>/**/*.{jpg,jpeg,png}``;
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

  Example::

    ds = load_dataset("cifar10-jpeg", "train", ipc=100)  # 1000 images, class-major
    vit = load_dataset("embedded", "test", classes=["cat", "dog"], image_size=224)
  """
  ipc, image_size, first, src, cache_dir = _check_options(
    source, split, ipc, classes, image_size, first, cache_dir, tfds_data_dir, tfds_download
  )
  if src.kind == "folder":
    return _load_folder(Path(src.arg).expanduser(), split, classes, ipc, image_size)
  if src.kind == "tfds":
    return _load_tfds_source(src.arg, split, classes, ipc, image_size, tfds_data_dir, tfds_download)
  ids = None if classes is None else _class_ids(classes, CIFAR10_CLASSES)
  x, y, where = _load_cifar10(src, split, first, cache_dir)
  idx, y, names = _select(y, CIFAR10_CLASSES, ids, ipc)
  x = x[idx]
  if image_size is not None and image_size != x.shape[1]:
    x = _stack(((im, where) for im in x), x.shape[0], image_size)
  return _finish(x, y, names, where)


def _check_options(source, split, ipc, classes, image_size, first, cache_dir, tfds_data_dir, tfds_download):
  """Every check of :func:`load_dataset` that needs no image."""
  _check_split(split)
  ipc, image_size, first = (
    None if v is None else _positive_int(v, name)
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


def _load_cifar10(src, split, first, cache_dir):
  """``(x, y, where)`` of a CIFAR-10 source, ``first`` applied."""
  if src.kind == "embedded":
    x_train, y_train, x_test, y_test = load_embedded_cifar10()
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return x, y, "embedded"
  if src.kind == "cifar10-lossless":
    path = Path(src.arg).expanduser() if src.arg else _shared_file(_LOSSLESS_NAME, src.kind)
    x_train, y_train, x_test, y_test = load_cifar10_lossless(path)
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    if first is not None:
      if first > y.size:
        raise ValueError(
          f"first={first} but {path} holds only {y.size} {split} images; use first<={y.size}."
        )
      x, y = x[:first], y[:first]
    return x, y, f"cifar10-lossless:{path.resolve()}"
  path = Path(src.arg).expanduser() if src.arg else _shared_file(_JPEG_NAME, src.kind)
  if first is not None:
    _order_labels(split, first)  # checks the bound before decoding
  x, y, ranks = _cached_jpeg_split(path, split, cache_dir)
  if first is not None:
    order = _original_order(y, ranks, split, first)
    x, y = x[order], y[order]
  return x, y, f"cifar10-jpeg:{path.resolve()}"


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
