"""Measuring an unlearned model.

* :mod:`~fastntk_jax.evaluation.metrics` — accuracies, KL and JS divergences
  to Retrain;
* :mod:`~fastntk_jax.evaluation.forget_score` — the NeurIPS 2023 unlearning
  challenge's forget score over many unlearned and retrained models;
* :mod:`~fastntk_jax.evaluation.mia` — membership-inference attacks;
* :mod:`~fastntk_jax.evaluation.relearn` — relearn time;
* :mod:`~fastntk_jax.evaluation.probe` — linear probes on frozen features;
* :mod:`~fastntk_jax.evaluation.timing` — wall-clock and compile-time measurement.
"""
