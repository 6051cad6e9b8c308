"""The unlearning bench: named protocols, every method, every metric.

``fastntk experiment CONFIG`` runs a configuration (``configs/*.toml``) and
writes a results directory (:mod:`fastntk_jax.experiments.runner`).
"""

from fastntk_jax.experiments.config import ConfigError
from fastntk_jax.experiments.config import load_config
from fastntk_jax.experiments.config import resolve
from fastntk_jax.experiments.runner import run_experiment

__all__ = ["ConfigError", "load_config", "resolve", "run_experiment"]
