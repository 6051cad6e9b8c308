"""PEFT parameters of a Flax NNX model as their own pytree, and its pure ``apply_fn``.

An NNX filter (``nnx.Param``, ``nnx.LoRAParam``, a path predicate, or a
combination with ``nnx.Any``) selects the PEFT parameters; :func:`make_apply_fn`
splits the model into those (a plain nested dict, ``w_0``) and the frozen rest,
with BatchNorm in inference mode (running statistics, never updated), and
returns ``apply_fn(peft, x) -> logits``, the only view of the model that
training and unlearning take. :func:`update` writes parameters (e.g. the
unlearned ones) back into the model.

Ready filters: :func:`batchnorm` (scale and shift of every ``nnx.BatchNorm``),
:func:`head` (a classifier by attribute name), :func:`prompts` (prompt tokens by
name), :func:`lora` (``nnx.LoRAParam``, the LoRA factors of ``nnx.LoRA`` and
``nnx.LoRALinear``) and :func:`any_of`. The paper's CNN setting is
``any_of(batchnorm(model), head())``; its ViT setting ``any_of(prompts(), head())``.

LoRA: ``nnx.LoRA`` starts with ``B = 0``, so at ``w_0`` the logits do not depend
on ``A`` (``∂f/∂A = 0``). Linearising at ``w_D`` (the default of
:func:`fastntk_jax.unlearn`) after fine-tuning is what makes ``A`` count;
linearising at ``w_0`` sees ``B`` only.

Example::

  model = MyCNN(rngs=nnx.Rngs(0))           # with nnx.BatchNorm layers
  peft = peft_nnx.make_apply_fn(
      model, peft_nnx.any_of(peft_nnx.batchnorm(model), peft_nnx.head()))
  res = unlearn(peft.apply_fn, w_D, retain, forget, anchor=peft.init_params)
  peft_nnx.update(model, res.params)        # the deployed model forgets
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from flax import nnx

__all__ = [
  "NnxPeft",
  "any_of",
  "batchnorm",
  "head",
  "lora",
  "make_apply_fn",
  "prompts",
  "update",
]

Filter = Any  # an NNX filter: a Variable type, a predicate (path, value) -> bool, ...


class NnxPeft(NamedTuple):
  """An NNX model split for PEFT.

  Attributes:
    apply_fn: ``apply_fn(peft, x) -> logits``, pure, BatchNorm in inference mode.
    init_params: ``w_0``, the selected parameters as a nested dict of arrays.
    frozen: the rest of the model's state (an ``nnx.State``).
    graphdef: the model's structure (``nnx.GraphDef``), for :func:`nnx.merge`.
    num_total: scalars in every ``nnx.Param`` of the model.
    num_peft: scalars in ``init_params``.
  """

  apply_fn: Callable[[Any, Any], jax.Array]
  init_params: dict
  frozen: Any
  graphdef: Any
  num_total: int
  num_peft: int


def _get(tree: Mapping, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def _count(state) -> int:
  return sum(int(v.size) for v in jax.tree_util.tree_leaves(nnx.to_pure_dict(state)))


def make_apply_fn(model: nnx.Module, peft_filter: Filter, *,
                  method: str | None = None) -> NnxPeft:
  """Splits ``model`` into PEFT parameters and the frozen rest.

  The user's model is not modified: a copy is put in inference mode
  (``.eval()``: BatchNorm uses its running statistics, dropout is off) and split.

  Args:
    model: an ``nnx.Module`` mapping a batch ``x`` to logits.
    peft_filter: NNX filter of the PEFT parameters; it must select only
      parameters (``nnx.Param`` and subclasses such as ``nnx.LoRAParam``), not
      BatchNorm statistics or RNG state.
    method: name of the method to call instead of ``__call__``.

  Returns:
    :class:`NnxPeft`.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``.
    ValueError: the filter selects nothing, or selects non-parameters.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"model must be an nnx.Module, got {type(model).__name__}; for a Linen "
        "module use fastntk_jax.peft.make_apply_fn(module, variables, predicate).")
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  copy.eval()
  graphdef, peft, frozen = nnx.split(copy, peft_filter, ...)
  flat = list(nnx.to_flat_state(peft))
  if not flat:
    raise ValueError(
        "peft_filter selects no variable of the model; check the names (e.g. "
        "peft_nnx.head('classifier')) or the variable type.")
  wrong = [".".join(map(str, p)) for p, v in flat if not isinstance(v, nnx.Param)]
  if wrong:
    raise ValueError(
        f"peft_filter selects variables that are not parameters: {wrong[:4]} "
        "(BatchNorm statistics and RNG state stay frozen); combine the filter "
        "with nnx.Param, e.g. nnx.All(nnx.Param, f).")

  def apply_fn(params, x):
    st = nnx.from_flat_state(
        {path: var.replace(_get(params, path)) for path, var in flat})
    m = nnx.merge(graphdef, st, frozen)
    return (getattr(m, method) if method else m)(x)

  w0 = nnx.to_pure_dict(peft)
  everything = nnx.state(model, nnx.Param)
  return NnxPeft(apply_fn, w0, frozen, graphdef, _count(everything), _count(peft))


def update(model: nnx.Module, params: Mapping) -> None:
  """Writes PEFT parameters (a nested dict as in ``init_params``) into ``model``.

  Raises:
    KeyError: a path of ``params`` that is not a parameter of ``model``.
    ValueError: a shape that differs from the model's.
  """
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  leaves = jax.tree_util.tree_leaves_with_path(params)
  new = {}
  for keys, value in leaves:
    path = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
                 for k in keys)
    if path not in flat:
      raise KeyError(f"params has {'/'.join(map(str, path))}, which is not a "
                     "parameter of the model.")
    if tuple(value.shape) != tuple(flat[path].get_value().shape):
      raise ValueError(f"params {'/'.join(map(str, path))} has shape "
                       f"{tuple(value.shape)}, the model's is "
                       f"{tuple(flat[path].get_value().shape)}.")
    new[path] = flat[path].replace(value)
  nnx.update(model, nnx.from_flat_state(new))


# ----------------------------------------------------------------- filters

def batchnorm(model: nnx.Module) -> Filter:
  """Scale and shift of every ``nnx.BatchNorm`` in ``model`` (not its statistics)."""
  paths = {path for path, m in nnx.iter_modules(model)
           if isinstance(m, nnx.BatchNorm)}
  if not paths:
    raise ValueError("model has no nnx.BatchNorm layer.")
  return lambda path, value: (isinstance(value, nnx.Param)
                              and tuple(path[:-1]) in paths)


def head(name: str = "head") -> Filter:
  """Every parameter below the attribute ``name`` (at any depth)."""
  return lambda path, value: isinstance(value, nnx.Param) and name in path[:-1]


def prompts(keyword: str = "prompt") -> Filter:
  """Parameters whose own name or module name contains ``keyword``."""
  return lambda path, value: (isinstance(value, nnx.Param)
                              and any(keyword in str(p) for p in path))


def lora() -> Filter:
  """The LoRA factors (``nnx.LoRAParam``) of ``nnx.LoRA`` / ``nnx.LoRALinear``."""
  return nnx.LoRAParam


def any_of(*filters: Filter) -> Filter:
  """A filter true where any of ``filters`` is (``nnx.Any``)."""
  if not filters:
    raise ValueError("any_of needs at least one filter.")
  return nnx.Any(*filters)
