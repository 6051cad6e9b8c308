"""Measuring an unlearned model.

* :mod:`~fastntk_jax.evaluation.metrics` — accuracies and distances to Retrain;
* :mod:`~fastntk_jax.evaluation.mia` — membership-inference attacks;
* :mod:`~fastntk_jax.evaluation.relearn` — relearn time;
* :mod:`~fastntk_jax.evaluation.probe` — linear probes on frozen features;
* :mod:`~fastntk_jax.evaluation.timing` — wall-clock and compile-time measurement.
"""
