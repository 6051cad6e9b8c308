"""PEFT parameters as their own pytree, and the pure ``apply_fn`` over them.

* :mod:`~fastntk_jax.peft.linen` — Flax Linen variable dicts: predicates over
  paths (``batchnorm``, ``head``, ``prompts``), ``split``/``merge``;
* :mod:`~fastntk_jax.peft.nnx` — Flax NNX modules: NNX filters (BatchNorm,
  head, prompts, ``nnx.LoRAParam``) and ``update``.

Both return ``apply_fn(peft, x) -> logits`` with BatchNorm in inference mode,
which is all :func:`fastntk_jax.unlearn` sees of a model. The Linen API is
also available here, as ``fastntk_jax.peft.make_apply_fn`` etc.
"""

from fastntk_jax.peft import linen
from fastntk_jax.peft import nnx
from fastntk_jax.peft.linen import Predicate
from fastntk_jax.peft.linen import any_of
from fastntk_jax.peft.linen import batchnorm
from fastntk_jax.peft.linen import count_params
from fastntk_jax.peft.linen import head
from fastntk_jax.peft.linen import make_apply_fn
from fastntk_jax.peft.linen import merge
from fastntk_jax.peft.linen import prompts
from fastntk_jax.peft.linen import split

__all__ = [
  "Predicate",
  "any_of",
  "batchnorm",
  "count_params",
  "head",
  "linen",
  "make_apply_fn",
  "merge",
  "nnx",
  "prompts",
  "split",
]
