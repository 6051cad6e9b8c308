"""The tangent (linearised) model: a network that Fast-NTK unlearns exactly.

``tangent_model(apply_fn, w_0)`` is the first-order Taylor expansion of the
PEFT model around ``w_0``::

    f_lin(w, x) = f(w_0, x) + J(w_0, x) (w − w_0)

evaluated with one Jacobian–vector product (``jax.jvp``), never a Jacobian.
It is linear in ``w``, so fine-tuning it with a convex loss plus the
proximal term ``(λ/N)/2‖w − w_0‖²`` (:class:`fastntk_jax.training.train.FinetuneConfig`
with ``tangent=True, proximal=λ``) is a strongly convex problem, and
:func:`fastntk_jax.core.unlearn.unlearn` with ``anchor=w_0`` returns exactly what
retraining the tangent model on ``D_r`` to convergence would (its
linearisation is the model itself, wherever it is taken).

Cost: a JVP is about two to three forward passes (the primal and the tangent
computed together); :mod:`benchmarks.tangent_mode` measures it.

References:
  Lee et al., Wide Neural Networks of Any Depth Evolve as Linear Models
  Under Gradient Descent, NeurIPS 2019, https://arxiv.org/abs/1902.06720;
  Golatkar, Achille, Soatto, ECCV 2020 (the linearised model in unlearning).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["tangent_model"]


def tangent_model(apply_fn: Callable[[Any, Any], jax.Array],
                  w_0) -> Callable[[Any, Any], jax.Array]:
  """``(w, x) -> f(w_0, x) + J(w_0, x)(w − w_0)``, a pure ``apply_fn``.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits``.
    w_0: the expansion point (a pytree like ``params``): the PEFT
      parameters before fine-tuning.

  Returns:
    The tangent model's ``apply_fn``, with the signature of ``apply_fn``;
    at ``w = w_0`` it equals ``apply_fn(w_0, x)``.
  """
  def apply_lin(params, x):
    dw = jax.tree_util.tree_map(
        lambda w, w0: (w - w0).astype(jax.numpy.result_type(w0)), params, w_0)
    out, tan = jax.jvp(lambda p: apply_fn(p, x), (w_0,), (dw,))
    return out + tan

  return apply_lin
