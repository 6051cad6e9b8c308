"""CIFAR-10 loaders: the packaged subset, the shared lossless subset and the JPEG zip.

Everything here returns plain NumPy arrays: images are ``uint8`` of shape
``(N, 32, 32, 3)`` (RGB, HWC) and labels are ``int32`` of shape ``(N,)`` in the
CIFAR-10 label order of :data:`CIFAR10_CLASSES`. Normalisation for a particular
model lives with that model (see :func:`fastntk_jax.models.normalize_cifar`).

Data sources:

* ``assets/cifar10_embedded.npz`` — shipped with the package: the first 100
  train and 100 test images of each class of the JPEG archive (made by
  ``scripts/make_embedded_subset.py``).
* ``../shared/data/cifar10-lossless-subset.npz`` — exact pixels of the original
  train[0:4000] and test[0:1000].
* ``../shared/data/cifar10-jpeg.zip`` — all 60,000 images as JPEG files laid out
  as ``cifar10/<split>/<class>/NNNN.jpg``, where ``NNNN`` is the image's rank in
  its class in the original CIFAR-10 order.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "CIFAR10_CLASSES",
    "load_cifar10_lossless",
    "load_embedded_cifar10",
    "read_cifar10_jpeg_zip",
    "read_cifar10_jpeg_zip_with_names",
    "shared_data_dir",
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
_ASSET_DIR = Path(__file__).resolve().parent / "assets"
_EMBEDDED_NAME = "cifar10_embedded.npz"
_LOSSLESS_NAME = "cifar10-lossless-subset.npz"
_IMAGE_SHAPE = (32, 32, 3)
_RANK_FILE = re.compile(r"^(\d+)\.jpe?g$", re.IGNORECASE)
_ENV_VAR = "FASTNTK_SHARED_DATA"

CifarArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def shared_data_dir() -> Path | None:
    """Locates the offline data folder shared beside the project.

    Looks first for ``../shared/data`` relative to the repository root (the
    folder holding ``src/``), then for the folder named by the environment
    variable ``FASTNTK_SHARED_DATA``.

    Returns:
      The folder as an absolute ``Path``, or ``None`` when neither exists.
    """
    repo_root = Path(__file__).resolve().parents[2]
    candidate = (repo_root.parent / "shared" / "data").resolve()
    if candidate.is_dir():
        return candidate
    env = os.environ.get(_ENV_VAR)
    if env:
        path = Path(env).expanduser().resolve()
        if path.is_dir():
            return path
    return None


def _check_images_labels(x: np.ndarray, y: np.ndarray, where: str) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != _IMAGE_SHAPE:
        raise ValueError(
            f"{where}: expected uint8 images of shape (N, 32, 32, 3), got "
            f"{x.dtype} {x.shape}; regenerate the file."
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{where}: expected labels of shape ({x.shape[0]},), got {y.shape}."
        )
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
            raise ValueError(
                f"{where}: {path} lacks the arrays {missing}; it holds {sorted(npz.files)}."
            )
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
    return _load_npz_split(_ASSET_DIR / _EMBEDDED_NAME, "load_embedded_cifar10")


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
        root = shared_data_dir()
        if root is None:
            raise FileNotFoundError(
                "load_cifar10_lossless: path=None but no ../shared/data folder was found; "
                f"pass path= or set {_ENV_VAR}."
            )
        path = root / _LOSSLESS_NAME
    return _load_npz_split(path, "load_cifar10_lossless")


def _check_member_name(name: str) -> None:
    """Rejects archive member names that would escape the archive root."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"unsafe archive member {name!r}: absolute paths are not allowed.")
    if ".." in re.split(r"[/\\]", name):
        raise ValueError(f"unsafe archive member {name!r}: '..' components are not allowed.")


def _select_members(
    names: Sequence[str], split: str, per_class: int | None
) -> tuple[list[str], np.ndarray]:
    """Picks ``<...>/<split>/<class>/NNNN.jpg`` members, class-major, rank-sorted.

    Args:
      names: every member name of the archive; all are validated.
      split: ``"train"`` or ``"test"``.
      per_class: keep the first ``per_class`` ranks of each class; None keeps all.

    Returns:
      ``(members, labels)``: the chosen names and their int32 labels ``(N,)``.
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
            raise ValueError(
                f"malformed archive: member {name!r} is not named NNNN.jpg."
            )
        by_class.setdefault(CIFAR10_CLASSES.index(cls), []).append((int(match.group(1)), name))
    if not by_class:
        raise ValueError(
            f"malformed archive: no images for split {split!r}; expected members "
            f"like 'cifar10/{split}/<class>/NNNN.jpg'."
        )
    members: list[str] = []
    labels: list[int] = []
    for label in sorted(by_class):
        ranked = sorted(by_class[label])
        ranks = [r for r, _ in ranked]
        if len(set(ranks)) != len(ranks):
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
    return members, np.asarray(labels, dtype=np.int32)


def _decode_jpeg(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"malformed archive: cannot decode member {name!r}: {err}") from err
    if arr.shape != _IMAGE_SHAPE:
        raise ValueError(
            f"malformed archive: member {name!r} decodes to shape {arr.shape}, "
            f"expected {_IMAGE_SHAPE}."
        )
    return arr


def read_cifar10_jpeg_zip_with_names(
    path: Path | str, split: str = "train", per_class: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Like :func:`read_cifar10_jpeg_zip`, also returning the member names.

    Returns:
      ``(x, y, names)``: uint8 images ``(N, 32, 32, 3)``, int32 labels ``(N,)``
      and the ``N`` archive member names the images came from.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")
    if per_class is not None and (not isinstance(per_class, int) or per_class < 1):
        raise ValueError(f"per_class must be a positive int or None, got {per_class!r}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_cifar10_jpeg_zip: no file at {path}.")
    try:
        with zipfile.ZipFile(path) as zf:
            members, labels = _select_members(zf.namelist(), split, per_class)
            images = np.stack([_decode_jpeg(zf.read(m), m) for m in members])
    except zipfile.BadZipFile as err:
        raise ValueError(
            f"read_cifar10_jpeg_zip: {path} is not a valid zip archive ({err}); "
            "pass the cifar10-jpeg.zip file."
        ) from err
    return images, labels, members


def read_cifar10_jpeg_zip(
    path: Path | str, split: str = "train", per_class: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads CIFAR-10 JPEG images straight from the zip archive (no extraction).

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
