"""PEFT parameters as their own pytree: split, merge, and the pure ``apply_fn``.

A Flax variable tree (``{"params": ..., "batch_stats": ...}``) is split by a
predicate into ``peft`` (the leaves Fast-NTK differentiates and updates) and
``frozen`` (everything else, BatchNorm statistics included). Both halves keep
the nesting of the original, with unselected branches pruned, so that
``merge(*split(v, pred)) == v``.

A predicate is a callable ``(path, leaf) -> bool`` where ``path`` is the tuple
of dictionary keys from the root, the collection first, e.g.
``("params", "stage1_block0", "bn1", "scale")``.

Ready predicates: :func:`batchnorm` (scale and shift of every BatchNorm),
:func:`head` (a classifier by module name), :func:`prompts` (prompt tokens by
name) and :func:`any_of` to combine them. The paper's CNN setting is
``any_of(batchnorm(variables), head())``; its ViT setting is
``any_of(prompts(), head())``.

References:
  Li et al., Fast-NTK: Parameter-Efficient Unlearning for Large-Scale Models,
  2023, https://arxiv.org/abs/2312.14923 (Sec. III, Fig. 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "Predicate",
    "any_of",
    "batchnorm",
    "count_params",
    "head",
    "make_apply_fn",
    "merge",
    "prompts",
    "split",
]

Path = tuple[str, ...]
Predicate = Callable[[Path, Any], bool]


def _walk(tree: Mapping, prefix: Path = ()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _walk(v, prefix + (str(k),))
    else:
      yield prefix + (str(k),), v


def _insert(tree: dict, path: Path, leaf) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = leaf


def split(variables: Mapping, predicate: Predicate) -> tuple[dict, dict]:
  """Splits a nested-dict variable tree into ``(peft, frozen)``.

  Args:
    variables: nested mapping of arrays (a Flax variable dict).
    predicate: ``(path, leaf) -> bool``; True selects the leaf for ``peft``.

  Returns:
    ``(peft, frozen)``: two nested dicts with the original nesting, each
    holding only its own leaves.

  Raises:
    TypeError: if ``variables`` is not a mapping.
    ValueError: if the predicate selects no leaf.
  """
  if not isinstance(variables, Mapping):
    raise TypeError(
        "variables: expected a nested mapping such as a Flax variable dict "
        f"({{'params': ..., 'batch_stats': ...}}), got {type(variables)}.")
  peft, frozen = {}, {}
  for path, leaf in _walk(variables):
    _insert(peft if predicate(path, leaf) else frozen, path, leaf)
  if not peft:
    raise ValueError(
        "predicate selected no parameter: check module names (e.g. the head "
        "module's name for head(name=...)) against the variable tree.")
  return peft, frozen


def merge(peft: Mapping, frozen: Mapping) -> dict:
  """Inverse of :func:`split`: one nested dict with the leaves of both.

  Raises:
    ValueError: if a path is present in both trees.
  """
  out: dict = {}
  for path, leaf in _walk(frozen):
    _insert(out, path, leaf)
  for path, leaf in _walk(peft):
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
      if not isinstance(node, dict):
        raise ValueError(f"merge: {'/'.join(path)} collides with a leaf.")
    if path[-1] in node:
      raise ValueError(
          f"merge: {'/'.join(path)} is in both peft and frozen; split the tree "
          "with split() so that each leaf is in exactly one half.")
    node[path[-1]] = leaf
  return out


def batchnorm(variables: Mapping, collection: str = "params",
              stats_collection: str = "batch_stats") -> Predicate:
  """Selects the scale and shift of every BatchNorm layer.

  A BatchNorm is recognised structurally: a module whose ``params`` are
  ``scale``/``bias`` and which also has running statistics (``mean``, ``var``)
  in ``batch_stats``. LayerNorm and GroupNorm, which have no running
  statistics, are not selected.

  Args:
    variables: the full variable tree the predicate will be applied to.
    collection: the parameter collection.
    stats_collection: the collection holding running statistics.
  """
  stats = variables.get(stats_collection, {}) if isinstance(
      variables, Mapping) else {}
  bn_modules = set()
  for path, _ in _walk(stats):
    if path[-1] in ("mean", "var"):
      bn_modules.add(path[:-1])

  def pred(path: Path, leaf) -> bool:
    del leaf
    return (len(path) >= 2 and path[0] == collection
            and path[-1] in ("scale", "bias") and path[1:-1] in bn_modules)

  return pred


def head(name: str = "head", collection: str = "params") -> Predicate:
  """Selects every parameter of the module called ``name`` (any depth)."""

  def pred(path: Path, leaf) -> bool:
    del leaf
    return path[0] == collection and name in path[1:-1]

  return pred


def prompts(keyword: str = "prompt", collection: str = "params") -> Predicate:
  """Selects parameters whose name or module name contains ``keyword``."""

  def pred(path: Path, leaf) -> bool:
    del leaf
    return path[0] == collection and any(keyword in p for p in path[1:])

  return pred


def any_of(*predicates: Predicate) -> Predicate:
  """A predicate true where any of ``predicates`` is."""
  if not predicates:
    raise ValueError("any_of: give at least one predicate.")

  def pred(path: Path, leaf) -> bool:
    return any(p(path, leaf) for p in predicates)

  return pred


def count_params(tree) -> int:
  """Number of scalars in a pytree."""
  return int(sum(jnp.size(x) for x in jax.tree_util.tree_leaves(tree)))


def make_apply_fn(module, variables: Mapping, predicate: Predicate, *,
                  method: str | Callable | None = None,
                  **apply_kwargs) -> tuple[Callable, dict, dict]:
  """The pure ``apply_fn(peft, x) -> logits`` of a Flax module.

  BatchNorm runs in inference mode: ``apply_kwargs`` default to
  ``train=False`` and no collection is mutable, so each sample's output
  depends on that sample alone — which the per-sample (``vmap_axes=0``)
  kernels of :mod:`fastntk_jax.core.kernels` assume.

  Args:
    module: a ``flax.linen.Module``.
    variables: its full variable tree.
    predicate: selects the PEFT leaves (see :func:`split`).
    method: optional method of ``module`` to apply.
    **apply_kwargs: keyword arguments for ``module.apply``; ``train=False``
      unless given.

  Returns:
    ``(apply_fn, peft, frozen)`` with ``apply_fn(peft, x)`` of shape
    ``(N, C)`` for inputs ``x`` of shape ``(N, ...)``.
  """
  peft, frozen = split(variables, predicate)
  apply_kwargs.setdefault("train", False)
  if method is not None:
    apply_kwargs["method"] = method

  def apply_fn(peft_params, x):
    return module.apply(merge(peft_params, frozen), x, **apply_kwargs)

  return apply_fn, peft, frozen
