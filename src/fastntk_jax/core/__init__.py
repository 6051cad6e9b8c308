"""The numerical core: pytrees and ``apply_fn(params, x) -> logits`` only.

Nothing here knows about Flax modules, files or datasets.

* :mod:`~fastntk_jax.core.blocking` — devices, meshes and sample blocks;
* :mod:`~fastntk_jax.core.kernels` — empirical NTKs, Jacobians, Grams and
  Jacobian–vector products over the PEFT pytree;
* :mod:`~fastntk_jax.core.solve`, :mod:`~fastntk_jax.core.cg` — dense and
  matrix-free linear solves;
* :mod:`~fastntk_jax.core.objective`, :mod:`~fastntk_jax.core.newton` — the
  linearised (cross-entropy) problem and its Newton solvers;
* :mod:`~fastntk_jax.core.update` — Eq. (1) of Fast-NTK;
* :mod:`~fastntk_jax.core.solvers` — the solvers :func:`unlearn` chooses from;
* :mod:`~fastntk_jax.core.unlearn` — the one-shot forgetting update;
* :mod:`~fastntk_jax.core.deletion` — many deletion requests against one
  trained model;
* :mod:`~fastntk_jax.core.tangent` — the linearised model;
* :mod:`~fastntk_jax.core.validate` — the input checks every entry point uses;
* :mod:`~fastntk_jax.core.nt` — neural-tangents on current JAX.
"""
