"""Deterministic index helpers over label arrays: subsets and forget sets.

Everything here is pure NumPy over a label vector ``y`` of shape ``(N,)``
(non-negative integers) and returns sorted ``int64`` index arrays into it, so
the same indices select images, labels, logits or kernel rows alike.

* :func:`first_per_class` — the first ``k`` samples of each class (#IPC).
* :func:`class_subset` — the samples of some classes.
* :func:`forget_classes`, :func:`forget_random` — split ``D`` into the retain
  set ``D_r`` and the forget set ``D_f`` (sorted, disjoint, covering ``D``).
* :func:`parse_forget` / :func:`apply_forget` — the same from a command-line
  string such as ``"class:cat"`` or ``"random:0.1:seed=3"``.

Example::

  spec = parse_forget("class:cat,dog")
  retain_idx, forget_idx = apply_forget(spec, ds.y, ds.class_names)
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

import numpy as np

__all__ = [
  "ForgetSpec",
  "apply_forget",
  "class_split",
  "class_subset",
  "first_per_class",
  "forget_classes",
  "forget_random",
  "parse_forget",
]

_FORMS = "'class:0', 'class:0,3', 'class:cat', 'random:0.1' or 'random:0.1:seed=3'"


class ForgetSpec(NamedTuple):
  """What to forget, as parsed from the command line.

  Attributes:
    kind: ``"class"`` (every sample of some classes) or ``"random"`` (a random
      fraction of all samples).
    classes: for ``"class"``: class indices (``int``) or names (``str``).
    fraction: for ``"random"``: the fraction of samples to forget, in (0, 1).
    seed: for ``"random"``: the seed of the NumPy generator.
  """

  kind: Literal["class", "random"]
  classes: tuple[int | str, ...] = ()
  fraction: float = 0.0
  seed: int = 0

  def __str__(self) -> str:
    """The canonical string, which :func:`parse_forget` reads back."""
    if self.kind == "class":
      return "class:" + ",".join(str(c) for c in self.classes)
    return f"random:{self.fraction!r}:seed={self.seed}"


def _labels(y, name: str = "y") -> np.ndarray:
  y = np.asarray(y)
  if y.ndim == 1 and y.size == 0:  # checked first: np.asarray([]) is float64
    raise ValueError(f"{name} is empty; pass at least one label.")
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name} must be a 1-D integer label array, got {y.dtype} {y.shape}.")
  if y.min() < 0:
    raise ValueError(f"{name} holds negative labels (min {y.min()}); labels must be >= 0.")
  return y.astype(np.int64)


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return int(value)


def _class_ints(classes: Iterable[int], name: str = "classes") -> tuple[int, ...]:
  if isinstance(classes, (str, bytes)):
    raise ValueError(f"{name} must be a sequence of class indices, got the string {classes!r}.")
  out = []
  for c in classes:
    if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0:
      raise ValueError(f"{name} must hold non-negative int class indices, got {c!r}.")
    out.append(int(c))
  if not out:
    raise ValueError(f"{name} is empty; name at least one class.")
  if len(set(out)) != len(out):
    raise ValueError(f"{name} lists a class twice: {out}.")
  return tuple(out)


def first_per_class(
  y, k: int, *, class_names: Sequence[str] | None = None
) -> np.ndarray:
  """The first ``k`` samples of each class, in their original order.

  Args:
    y: labels ``(N,)``.
    k: images per class (#IPC), ``>= 1``.
    class_names: when given, every class ``0 .. len(class_names) - 1`` must
      have ``k`` samples (and errors name it); otherwise the classes present
      in ``y`` are used.

  Returns:
    Sorted int64 indices ``(C * k,)`` into ``y``.

  Raises:
    ValueError: a class has fewer than ``k`` samples.
  """
  y = _labels(y)
  k = _positive_int(k, "k")
  classes = range(len(class_names)) if class_names is not None else np.unique(y)
  picked = []
  for c in classes:
    idx = np.flatnonzero(y == c)
    if idx.size < k:
      name = f"{c} ({class_names[c]!r})" if class_names is not None else str(c)
      raise ValueError(
        f"ipc={k} but class {name} has only {idx.size} samples; lower ipc "
        "or choose classes with enough samples."
      )
    picked.append(idx[:k])
  return np.sort(np.concatenate(picked))


def class_subset(y, classes: Sequence[int]) -> np.ndarray:
  """Sorted int64 indices of the samples whose label is one of ``classes``."""
  y = _labels(y)
  return np.flatnonzero(np.isin(y, _class_ints(classes))).astype(np.int64)


def _retain_forget(n: int, forget_idx: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
  if forget_idx.size == 0:
    raise ValueError(f"the forget set is empty: {what} selects no sample.")
  if forget_idx.size == n:
    raise ValueError(
      f"the forget set is the whole data ({n} samples): {what} leaves nothing to retain."
    )
  mask = np.zeros(n, dtype=bool)
  mask[forget_idx] = True
  return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def forget_classes(y, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Forgets every sample of ``classes``.

  Args:
    y: labels ``(N,)``.
    classes: class indices to forget.

  Returns:
    ``(retain_idx, forget_idx)``: sorted, disjoint int64 indices covering
    ``range(N)``.

  Raises:
    ValueError: no sample has one of these classes, or every sample does.
  """
  y = _labels(y)
  forget = class_subset(y, classes)
  return _retain_forget(y.size, forget, f"classes {list(classes)}")


def forget_random(y, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Forgets a random fraction of the samples, reproducibly for a seed.

  The forget set has ``max(1, floor(fraction * N + 0.5))`` samples drawn
  without replacement by ``np.random.default_rng(seed).permutation``.

  Args:
    y: labels ``(N,)`` (only their number matters).
    fraction: in the open interval (0, 1).
    seed: non-negative int.

  Returns:
    ``(retain_idx, forget_idx)``: sorted, disjoint int64 indices covering ``range(N)``.

  Raises:
    ValueError: a fraction outside (0, 1), a bad seed, or a fraction that would
      forget every sample.
  """
  y = _labels(y)
  if (
    isinstance(fraction, bool)
    or not isinstance(fraction, numbers.Real)
    or not math.isfinite(fraction)
    or not 0 < fraction < 1
  ):
    raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}.")
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
  n = y.size
  k = max(1, math.floor(fraction * n + 0.5))
  forget = np.sort(np.random.default_rng(int(seed)).permutation(n)[:k])
  return _retain_forget(n, forget, f"fraction={fraction} of {n} samples")


def _parse_class_token(token: str, spec: str) -> int | str:
  token = token.strip()
  if not token:
    raise ValueError(f"forget spec {spec!r} has an empty class; expected e.g. {_FORMS}.")
  return int(token) if token.isascii() and token.isdigit() else token


def parse_forget(spec: str) -> ForgetSpec:
  """Parses a forget specification from the command line.

  Forms: ``"class:0"``, ``"class:0,3"``, ``"class:cat"``, ``"class:cat,dog"``
  (all digits mean a class index, anything else a class name),
  ``"random:0.1"`` and ``"random:0.1:seed=3"`` (seed 0 by default).

  Raises:
    ValueError: any other form, an empty or repeated class, a fraction outside
      (0, 1) or a bad seed.
  """
  if not isinstance(spec, str):
    raise ValueError(f"forget spec must be a string such as {_FORMS}, got {spec!r}.")
  kind, _, rest = spec.strip().partition(":")
  kind = kind.strip().lower()
  if kind == "class":
    classes = tuple(_parse_class_token(t, spec) for t in rest.split(","))
    if len(set(classes)) != len(classes):
      raise ValueError(f"forget spec {spec!r} lists a class twice.")
    return ForgetSpec("class", classes=classes)
  if kind == "random":
    match = re.fullmatch(r"\s*([^:]+?)\s*(?::\s*seed\s*=\s*([0-9]+)\s*)?", rest)
    if match is None:
      raise ValueError(f"cannot parse forget spec {spec!r}; expected e.g. {_FORMS}.")
    try:
      fraction = float(match.group(1))
    except ValueError:
      raise ValueError(
        f"forget spec {spec!r}: fraction {match.group(1)!r} is not a number; "
        f"expected e.g. {_FORMS}."
      ) from None
    if not (math.isfinite(fraction) and 0 < fraction < 1):
      raise ValueError(f"forget spec {spec!r}: fraction must lie in (0, 1), got {fraction}.")
    return ForgetSpec("random", fraction=fraction, seed=int(match.group(2) or 0))
  raise ValueError(f"unknown forget spec {spec!r}; expected one of {_FORMS}.")


def apply_forget(
  spec: ForgetSpec | str, y, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
  """Turns a forget specification into retain and forget indices.

  Args:
    spec: a :class:`ForgetSpec` or a string for :func:`parse_forget`.
    y: labels ``(N,)`` in ``0 .. len(class_names) - 1``.
    class_names: the names that ``"class:NAME"`` refers to.

  Returns:
    ``(retain_idx, forget_idx)``: sorted, disjoint int64 indices covering ``range(N)``.

  Raises:
    ValueError: an unknown class name or index, an empty forget set or one
      that is the whole data.
  """
  if isinstance(spec, str):
    spec = parse_forget(spec)
  if not isinstance(spec, ForgetSpec):
    raise ValueError(f"spec must be a ForgetSpec or a string, got {type(spec).__name__}.")
  y = _labels(y)
  names = tuple(class_names)
  if y.max() >= len(names):
    raise ValueError(
      f"y holds label {y.max()} but there are only {len(names)} class_names; "
      "pass the class names of this data."
    )
  if spec.kind == "random":
    return forget_random(y, spec.fraction, spec.seed)
  if spec.kind != "class":
    raise ValueError(f"spec.kind must be 'class' or 'random', got {spec.kind!r}.")
  ids = []
  for c in spec.classes:
    if isinstance(c, str):
      if c not in names:
        raise ValueError(f"unknown class {c!r} in forget spec; the classes are {names}.")
      ids.append(names.index(c))
    elif isinstance(c, numbers.Integral) and not isinstance(c, bool) and 0 <= c < len(names):
      ids.append(int(c))
    else:
      raise ValueError(
        f"class {c!r} in forget spec is out of range; use 0..{len(names) - 1} or one of {names}."
      )
  return forget_classes(y, ids)


def class_split(x, y, forget_classes: Sequence[int]):
  """Splits ``(x, y)`` into ``retain`` and ``forget`` pairs by class."""
  y = np.asarray(y)
  mask = np.isin(y, np.asarray(list(forget_classes)))
  if not mask.any():
    raise ValueError(f"forget_classes={list(forget_classes)}: no sample has "
                     "these labels.")
  x = np.asarray(x)
  return (x[~mask], y[~mask]), (x[mask], y[mask])
