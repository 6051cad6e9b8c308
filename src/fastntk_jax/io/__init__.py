"""Files: atomic writes, checkpoints, the run environment.

* :mod:`~fastntk_jax.io.atomic` — writes that leave the last good file intact;
* :mod:`~fastntk_jax.io.checkpoint` — ``.npz`` pytree checkpoints (no pickle);
* :mod:`~fastntk_jax.io.environment` — device and versions for result files;
* :mod:`~fastntk_jax.io.paths` — where the shared data directory is.
"""
