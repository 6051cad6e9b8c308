"""The unlearning bench: named protocols, every method, every metric.

``fastntk experiment CONFIG`` runs a configuration (``configs/*.toml``) and
writes a results directory (:mod:`fastntk_jax.bench.runner`).
"""

from fastntk_jax.bench.config import ConfigError
from fastntk_jax.bench.config import load_config
from fastntk_jax.bench.config import resolve
from fastntk_jax.bench.runner import run_experiment

__all__ = ["ConfigError", "load_config", "resolve", "run_experiment"]
