"""fastntk_jax: machine unlearning with the Neural Tangent Kernel over PEFT parameters.

Fast-NTK (Li et al. 2023, https://arxiv.org/abs/2312.14923) applies the one-shot
NTK unlearning update of Golatkar et al. (ECCV 2020) to parameter-efficient
fine-tuning parameters only: BatchNorm scale/shift plus a head in CNNs, prompts
plus a head in ViTs.

The package is in layers:

* :mod:`fastntk_jax.core` — the numerics, over pytrees and
  ``apply_fn(params, x) -> logits`` only: kernels, solves, Eq. (1),
  :func:`unlearn`, deletion requests;
* :mod:`fastntk_jax.peft` — PEFT parameters as their own pytree, for Flax
  NNX and Linen models;
* the edge: :mod:`~fastntk_jax.models` (architectures, weights, the zoo),
  :mod:`~fastntk_jax.data`, :mod:`~fastntk_jax.training`,
  :mod:`~fastntk_jax.evaluation`, :mod:`~fastntk_jax.methods` (the baselines),
  :mod:`~fastntk_jax.experiments` (the bench), :mod:`~fastntk_jax.cli`,
  :mod:`~fastntk_jax.io`.
"""

from fastntk_jax import peft
from fastntk_jax.core import kernels
from fastntk_jax.core import solvers
from fastntk_jax.core.nt import NeuralTangentsUnavailable
from fastntk_jax.core.solvers import Auto
from fastntk_jax.core.solvers import KernelSpace
from fastntk_jax.core.solvers import MatrixFree
from fastntk_jax.core.solvers import ParameterSpace
from fastntk_jax.core.solvers import Sketched
from fastntk_jax.core.solvers import SketchedKernel
from fastntk_jax.core.unlearn import DEFAULT_DAMPING
from fastntk_jax.core.unlearn import UnlearnResult
from fastntk_jax.core.unlearn import UnlearningError
from fastntk_jax.core.unlearn import unlearn
from fastntk_jax.peft.linen import make_apply_fn
from fastntk_jax.peft.linen import merge
from fastntk_jax.peft.linen import split

__version__ = "0.3.0"

__all__ = [
  "Auto",
  "DEFAULT_DAMPING",
  "KernelSpace",
  "MatrixFree",
  "NeuralTangentsUnavailable",
  "ParameterSpace",
  "Sketched",
  "SketchedKernel",
  "UnlearnResult",
  "UnlearningError",
  "kernels",
  "make_apply_fn",
  "merge",
  "peft",
  "solvers",
  "unlearn",
  "split",
]
