"""fastntk_jax: machine unlearning with the Neural Tangent Kernel over PEFT parameters.

Fast-NTK (Li et al. 2023, https://arxiv.org/abs/2312.14923) applies the one-shot
NTK unlearning update of Golatkar et al. (ECCV 2020) to parameter-efficient
fine-tuning parameters only: BatchNorm scale/shift plus a head in CNNs, prompts
plus a head in ViTs.
"""

from fastntk_jax import kernels
from fastntk_jax import peft
from fastntk_jax import solve
from fastntk_jax import update
from fastntk_jax._nt import NeuralTangentsUnavailable
from fastntk_jax.peft import make_apply_fn
from fastntk_jax.peft import merge
from fastntk_jax.peft import split
from fastntk_jax.unlearn import DEFAULT_DAMPING
from fastntk_jax.unlearn import UnlearnResult
from fastntk_jax.unlearn import UnlearningError
from fastntk_jax.unlearn import choose_solver
from fastntk_jax.unlearn import unlearn

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DAMPING",
    "NeuralTangentsUnavailable",
    "UnlearnResult",
    "UnlearningError",
    "choose_solver",
    "kernels",
    "make_apply_fn",
    "merge",
    "peft",
    "solve",
    "split",
    "unlearn",
    "update",
]
