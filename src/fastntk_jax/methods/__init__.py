"""Every unlearning method of the bench behind one signature.

Example::

  from fastntk_jax import methods
  problem = methods.UnlearningProblem(apply_fn, w0, wD, retain, forget,
                                      recipe, num_classes=10)
  res = methods.run_method("salun", problem, seed=0, epochs=5)
  res.params, res.seconds, res.compile_seconds, res.info

``methods.defaults(name)`` lists a method's hyperparameters and defaults;
docs/methods.md describes each method, its references and the deviations the
PEFT setting forces.
"""

from fastntk_jax.methods.base import METHOD_NAMES
from fastntk_jax.methods.base import MethodResult
from fastntk_jax.methods.base import UnlearningProblem
from fastntk_jax.methods.distill import kl_divergence
from fastntk_jax.methods.gradient import random_wrong_labels
from fastntk_jax.methods.gradient import saliency_mask
from fastntk_jax.methods.sfr_on import adaptive_weights
from fastntk_jax.methods.sfr_on import batch_fisher_diagonal
from fastntk_jax.methods.sfr_on import fisher_diagonal
from fastntk_jax.methods.sfr_on import fisher_mask
from fastntk_jax.methods.sfr_on import slow_update
from fastntk_jax.methods.registry import defaults
from fastntk_jax.methods.registry import released_code
from fastntk_jax.methods.registry import run_method

__all__ = [
    "METHOD_NAMES",
    "MethodResult",
    "UnlearningProblem",
    "adaptive_weights",
    "batch_fisher_diagonal",
    "defaults",
    "fisher_diagonal",
    "fisher_mask",
    "kl_divergence",
    "random_wrong_labels",
    "released_code",
    "run_method",
    "saliency_mask",
    "slow_update",
]
