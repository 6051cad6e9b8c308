"""neural-tangents through fastntk_jax.core.nt: current JAX, no TensorFlow."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fastntk_jax.core import nt


def test_import_does_not_pull_tensorflow_or_public_nt():
  code = ("import sys, fastntk_jax, fastntk_jax.core.kernels; "
          "from fastntk_jax.core import nt; nt.empirical_ntk_fn(lambda p, x: x * p); "
          "print('tensorflow' in sys.modules, 'neural_tangents' in sys.modules, "
          "'tensorflow_datasets' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.split()
  assert out == ["False", "False", "False"]


def test_jax_namespaces_untouched():
  """The shims live in a private package; JAX's own modules are not patched."""
  code = ("import jax.core, jax.interpreters.ad as ad, importlib.util as u; "
          "before = (sorted(vars(jax.core)), sorted(vars(ad)), u.find_spec('jax.util')); "
          "import fastntk_jax.core.kernels; "
          "after = (sorted(vars(jax.core)), sorted(vars(ad)), u.find_spec('jax.util')); "
          "print(before == after)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == "True"


def test_implementation_3_is_refused():
  with pytest.raises(ValueError, match="structured derivatives"):
    nt.empirical_ntk_fn(lambda p, x: x @ p, implementation=3)


def test_ntk_vp_matches_dense():
  rng = np.random.default_rng(0)
  w = {"a": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)}
  f = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
  x1 = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  x2 = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  dense = nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0)(x1, x2, w)
  ct = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
  vp = nt.empirical_ntk_vp_fn(f, x1, x2, w)(ct)
  np.testing.assert_allclose(vp, jnp.einsum("ijab,jb->ia", dense, ct), atol=1e-4)
  assert nt.nt_version() == "0.6.5"


def test_missing_or_broken_neural_tangents_gives_a_clear_error(monkeypatch):
  import importlib.util
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(nt.NeuralTangentsUnavailable,
                     match="pip install --no-deps neural-tangents==0.6.5"):
    nt._load()
