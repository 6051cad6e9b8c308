"""CIFAR-10 as it is here: the embedded subset, the exact-pixel subset and the
JPEG archive (read without extracting, decoded once and cached as ``.npz``
keyed by the archive's SHA-256), with the original CIFAR-10 order of the
first images of each split.
"""

from __future__ import annotations

import hashlib
import numbers
import io
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from fastntk_jax.io.atomic import atomic_write
from fastntk_jax.io.paths import ASSET_DIR, SHARED_DATA_ENV, shared_data_dir

__all__ = [
  "CIFAR10_CLASSES",
  "CifarArrays",
  "UNREADABLE_IMAGE_ERRORS",
  "check_split",
  "load_cifar10_lossless",
  "load_embedded_cifar10",
  "load_split",
  "positive_int",
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
_CACHE_ENV = "FASTNTK_CACHE"
_CACHE_VERSION = 1
#: What a broken image raises when decoded (OSError covers
#: UnidentifiedImageError and truncated files).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError,
                           Image.DecompressionBombError)

def check_split(split) -> None:
  """``split`` is ``"train"`` or ``"test"``."""
  if split not in _SPLITS:
    raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")


def positive_int(value, name: str) -> int:
  """``value`` as an int ≥ 1, else a ValueError naming ``name``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
  return int(value)


CifarArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]




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
  except UNREADABLE_IMAGE_ERRORS as err:
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
  check_split(split)
  if per_class is not None:
    per_class = positive_int(per_class, "per_class")
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


def load_split(kind: str, arg: str, split: str, first: int | None,
               cache_dir: Path | None):
  """``(x, y, where)``: a split of the CIFAR-10 source ``kind``
  (``"embedded"``, ``"cifar10-lossless"``, ``"cifar10-jpeg"``) at ``arg``
  (a path, or ``""`` for the shared file), ``first`` applied."""
  if kind == "embedded":
    x_train, y_train, x_test, y_test = load_embedded_cifar10()
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return x, y, "embedded"
  if kind == "cifar10-lossless":
    path = Path(arg).expanduser() if arg else _shared_file(_LOSSLESS_NAME, kind)
    x_train, y_train, x_test, y_test = load_cifar10_lossless(path)
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    if first is not None:
      if first > y.size:
        raise ValueError(
          f"first={first} but {path} holds only {y.size} {split} images; use first<={y.size}."
        )
      x, y = x[:first], y[:first]
    return x, y, f"cifar10-lossless:{path.resolve()}"
  path = Path(arg).expanduser() if arg else _shared_file(_JPEG_NAME, kind)
  if first is not None:
    _order_labels(split, first)  # checks the bound before decoding
  x, y, ranks = _cached_jpeg_split(path, split, cache_dir)
  if first is not None:
    order = _original_order(y, ranks, split, first)
    x, y = x[order], y[order]
  return x, y, f"cifar10-jpeg:{path.resolve()}"
